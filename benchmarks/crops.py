"""The ``crops`` task: distillation crops of proposal-like boxes, the fast batched RoIAlign
path against the PIL reference, and how alike CLIP embeds the two."""

import numpy as np
import torch
from PIL import Image

from vild_d2.distill import encode_crops, fast_crops, reference_crops
from vild_d2.text import VIT_B_32, build_clip, load_clip

from .common import proposal_like_boxes, round_robin
from .models import BenchmarkSetup

__all__ = ["benchmark_crops", "crops_clip"]


def crops_clip(setup: BenchmarkSetup):
    """(CLIP model, label) whose image tower embeds the crops: ViT-B/32's shape with random
    weights, or the tiny CLIP in quick runs and with --skip-vit."""
    if setup.use_vit:
        torch.manual_seed(0)
        return build_clip(**VIT_B_32).to(setup.device).eval(), "ViT-B/32 (random weights)"
    model, _ = load_clip(setup.clip_path, setup.device)
    return model.float(), "tiny random CLIP"


def benchmark_crops(setup: BenchmarkSetup) -> dict:
    """
    Crops of M proposal-like boxes at scales (1.0, 1.5) on the first photo, per second:
    ``fast`` (one batched RoIAlign) vs ``reference`` (PIL + CLIP preprocess per crop); and the
    minimum cosine, over the first 32 boxes, between the CLIP embeddings of the two.
    M = 300 (ViLD's proposals per image); quick: 8.
    """
    rgb = np.ascontiguousarray(setup.images[0][:, :, ::-1])
    h, w = rgb.shape[:2]
    m = 8 if setup.quick else 300
    boxes = proposal_like_boxes(m, w, h)  # (m, 4) XYXY
    model, label = crops_clip(setup)
    size = model.visual.input_resolution
    image_chw = torch.as_tensor(rgb.transpose(2, 0, 1).copy()).to(setup.device)
    pil = Image.fromarray(rgb)
    fns = {
        "fast": lambda: fast_crops(image_chw, boxes, size=size),
        "reference": lambda: reference_crops(pil, boxes, size=size),
    }
    # At least 3 rounds: one round of crops is short, so a single one is noisy.
    seconds = round_robin(fns, max(setup.repeats, 3), setup.device)
    per_s = {n: 2 * m / t for n, t in seconds.items()}
    # ViT-B/32 on a CPU encodes ~7 crops/s: the agreement is measured on the first 32 boxes.
    sub = boxes[:32]
    with torch.no_grad():
        fast = encode_crops(model, fast_crops(image_chw, sub, size=size), num_scales=2)
        ref = reference_crops(pil, sub, size=size).to(setup.device)
        ref = encode_crops(model, ref, num_scales=2)  # (len(sub), D) unit rows, as ``fast``
    return {
        "crops_per_s": per_s,
        "min_cosine_fast_vs_reference": float((fast * ref).sum(dim=1).min()),
        "ratios": {"crops_fast_vs_reference": per_s["fast"] / per_s["reference"]},
        "setup": {
            "crops": f"{m} proposal-like boxes x 2 scales at {size}x{size}, image {w}x{h}; "
            f"cosine on {len(sub)} of them: {label}"
        },
    }
