#!/usr/bin/env python
"""A tiny CLIP teacher for the shapes world, trained contrastively on image-caption pairs.

    python demo/tiny_clip.py --world datasets/shapes --output tiny_clip.pt [--steps 600]

saves the teacher where ``clip.load(path)`` reads it (a .json summary beside it) and prints its
zero-shot accuracy on held-out crops (goal: >= 95%).

It stands in for CLIP's web-scale pre-training: it sees crops of objects of EVERY category, base
and novel, with captions made from the 63 ViLD prompt templates. The detector never sees a novel
box; it learns about novel categories only through this teacher (its text embeddings and, for
ViLD-image, its image embeddings of proposal crops).

The model is the ``clip`` package's own ``CLIP`` class, saved as a state dict that
``clip.load(path)`` rebuilds, so the pipeline uses it exactly as it would use ViT-B/32.
"""

import argparse
import io
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import clip
import numpy as np
import torch
import torch.nn.functional as F
from clip.model import CLIP

from vild_d2.distill.crops import fast_crops
from vild_d2.distill.teacher import encode_crops
from vild_d2.fileio import atomic_write
from vild_d2.text import TextEncoder, load_clip
from vild_d2.text.prompts import fill_prompts, load_templates
from vild_d2.data.datasets.shapes import WorldSpec, draw_scene, load_world_spec, visible_box

__all__ = ["TeacherSpec", "object_crops", "train_tiny_clip", "zero_shot_accuracy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSpec:
    """Architecture and schedule of the tiny CLIP: CLIP's ModifiedResNet image tower (one block
    per stage, width 16), a 2-layer text transformer. A ViT-style tower of the same cost (48 px,
    patch 8) reached only ~84% zero-shot here: it confused shapes at that patch size."""

    image_resolution: int = 64
    vision_layers: Tuple[int, ...] = (1, 1, 1, 1)  # per-stage blocks: a ResNet image tower
    vision_width: int = 16
    vision_patch_size: Optional[int] = None  # ViT only
    transformer_width: int = 128  # clip.load infers heads = width // 64
    transformer_layers: int = 2
    context_length: int = 24  # the longest shapes prompt is 15 tokens
    embed_dim: int = 64
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    crops_per_class: int = 240
    heldout_per_class: int = 40
    seed: int = 0

    def build(self) -> CLIP:
        return CLIP(
            embed_dim=self.embed_dim,
            image_resolution=self.image_resolution,
            vision_layers=self.vision_layers,
            vision_width=self.vision_width,
            vision_patch_size=self.vision_patch_size,
            context_length=self.context_length,
            vocab_size=49408,
            transformer_width=self.transformer_width,
            transformer_heads=self.transformer_width // 64,
            transformer_layers=self.transformer_layers,
        )


def object_crops(
    world: WorldSpec, per_class: int, size: int, seed: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Crops of single objects of every category, as the pipeline crops proposals: scenes of the
    world (so with backgrounds, neighbours and occlusion), each object's visible box jittered
    and enlarged by a random context scale in [1, 1.6], through :func:`fast_crops`.

    Returns:
        crops: (K * per_class, 3, size, size) float16, CLIP-normalised.
        labels: (K * per_class,) int64 category index in ``world.classes``.
    """
    rng = np.random.default_rng([world.seed, seed, 7])
    classes = list(world.classes)
    todo = np.repeat(np.arange(len(classes)), per_class)
    rng.shuffle(todo)
    crops, labels, i = [], [], 0
    while i < len(todo):
        names = [classes[c] for c in todo[i : i + rng.integers(1, 5)]]
        image, objects = draw_scene(rng, world, names)
        boxes, kept = [], []
        for name, _, mask in objects:
            if mask.sum() < 16:
                continue
            x0, y0, x1, y1 = visible_box(mask)
            w, h = x1 - x0, y1 - y0
            jitter = rng.uniform(-0.1, 0.1, size=4) * [w, h, w, h]
            boxes.append(np.array([x0, y0, x1, y1], np.float64) + jitter)
            kept.append(classes.index(name))
        i += len(names)
        if not boxes:
            continue
        rgb = torch.from_numpy(image).permute(2, 0, 1)
        for box, label in zip(boxes, kept):  # one context scale per crop
            scale = float(rng.uniform(1.0, 1.6))
            crop = fast_crops(rgb, torch.from_numpy(box[None]).float(), (scale,), size)
            crops.append(crop.half())
            labels.append(label)
    return torch.cat(crops), torch.tensor(labels)


def _caption_tokens(names: Sequence[str], templates: Sequence[str], context_length: int):
    """(T, K, L) tokens of every template filled with every name."""
    prompts = [fill_prompts(n, templates) for n in names]  # K x T
    flat = [p for per_name in zip(*prompts) for p in per_name]  # template-major
    tokens = clip.tokenize(flat, context_length=context_length, truncate=True)
    return tokens.view(len(templates), len(names), -1)


def _contrastive_loss(image: torch.Tensor, text: torch.Tensor, labels, scale) -> torch.Tensor:
    """
    CLIP's symmetric image-text loss for a batch in which several crops share a caption class:
    image -> text is a softmax over the K captions; text -> image gives each present caption's
    probability mass to all crops of its class equally.

    image: (B, D) unit rows; text: (K, D) unit rows; labels: (B,) in [0, K).
    """
    logits = scale * image @ text.t()  # (B, K)
    i2t = F.cross_entropy(logits, labels)
    present = labels.unique()
    target = (labels[None, :] == present[:, None]).to(logits.dtype)  # (P, B)
    t2i = -(target / target.sum(1, keepdim=True) * logits.t()[present].log_softmax(1)).sum(1)
    return (i2t + t2i.mean()) / 2


def train_tiny_clip(
    world: WorldSpec,
    out_path: str,
    spec: TeacherSpec = TeacherSpec(),
    log: Callable[[str], None] = print,
) -> dict:
    """
    Train the tiny CLIP on crops of every category of ``world``, save it to ``out_path`` (a state
    dict ``clip.load`` reads), reload it from there and measure its zero-shot accuracy on held-out
    crops with the pipeline's own prompt-ensemble text classifier.

    Returns a summary: accuracy overall / base / novel, seconds, the specs.
    """
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    res = spec.image_resolution
    crops, labels = object_crops(world, spec.crops_per_class, res, seed=spec.seed)
    log(f"teacher: {len(crops)} training crops rendered ({time.perf_counter() - start:.0f} s)")
    templates = load_templates()
    tokens = _caption_tokens(world.classes, templates, spec.context_length)

    model = spec.build().train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=spec.lr,
    )
    warmup = max(1, spec.steps // 12)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / spec.steps)),
    )
    gen = torch.Generator().manual_seed(spec.seed)
    for step in range(spec.steps):
        idx = torch.randint(len(crops), (spec.batch_size,), generator=gen)
        images = crops[idx].float()
        # Random horizontal flips (every shape here is mirror-symmetric).
        flip = torch.rand(len(idx), generator=gen) < 0.5
        images[flip] = images[flip].flip(-1)
        template = torch.randint(len(templates), (1,), generator=gen).item()
        image_emb = F.normalize(model.encode_image(images), dim=1)
        text_emb = F.normalize(model.encode_text(tokens[template]), dim=1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = _contrastive_loss(image_emb, text_emb, labels[idx], scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == spec.steps - 1:
            log(
                f"teacher: step {step + 1}/{spec.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)"
            )

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write(out_path, [buffer.getvalue()])

    heldout, heldout_labels = object_crops(world, spec.heldout_per_class, res, seed=spec.seed + 1)
    acc = zero_shot_accuracy(str(out_path), world.classes, heldout, heldout_labels)
    novel = torch.tensor([c in world.novel for c in world.classes])[heldout_labels]
    summary = {
        "accuracy": acc["all"],
        "accuracy_base": float(acc["correct"][~novel].float().mean()),
        "accuracy_novel": float(acc["correct"][novel].float().mean()),
        "heldout_crops": len(heldout),
        "seconds": round(time.perf_counter() - start, 1),
        "teacher": asdict(spec),
    }
    return summary


@torch.no_grad()
def zero_shot_accuracy(
    clip_path: str,
    classes: Sequence[str],
    crops: torch.Tensor,
    labels: torch.Tensor,
    cache_dir: Optional[str] = None,
) -> dict:
    """Zero-shot classification of ``crops`` (N, 3, s, s) by the CLIP checkpoint at
    ``clip_path`` as the pipeline loads it (``clip.load``), against the prompt-ensemble text
    embeddings of ``classes`` (the ViLD-text classifier). Returns {"all": acc, "correct": (N,)}."""
    model, _ = load_clip(clip_path)
    text = TextEncoder(clip_path, cache_dir=cache_dir).encode(list(classes))  # (K, D)
    image = encode_crops(model, crops.float(), num_scales=1, batch_size=512)  # (N, D)
    correct = (image @ text.t()).argmax(1) == labels
    return {"all": float(correct.float().mean()), "correct": correct}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, help="shapes world folder (with world.json)")
    p.add_argument("--output", required=True, help="checkpoint path; a .json summary goes beside")
    p.add_argument("--steps", type=int, default=TeacherSpec.steps)
    p.add_argument("--crops-per-class", type=int, default=TeacherSpec.crops_per_class)
    p.add_argument("--heldout-per-class", type=int, default=TeacherSpec.heldout_per_class)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world = load_world_spec(args.world)
    if world is None:
        sys.exit(
            f"tiny_clip: no shapes world at {args.world} (world.json missing); "
            "make one with tools/make_shapes_world.py"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = TeacherSpec(
        steps=args.steps,
        crops_per_class=args.crops_per_class,
        heldout_per_class=args.heldout_per_class,
        seed=args.seed,
    )
    summary = train_tiny_clip(world, args.output, spec, log=lambda m: print(m, flush=True))
    summary_path = Path(args.output).with_suffix(".json")
    atomic_write(summary_path, [json.dumps(summary, indent=1).encode()])
    print(
        f"zero-shot accuracy on {summary['heldout_crops']} held-out crops of all "
        f"{len(world.classes)} categories: {100 * summary['accuracy']:.1f}% "
        f"(base {100 * summary['accuracy_base']:.1f}%, "
        f"novel {100 * summary['accuracy_novel']:.1f}%) in {summary['seconds']:.0f} s; "
        f"saved {args.output}"
    )


if __name__ == "__main__":
    main()
