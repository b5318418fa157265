"""The ``precompute`` task: the CLIP-targets job end to end (image files read and hashed,
crops, CLIP, the store written) against the CLIP forward alone on the same crops, in crops/s;
their ratio is how close the job comes to its limit."""

import tempfile
from typing import List

import numpy as np
import torch

from vild_d2.distill import CLIPTeacher, DistillStore, StoreWriter, encode_crops, fast_crops
from vild_d2.distill.precompute import (
    embeddings_header,
    iter_embeddings,
    proposals_header,
    run_precompute,
)

from .common import NUM_DISTILL, proposal_like_boxes, round_robin
from .crops import crops_clip
from .models import BenchmarkSetup

__all__ = ["benchmark_precompute"]


def benchmark_precompute(setup: BenchmarkSetup) -> dict:
    """
    The CLIP-targets job end to end (``run_precompute`` + ``iter_embeddings``) against the
    CLIP forward alone on the same crops (made beforehand), in crops/s. M proposal-like boxes
    per photo, scales (1.0, 1.5); M = 300 on a GPU, else 16.
    """
    import cv2

    # ViT-B/32 encodes ~7 crops/s on a CPU: a few boxes per photo already time it well.
    m = 16 if setup.quick or setup.device == "cpu" else NUM_DISTILL
    model, label = crops_clip(setup)
    with tempfile.TemporaryDirectory() as tmp:
        clip_file = f"{tmp}/clip.pt"
        torch.save(model.state_dict(), clip_file)  # what the job loads: the same weights
        dicts, images, boxes = [], [], []
        for i, bgr in enumerate(setup.images):
            path = f"{tmp}/photo{i}.png"
            cv2.imwrite(path, bgr)
            h, w = bgr.shape[:2]
            dicts.append({"file_name": path, "image_id": i, "height": h, "width": w})
            rgb_chw = np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))
            images.append(torch.as_tensor(rgb_chw))  # (3, H, W) uint8
            boxes.append(proposal_like_boxes(m, w, h, seed=i))
        proposals = _proposals_store(f"{tmp}/proposals", dicts, boxes)
        teacher = CLIPTeacher(clip_file, device=setup.device)
        size = teacher.input_size
        crops = [
            fast_crops(im.to(setup.device), b, (1.0, 1.5), size) for im, b in zip(images, boxes)
        ]
        runs = iter(range(10**6))  # a fresh store per run: a complete one would be skipped

        def end_to_end():
            header = embeddings_header(
                "bench_photos",
                len(dicts),
                chunk_size=2,
                max_proposals=m,
                teacher_settings=teacher.settings(),
                proposals=proposals,
            )
            writer = StoreWriter(f"{tmp}/targets{next(runs)}", header)
            run_precompute(
                writer,
                dicts,
                lambda chunks: iter_embeddings(teacher, chunks, proposals, max_boxes=m),
                progress=False,
            )

        def clip_forward():
            for c in crops:
                encode_crops(teacher.model, c, num_scales=2).cpu()

        seconds = round_robin(
            {"end_to_end": end_to_end, "clip_forward": clip_forward},
            max(setup.repeats, 3),
            setup.device,
        )
    n = 2 * m * len(dicts)
    per_s = {k: n / t for k, t in seconds.items()}
    return {
        "precompute_crops_per_s": per_s,
        "ratios": {
            "precompute_end_to_end_vs_clip_forward": per_s["end_to_end"] / per_s["clip_forward"]
        },
        "setup": {
            "precompute": f"{len(dicts)} photos x {m} proposal-like boxes x 2 scales, {label}, "
            "chunks of 2 images, no loader processes"
        },
    }


def _proposals_store(path: str, dicts: List[dict], boxes: List[torch.Tensor]) -> DistillStore:
    """A proposals store holding ``boxes`` ((M, 4) XYXY per image, zero objectness) for the
    images of ``dicts``."""
    m = len(boxes[0])
    header = proposals_header("bench_photos", len(dicts), chunk_size=2, max_proposals=m, model={})
    records = {d["image_id"]: b for d, b in zip(dicts, boxes)}

    def compute(chunks):
        for d in (d for chunk in chunks for d in chunk):
            b = records[d["image_id"]].numpy().astype(np.float32)
            yield d["image_id"], {"boxes": b, "objectness_logits": np.zeros(len(b), np.float32)}

    run_precompute(StoreWriter(path, header), dicts, compute, progress=False)
    return DistillStore(path)
