#!/usr/bin/env python
"""A tiny CLIP teacher for the shapes world, trained contrastively on image-caption pairs.

    python demo/tiny_clip.py --world datasets/shapes --output tiny_clip.pt [--steps 600]
        [--data scenes|crops]

saves the teacher where ``clip.load(path)`` reads it, measures it (:func:`teacher_report`:
zero-shot accuracy on held-out crops, goal >= 95%, and how it embeds background and parts of
objects) and writes a .json summary beside it.

It stands in for CLIP's web-scale pre-training, and sees objects of EVERY category, base and
novel. The detector never sees a novel box; it learns about novel categories only through this
teacher (its text embeddings and, for ViLD-image, its image embeddings of proposal crops). Two
data recipes (``TeacherSpec.data``, docs/SHAPES.md "A CLIP-like teacher"):

* ``"scenes"`` (work in progress), CLIP-like: whole scenes, random windows, windows on parts of
  objects, background-only windows and object crops at context 1x-2x, with free-form captions
  of what each shows (``demo/captions.py``, docs/TEACHER.md);
* ``"crops"`` (default): only crops of single objects, captioned with the 63 ViLD prompts.

The model is the ``clip`` package's own ``CLIP`` class, saved as a state dict that
``clip.load(path)`` rebuilds, so the pipeline uses it exactly as it would use ViT-B/32.
"""

import argparse
import contextlib
import json
import logging
import math
import os
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
from vild_d2.fileio import atomic_torch_save, atomic_write
from vild_d2.text import TextEncoder, build_clip, load_clip
from vild_d2.text.prompts import fill_prompts, load_templates
from vild_d2.data.datasets.shapes import WorldSpec, draw_scene, load_world_spec, visible_box

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo/ is not a package
from captions import caption_pairs  # noqa: E402

__all__ = [
    "TeacherSpec",
    "object_crops",
    "probe_windows",
    "unique_captions",
    "train_tiny_clip",
    "teacher_report",
    "zero_shot_accuracy",
]

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
    context_length: int = 32  # captions are drawn to fit (30 BPE tokens + start and end)
    embed_dim: int = 64
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    # Training data: "scenes" (CLIP-like captioned windows) or "crops" (object crops + prompts).
    data: str = "crops"
    # Training pairs = crops_per_class x categories (for "scenes", windows of every kind).
    crops_per_class: int = 240
    caption_variants: int = 4  # captions drawn per window; each step uses one at random
    # "scenes" only: the softmax temperature as (start, end) of a log-linear schedule over the
    # first ``temperature_steps`` of training, then held; None = learnt from CLIP's initial 0.07
    # (as "crops" always does). CLIP learns it and ends at its clamp, 0.01, the temperature ViLD
    # uses; in 600 steps here the learnt one stays near 0.065. Held at 0.01 from the start,
    # (0.01, 0.01), the teacher is CLIP-like on background but reaches only ~80% zero-shot; a
    # schedule such as (0.07, 0.01) is not measured yet (docs/TEACHER.md).
    temperature: Optional[Tuple[float, float]] = None
    temperature_steps: float = 0.6  # a share of ``steps``
    heldout_per_class: int = 40
    seed: int = 0

    def __post_init__(self):
        if self.data not in ("scenes", "crops"):
            raise ValueError(f"TeacherSpec.data must be 'scenes' or 'crops', got {self.data!r}")

    def build(self) -> CLIP:
        return build_clip(
            embed_dim=self.embed_dim,
            image_resolution=self.image_resolution,
            vision_layers=self.vision_layers,
            vision_width=self.vision_width,
            vision_patch_size=self.vision_patch_size,
            transformer_width=self.transformer_width,
            transformer_layers=self.transformer_layers,
            context_length=self.context_length,
        )


@contextlib.contextmanager
def _one_thread():
    """Rendering makes many tiny torch ops; on a busy machine, intra-op threads only wait for
    each other there (measured: 5x slower with 2 threads while another job ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _follow_threads_file(path: str, log: Callable[[str], None]) -> None:
    """Take the thread count in ``path`` (the pipeline's share of the cores for this run, which
    grows when a stage running beside it ends): one thread per core of the share."""
    try:
        threads = int(Path(path).read_text())
    except (OSError, ValueError):
        return  # not written yet, or being replaced: keep the current count
    if threads >= 1 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log(f"teacher: now {threads} thread(s) ({path})")


def object_crops(
    world: WorldSpec,
    per_class: int,
    size: int,
    seed: int,
    context: Tuple[float, float] = (1.0, 1.6),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Crops of single objects of every category, as the pipeline crops proposals: scenes of the
    world (so with backgrounds, neighbours and occlusion), each object's visible box jittered
    and enlarged by a random context scale in ``context``, through :func:`fast_crops`.

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
            scale = float(rng.uniform(*context))
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


def unique_captions(tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The distinct captions of a batch and which one each image has: (B, L) tokens ->
    (U, L) distinct rows, (B,) int64 index of each image's row. With free-form captions two
    windows may get the same caption ("a dark striped background."); encoded once, it is one
    caption class in :func:`_contrastive_loss`, never a negative of itself.
    """
    unique, labels = torch.unique(tokens, dim=0, return_inverse=True)
    return unique, labels


def _contrastive_loss(image: torch.Tensor, text: torch.Tensor, labels, scale) -> torch.Tensor:
    """
    CLIP's symmetric image-text loss for a batch in which several images share a caption:
    image -> text is a softmax over the K distinct captions; text -> image gives each present
    caption's probability mass to all images that have it, equally. (CLIP's own loss takes row
    i's caption as the only positive of image i, so a repeated caption would be a negative of
    the images it describes.)

    image: (B, D) unit rows; text: (K, D) unit rows; labels: (B,) in [0, K).
    """
    logits = scale * image @ text.t()  # (B, K)
    i2t = F.cross_entropy(logits, labels)
    present = labels.unique()
    target = (labels[None, :] == present[:, None]).to(logits.dtype)  # (P, B)
    t2i = -(target / target.sum(1, keepdim=True) * logits.t()[present].log_softmax(1)).sum(1)
    return (i2t + t2i.mean()) / 2


def _training_data(world: WorldSpec, spec: TeacherSpec):
    """
    The training images and a way to draw a batch's captions.

    Returns:
        images: (N, 3, s, s) float16 CLIP-normalised.
        captions: f(idx (B,), gen) -> (text tokens (U, L), labels (B,) in [0, U)).
        tokens: every token tensor ``captions`` draws from (any shape): the ids training uses.
    """
    res, length = spec.image_resolution, spec.context_length
    if spec.data == "crops":
        with _one_thread():
            crops, labels = object_crops(world, spec.crops_per_class, res, seed=spec.seed)
        templates = load_templates()
        tokens = _caption_tokens(world.classes, templates, length)  # (T, K, L)

        def crop_captions(idx, gen):
            # One template per step for all K captions: the K classes stay K distinct texts.
            template = torch.randint(len(templates), (1,), generator=gen).item()
            return tokens[template], labels[idx]

        return crops, crop_captions, tokens
    with _one_thread():
        pairs = caption_pairs(
            world,
            spec.crops_per_class * len(world.classes),
            res,
            seed=spec.seed,
            variants=spec.caption_variants,
            max_tokens=length - 2,  # + start and end tokens
        )
    flat = [c for variants in pairs.captions for c in variants]
    tokens = clip.tokenize(flat, context_length=length).view(len(pairs.captions), -1, length)

    def scene_captions(idx, gen):
        variant = torch.randint(tokens.shape[1], (len(idx),), generator=gen)
        return unique_captions(tokens[idx, variant])

    return pairs.crops, scene_captions, tokens


def train_tiny_clip(
    world: WorldSpec,
    out_path: str,
    spec: TeacherSpec = TeacherSpec(),
    log: Callable[[str], None] = print,
    device: str = "cpu",
    compact_vocabulary: bool = True,
) -> dict:
    """
    Train the tiny CLIP on ``spec.data`` pairs of ``world``, save it to ``out_path`` (a state
    dict ``clip.load`` reads), reload it from there and measure it (:func:`teacher_report`).
    ``compact_vocabulary=False`` trains the whole token table (the same model, slower).

    Returns a summary: the report's figures (accuracy overall / base / novel on held-out crops,
    ...), seconds (wall, all of it), train_seconds (data + steps), cpu_seconds, the spec.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(spec.seed)
    images, captions, used_tokens = _training_data(world, spec)
    log(
        f"teacher: {len(images)} training {spec.data} pairs rendered "
        f"({time.perf_counter() - start:.0f} s)"
    )

    model = spec.build().to(device).train()  # the pairs stay on the CPU; batches move
    # The captions use a few hundred of CLIP's 49408 token ids. The other rows of the token
    # embedding never get a gradient, so AdamW (no weight decay on embeddings) leaves them
    # exactly as initialised; yet updating the full 6.3M-entry table (zeroed gradient, two
    # moments) each step was ~1/5 of a step's time. Train the used rows as a compact table
    # (ids renumbered in order, so the end token stays the argmax CLIP's encode_text looks
    # for) and write them back before saving: the same model, bit for bit up to float order.
    full_embedding = model.token_embedding
    if compact_vocabulary:
        used = torch.unique(used_tokens)  # sorted
        renumber = torch.zeros(full_embedding.num_embeddings, dtype=torch.long)
        renumber[used] = torch.arange(len(used))
        model.token_embedding = torch.nn.Embedding.from_pretrained(
            full_embedding.weight.detach()[used.to(device)].clone(), freeze=False
        )
    scheduled = spec.temperature is not None and spec.data == "scenes"
    if scheduled:
        model.logit_scale.requires_grad_(False)
        first, last = (math.log(1 / t) for t in spec.temperature)
        ramp = max(1, round(spec.temperature_steps * spec.steps))
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
    order = torch.empty(0, dtype=torch.long)
    batch_size = min(spec.batch_size, len(images))
    threads_file = os.environ.get("VILD_D2_THREADS_FILE")
    for step in range(spec.steps):
        if threads_file and step % 20 == 0:
            _follow_threads_file(threads_file, log)
        if spec.data == "crops":
            idx = torch.randint(len(images), (spec.batch_size,), generator=gen)
        else:
            # Epochs of a permutation: a window twice in a batch, with two different captions,
            # would make each caption a negative of a window it describes.
            if len(order) < batch_size:
                order = torch.randperm(len(images), generator=gen)
            idx, order = order[:batch_size], order[batch_size:]
        batch = images[idx].float()
        # Random horizontal flips (every shape here is mirror-symmetric; no caption says left
        # or right).
        flip = torch.rand(len(idx), generator=gen) < 0.5
        batch[flip] = batch[flip].flip(-1)
        tokens, labels = captions(idx, gen)
        if compact_vocabulary:
            tokens = renumber[tokens]
        batch, tokens, labels = batch.to(device), tokens.to(device), labels.to(device)
        image_emb = F.normalize(model.encode_image(batch), dim=1)
        text_emb = F.normalize(model.encode_text(tokens), dim=1)
        if scheduled:
            model.logit_scale.fill_(first + (last - first) * min(1.0, step / ramp))
        scale = model.logit_scale.exp().clamp(max=100)
        loss = _contrastive_loss(image_emb, text_emb, labels, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == spec.steps - 1:
            log(
                f"teacher: step {step + 1}/{spec.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    train_seconds = time.perf_counter() - start
    if compact_vocabulary:
        with torch.no_grad():
            full_embedding.weight[used.to(device)] = model.token_embedding.weight
        model.token_embedding = full_embedding

    atomic_torch_save(model.cpu().state_dict(), out_path)

    report = teacher_report(str(out_path), world, spec.heldout_per_class, seed=spec.seed + 1)
    return {
        **report,
        "data": spec.data,
        "seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(train_seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "teacher": asdict(spec),
    }


def probe_windows(
    world: WorldSpec, count: int, size: int, seed: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Proposal-like windows (squares of 10% to 50% of the image side) on scenes drawn as the
    world draws its images, of two kinds:

    * background-only: not one visible object pixel inside;
    * part-only: objects cover >= 25% of the window, but no object has half or more of its
      visible pixels inside (so it shows parts of objects and no whole one).

    Returns:
        background: (count, 3, s, s) float16 crops; parts: (count, 3, s, s) float16 crops;
        part_labels: (count,) int64, the category of the object with most pixels inside.
    """
    rng = np.random.default_rng([world.seed, seed, 31])
    classes = list(world.classes)
    found = {"background": [], "part": []}
    labels = []
    n = world.image_size
    while min(len(v) for v in found.values()) < count:
        image, objects = draw_scene(rng, world)
        masks = [m for _, _, m in objects]
        totals = np.array([max(1, m.sum()) for m in masks])
        windows, kinds = [], []
        for _ in range(12):
            side = max(4, int(round(rng.uniform(0.1, 0.5) * n)))
            x0, y0 = (int(v) for v in rng.integers(0, n - side + 1, size=2))
            inside = np.array([m[y0 : y0 + side, x0 : x0 + side].sum() for m in masks])
            if inside.sum() == 0:
                kind = "background"
            elif inside.sum() >= 0.25 * side * side and (inside / totals).max() < 0.5:
                kind = "part"
            else:
                continue
            if len(found[kind]) + kinds.count(kind) >= count:
                continue
            windows.append((x0, y0, x0 + side, y0 + side))
            kinds.append(kind)
            if kind == "part":
                labels.append(classes.index(objects[int(inside.argmax())][0]))
        if windows:
            rgb = torch.from_numpy(image).permute(2, 0, 1)
            crops = fast_crops(rgb, torch.tensor(windows, dtype=torch.float32), (1.0,), size)
            for crop, kind in zip(crops.half(), kinds):
                found[kind].append(crop)
    return torch.stack(found["background"]), torch.stack(found["part"]), torch.tensor(labels)


@torch.no_grad()
def teacher_report(
    clip_path: str,
    world: WorldSpec,
    heldout_per_class: int = 40,
    seed: int = 1,
    cache_dir: Optional[str] = None,
) -> dict:
    """
    How a CLIP checkpoint (loaded as the pipeline loads it) sees the world, against the
    63-prompt ensemble embeddings of its categories (the ViLD-text classifier), all on data
    made with ``seed`` (the teacher trained on other seeds' data):

    * accuracy, accuracy_base, accuracy_novel: zero-shot top-1 on ``heldout_per_class`` object
      crops per category, context 1x-1.6x (``heldout_crops`` of them); accuracy_context_1_5:
      the same at context 1.5x exactly;
    * top_prob_objects / top_prob_background / top_prob_parts: mean top category probability
      (softmax of cosines / 0.01, ViLD's temperature) on those object crops / on
      background-only windows / on part-only windows (:func:`probe_windows`; ``windows`` of
      each); top1_parts: how often a part-only window's top category is that of the object
      it shows most of;
    * cosine_object_text: mean cosine of an object crop with its category's text embedding;
      cosine_caption: mean cosine of a held-out scenes window with its caption (first drawn).
    """
    model, _ = load_clip(clip_path)
    res, length = model.visual.input_resolution, model.context_length
    classes = list(world.classes)
    text = TextEncoder(clip_path, cache_dir=cache_dir).encode(classes)  # (K, D)
    novel = torch.tensor([c in world.novel for c in classes])

    def embed(crops):  # (N, 3, s, s) -> (N, D) unit rows
        return encode_crops(model, crops.float(), num_scales=1, batch_size=512)

    def top_prob(emb):  # (N, D) -> mean over N of the top softmax probability, T = 0.01
        return float((100 * emb @ text.t()).softmax(1).max(1).values.mean())

    with _one_thread():
        crops, labels = object_crops(world, heldout_per_class, res, seed=seed)
        wide, wide_labels = object_crops(world, heldout_per_class, res, seed, context=(1.5, 1.5))
        windows = max(4, heldout_per_class * len(classes) // 4)
        background, parts, part_labels = probe_windows(world, windows, res, seed)
        pairs = caption_pairs(world, windows, res, seed=seed, max_tokens=length - 2)
    emb = embed(crops)
    correct = (emb @ text.t()).argmax(1) == labels
    part_emb = embed(parts)
    caption_emb = F.normalize(
        model.encode_text(
            clip.tokenize([c[0] for c in pairs.captions], context_length=length)
        ).float(),
        dim=1,
    )
    return {
        "accuracy": float(correct.float().mean()),
        "accuracy_base": float(correct[~novel[labels]].float().mean()),
        "accuracy_novel": float(correct[novel[labels]].float().mean()),
        "heldout_crops": len(crops),
        "accuracy_context_1_5": float(
            ((embed(wide) @ text.t()).argmax(1) == wide_labels).float().mean()
        ),
        "top_prob_objects": top_prob(emb),
        "top_prob_background": top_prob(embed(background)),
        "top_prob_parts": top_prob(part_emb),
        "top1_parts": float(((part_emb @ text.t()).argmax(1) == part_labels).float().mean()),
        "windows": windows,
        "cosine_object_text": float((emb * text[labels]).sum(1).mean()),
        "cosine_caption": float((embed(pairs.crops) * caption_emb).sum(1).mean()),
    }


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
    p.add_argument(
        "--data",
        choices=("scenes", "crops"),
        default=TeacherSpec.data,
        help="training data: captioned windows of scenes (CLIP-like) or object crops "
        "with the detection prompts (the old recipe)",
    )
    p.add_argument("--steps", type=int, default=TeacherSpec.steps)
    p.add_argument(
        "--crops-per-class",
        type=int,
        default=TeacherSpec.crops_per_class,
        help="training pairs per category (scenes: windows of every kind)",
    )
    p.add_argument("--heldout-per-class", type=int, default=TeacherSpec.heldout_per_class)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model trains (the pairs are made " "on the CPU either way), e.g. cuda",
    )
    p.add_argument(
        "--temperature",
        type=float,
        nargs=2,
        metavar=("START", "END"),
        help="scenes: softmax temperature schedule (TeacherSpec.temperature); "
        "default: learnt from 0.07",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: measure the checkpoint at --output (teacher_report), "
        "print the figures and merge them into its .json summary",
    )
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
    summary_path = Path(args.output).with_suffix(".json")
    if args.report_only:
        report = teacher_report(args.output, world, args.heldout_per_class, seed=args.seed + 1)
        old = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        atomic_write(summary_path, [json.dumps({**old, **report}, indent=1).encode()])
        print(json.dumps(report, indent=1))
        return
    spec = TeacherSpec(
        data=args.data,
        temperature=tuple(args.temperature) if args.temperature else None,
        steps=args.steps,
        crops_per_class=args.crops_per_class,
        heldout_per_class=args.heldout_per_class,
        seed=args.seed,
    )
    summary = train_tiny_clip(
        world, args.output, spec, log=lambda m: print(m, flush=True), device=args.device
    )
    atomic_write(summary_path, [json.dumps(summary, indent=1).encode()])
    print(
        f"zero-shot accuracy on {summary['heldout_crops']} held-out crops of all "
        f"{len(world.classes)} categories: {100 * summary['accuracy']:.1f}% "
        f"(base {100 * summary['accuracy_base']:.1f}%, "
        f"novel {100 * summary['accuracy_novel']:.1f}%); mean top probability on background "
        f"{summary['top_prob_background']:.2f}, on parts {summary['top_prob_parts']:.2f}, on "
        f"objects {summary['top_prob_objects']:.2f}; trained in {summary['train_seconds']:.0f} "
        f"s ({summary['seconds']:.0f} s in all); saved {args.output}"
    )


if __name__ == "__main__":
    main()
