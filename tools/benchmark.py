#!/usr/bin/env python
"""Speed of ViLD against stock detectron2 Mask R-CNN, side by side in one process.

    python tools/benchmark.py --out bench.json              # R50-FPN, 512 px: ~8 min, 1 CPU thread
    python tools/benchmark.py --out bench.json --quick      # toy R18 model, tiny CLIP: < 30 s

All models share one architecture (backbone, RPN, 4conv+2fc box head, mask head, class-agnostic
box regression and masks, 1203 LVIS classes) and the same weights where they have the same
parts; they differ only in the classifier: stock = a learned linear layer over 1203+1 classes,
ViLD = cosine similarity to 1203 text embeddings + a background embedding. The stock classifier
is set to the linear map closest to ViLD's (text embeddings x ViLD's projection, scaled by the
mean region-embedding norm), so both models give similar score distributions and their
score-dependent post-processing (NMS, mask head on the detections) does similar work. Models
are timed in turns (round-robin), after a warm-up, on the same inputs and thread count; numbers
are medians. Weights are random (nothing can be downloaded here): speed does not depend on them.
"""

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import vild_d2  # noqa: F401  (first: compat bridges)
import clip
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from vild_d2 import TextEncoder, Vocabulary
from vild_d2.data.categories import builtin_vocabulary
from vild_d2.config import load_config
from vild_d2.text import load_templates
from vild_d2.text.encoder import save_random_clip
from vild_d2.text.prompts import fill_prompts

logger = logging.getLogger("vild_d2.benchmark")

NUM_DISTILL = 300  # distillation boxes per image (the paper's)
EMBED_DIM = 512  # CLIP ViT-B/32's embedding width
# ViT-B/32's shape (clip.load("ViT-B/32")), built here with random weights.
VIT_B_32 = dict(
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
    vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
    transformer_heads=8, transformer_layers=12,
)  # fmt: skip


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="toy model and tiny CLIP (for tests)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", type=int, default=0, help="short image side (default 512; quick 96)")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per measure (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument(
        "--score-thresh",
        type=float,
        default=0.05,
        help="test score threshold of all models (detectron2's default; at 0 with 1203 classes "
        "detectron2 0.6's NMS loops over the classes, which then dominates and is the same code "
        "for every model)",
    )
    p.add_argument("--skip-vit", action="store_true", help="no ViT-B/32 (random) measures")
    return p


# ---------------------------------------------------------------------------------------------
# Timing
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def round_robin(fns, repeats, device, warmup=1):
    """{name: median seconds}: every fn run ``warmup`` times, then ``repeats`` rounds in turn."""
    times = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# Models
def _configs(args, tmp):
    """(ViLD cfg opts, config file) with a 1203-class 512-d random vocabulary file."""
    names = builtin_vocabulary("lvis").names
    g = torch.Generator().manual_seed(0)
    Vocabulary(names, F.normalize(torch.randn(len(names), EMBED_DIM, generator=g), dim=1)).save(
        str(tmp / "lvis_random.pth")
    )
    # A tiny text tower with ViT-B/32's 512-d output, so its vocabularies fit the models.
    clip_path = save_random_clip(str(tmp / "tiny_clip.pt"), embed_dim=EMBED_DIM)
    config_file = (
        "configs/Toy/Base-Toy-R18-FPN.yaml" if args.quick else "configs/Base-ViLD-RCNN-FPN.yaml"
    )
    opts = [
        "MODEL.DEVICE", args.device,
        "MODEL.WEIGHTS", "",
        "MODEL.VILD.CLIP_MODEL", clip_path,
        "MODEL.VILD.EMBEDDING_CACHE_DIR", str(tmp / "cache"),
        "MODEL.VILD.TRAIN_VOCABULARY", str(tmp / "lvis_random.pth"),
        "MODEL.VILD.TEST_VOCABULARY", str(tmp / "lvis_random.pth"),
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TEST", str(args.size), "INPUT.MAX_SIZE_TEST", str(args.size * 2),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.score_thresh),
    ]  # fmt: skip
    if args.quick:  # enough proposals for the same-RoI-count stock run (64 + 300 per image)
        opts += ["MODEL.RPN.PRE_NMS_TOPK_TRAIN", "1000", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "500"]
    else:
        opts += ["MODEL.BACKBONE.FREEZE_AT", "2"]  # detectron2's default for R50 training
    return config_file, opts, clip_path


def build_models(args, tmp):
    config_file, opts, clip_path = _configs(args, tmp)
    torch.manual_seed(0)
    vild = build_model(load_config(config_file, opts + ["MODEL.VILD.VARIANT", "vild"]))
    # Random RPN deltas on a randomly initialised (FrozenBN) ResNet are huge: the proposals
    # collapse to a few dozen clipped boxes and the RoI heads get almost no work. With zero
    # deltas the proposals are the anchors, as many as a trained RPN gives.
    with torch.no_grad():
        vild.proposal_generator.rpn_head.anchor_deltas.weight.zero_()
        vild.proposal_generator.rpn_head.anchor_deltas.bias.zero_()
    torch.manual_seed(0)
    ensemble = build_model(load_config(config_file, opts + ["MODEL.VILD.VARIANT", "ensemble"]))
    stock_opts = opts + [
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_HEADS.NUM_CLASSES", "1203",
    ]  # fmt: skip
    torch.manual_seed(0)
    stock = build_model(load_config(config_file, stock_opts))
    # Same weights where the parts are the same (backbone, RPN, box head, box deltas, mask head).
    shared = {k: v for k, v in vild.state_dict().items() if k in stock.state_dict()}
    stock.load_state_dict(shared, strict=False)
    ensemble.load_state_dict(vild.state_dict(), strict=False)
    # The image branch = a copy of the text branch, so the ensemble's scores are as peaked as
    # ViLD's (a random image branch gives ~1/K everywhere and nearly no detections to process).
    with torch.no_grad():
        heads = ensemble.roi_heads
        heads.image_box_head.load_state_dict(heads.box_head.state_dict())
        heads.image_projection.load_state_dict(heads.box_predictor.projection.state_dict())
    models = {"stock": stock, "vild": vild, "vild_ensemble": ensemble}
    for m in models.values():
        m.eval()
    return models, clip_path


@torch.no_grad()
def match_stock_classifier(stock, vild, inputs):
    """Set stock's linear classifier to the linear map closest to ViLD's cosine classifier:
    W = E P / (T s), b = E p / (T s), with E the unit (K+1, D) class embeddings (background
    last), P, p ViLD's projection and s the mean norm of P x + p over real RoI features."""
    pred = vild.roi_heads.box_predictor
    images = vild.preprocess_image(inputs)
    features = vild.backbone(images.tensor)
    proposals, _ = vild.proposal_generator(images, features)
    feats = [features[f] for f in vild.roi_heads.box_in_features]
    box_features = vild.roi_heads.box_head(
        vild.roi_heads.box_pooler(feats, [p.proposal_boxes for p in proposals])
    )
    scale = pred.temperature * pred.projection(box_features).norm(dim=1).mean()
    classes = F.normalize(torch.cat([pred.test_embeddings, pred.background[None]]), dim=1)
    cls_score = stock.roi_heads.box_predictor.cls_score
    cls_score.weight.copy_(classes @ pred.projection.weight / scale)
    cls_score.bias.copy_(classes @ pred.projection.bias / scale)


# ---------------------------------------------------------------------------------------------
# Inputs
def photos(size):
    """Four real photos (BGR), short side resized to ``size``."""
    out = []
    for rgb in (skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()):
        h, w = rgb.shape[:2]
        s = size / min(h, w)
        out.append(cv2.resize(rgb[:, :, ::-1], (round(w * s), round(h * s))))
    return out


def inference_input(bgr):
    image = torch.as_tensor(np.ascontiguousarray(bgr.transpose(2, 0, 1)))
    return {"image": image, "height": bgr.shape[0], "width": bgr.shape[1]}


def training_input(bgr, seed, num_gt=6):
    """A training dict: the photo, ``num_gt`` random gt boxes with box masks, 1203 classes, and
    NUM_DISTILL random distillation boxes with random 512-d targets."""
    g = torch.Generator().manual_seed(seed)
    h, w = bgr.shape[:2]
    d = inference_input(bgr)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        return torch.cat([xy, xy + wh], 1)

    gt = Instances((h, w))
    gt.gt_boxes = Boxes(boxes(num_gt))
    gt.gt_classes = torch.randint(0, 1203, (num_gt,), generator=g)
    masks = torch.zeros(num_gt, h, w, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(gt.gt_boxes.tensor.int().tolist()):
        masks[k, y0:y1, x0:x1] = True
    gt.gt_masks = BitMasks(masks)
    distill = Instances((h, w))
    distill.boxes = Boxes(boxes(NUM_DISTILL))
    distill.embeddings = torch.randn(NUM_DISTILL, EMBED_DIM, generator=g)
    d.update(instances=gt, distill=distill)
    return d


def count_box_head_rois(model, counts, name):
    """Record how many RoIs went through the box head(s) in the last call, under ``name``."""

    def hook(module, inputs, output):
        counts[name] = counts.get(name, 0) + inputs[0].shape[0]

    heads = [model.roi_heads.box_head, getattr(model.roi_heads, "image_box_head", None)]
    return [h.register_forward_hook(hook) for h in heads if h is not None]


def train_step_fn(model, batch):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: same weights

    def step():
        with EventStorage():
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()

    return step


# ---------------------------------------------------------------------------------------------
# Sections
def bench_inference(models, images, repeats, device):
    inputs = [inference_input(im) for im in images]
    counts = {}

    def run(name):
        def fn():
            with torch.no_grad():
                for x in inputs:
                    counts[name] = len(models[name]([x])[0]["instances"])

        return fn

    medians = round_robin({n: run(n) for n in models}, repeats, device)
    per_image = {n: 1000 * t / len(inputs) for n, t in medians.items()}
    return per_image, counts


def bench_training(models, images, repeats, device):
    batch = [training_input(im, seed=i) for i, im in enumerate(images[:2])]
    for m in models.values():
        m.train()
    stock = models["stock"]
    base_rois = stock.roi_heads.batch_size_per_image
    fns = {n: train_step_fn(m, batch) for n, m in models.items()}

    def stock_same_rois():
        stock.roi_heads.batch_size_per_image = base_rois + NUM_DISTILL
        try:
            fns["stock"]()
        finally:
            stock.roi_heads.batch_size_per_image = base_rois

    fns["stock_same_rois"] = stock_same_rois
    # Warm-up step of each, counting the RoIs through the box head(s) (both images).
    rois = {}
    for name, fn in fns.items():
        hooks = count_box_head_rois(stock if name.startswith("stock") else models[name], rois, name)
        fn()
        for h in hooks:
            h.remove()
    medians = round_robin(fns, repeats, device, warmup=0)
    for m in models.values():
        m.eval()
    return {n: 1000 * t for n, t in medians.items()}, rois


def bench_vocabulary(vild, clip_path, tmp, quick, skip_vit, device):
    names = builtin_vocabulary("lvis").names
    templates = load_templates()
    out = {}
    # Cold: the 1203 names x 63 templates through the tiny CLIP (tokenising included).
    subset = names[:60] if quick else names
    # The model's own cache dir: the full run's cold build is then the model's first "lvis".
    cache_dir = vild.text_encoder.cache_dir
    encoder = TextEncoder(clip_path, templates=templates, cache_dir=str(cache_dir), device=device)
    encoder.model  # load CLIP outside the timing
    start = time.perf_counter()
    encoder.encode(subset)
    cold = (time.perf_counter() - start) * 1000 * len(names) / len(subset)
    out["cold_1203"] = cold
    out["cold_1203_clip"] = "tiny random CLIP (1 layer, width 64)"
    if len(subset) < len(names):
        out["cold_1203_scaled_from_names"] = len(subset)
    # Cached switch: the model's own set_vocabulary, embeddings from the disk cache.
    pair = [subset[:10], "voc"] if quick else ["lvis", "coco"]
    out["cached_switch_between"] = ["10 names" if quick else "lvis", pair[1]]
    for spec in pair:  # first builds (fill the cache)
        vild.set_vocabulary(spec)
    times = []
    for spec in pair * (3 if quick else 10):
        start = time.perf_counter()
        vild.set_vocabulary(spec)
        times.append(time.perf_counter() - start)
    out["cached_switch"] = 1000 * statistics.median(times)
    last = vild.vocabulary
    times = []
    for _ in range(20):  # ViLDPredictor's in-memory LRU hit: only the buffers change
        start = time.perf_counter()
        vild.set_vocabulary(last)
        times.append(time.perf_counter() - start)
    out["cached_switch_in_memory"] = 1000 * statistics.median(times)
    if not skip_vit:
        out.update(_vit_b_32_text(names, templates, device))
    return out


def _vit_b_32_text(names, templates, device, num_names=4):
    """ViT-B/32's text tower (random weights): tokenise + encode a few names' prompts, scaled."""
    torch.manual_seed(0)
    model = clip.model.CLIP(**VIT_B_32).to(device).eval()
    prompts = [p for n in names[:num_names] for p in fill_prompts(n, templates)]
    with torch.no_grad():
        model.encode_text(clip.tokenize(prompts[:8]).to(device))  # warm-up
        _sync(device)
        start = time.perf_counter()
        model.encode_text(clip.tokenize(prompts).to(device))
        _sync(device)
    seconds = time.perf_counter() - start
    return {
        "cold_1203_vit_b_32_scaled": 1000 * seconds * len(names) / num_names,
        "cold_1203_vit_b_32_note": f"measured on {num_names} names ({len(prompts)} prompts), "
        "scaled linearly to 1203; random weights",
    }


def bench_crops(images, quick, skip_vit, clip_path, repeats, device):
    """Crops of M boxes at scales (1.0, 1.5): fast (one RoIAlign) vs reference (PIL + CLIP
    preprocess per crop); cosine of their CLIP embeddings per box."""
    from vild_d2.distill import encode_crops, fast_crops, reference_crops

    rgb = np.ascontiguousarray(images[0][:, :, ::-1])
    h, w = rgb.shape[:2]
    g = torch.Generator().manual_seed(0)
    m = 8 if quick else 300  # 300 = ViLD's proposals per image
    # Proposal-like boxes: log-uniform width and height from 16 px to 80% of the image.
    lo, hi = math.log(16), math.log(0.8 * min(w, h))
    wh = torch.exp(lo + (hi - lo) * torch.rand(m, 2, generator=g))
    xy = torch.rand(m, 2, generator=g) * (torch.tensor([w, h]) - wh)
    boxes = torch.cat([xy, xy + wh], 1)
    if quick or skip_vit:
        model, _ = clip.load(clip_path, device=device, jit=False)
        model, label = model.float().eval(), "tiny random CLIP"
    else:
        torch.manual_seed(0)
        model, label = clip.model.CLIP(**VIT_B_32).to(device).eval(), "ViT-B/32 (random weights)"
    size = model.visual.input_resolution
    image_chw = torch.as_tensor(rgb.transpose(2, 0, 1).copy()).to(device)
    pil = Image.fromarray(rgb)
    out = {}
    fns = {
        "fast": lambda: fast_crops(image_chw, boxes, size=size),
        "reference": lambda: reference_crops(pil, boxes, size=size),
    }
    medians = round_robin(fns, repeats, device)
    out = {"crops_per_s": {n: 2 * m / t for n, t in medians.items()}}
    # ViT-B/32 on a CPU encodes ~7 crops/s: the agreement is measured on the first 32 boxes.
    sub = boxes[:32]
    fast = encode_crops(model, fast_crops(image_chw, sub, size=size), num_scales=2)
    ref = encode_crops(model, reference_crops(pil, sub, size=size).to(device), num_scales=2)
    out["min_cosine_fast_vs_reference"] = float((fast * ref).sum(dim=1).min())
    out["crops_note"] = (
        f"{m} proposal-like boxes x 2 scales at {size}x{size}, image {w}x{h}; cosine on "
        f"{len(sub)} of them: {label}"
    )
    return out


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.size = args.size or (96 if args.quick else 512)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    # One thread in quick mode: on a shared, busy CPU two threads that wait for each other
    # made single steps up to 10x slower and the numbers useless.
    torch.set_num_threads(args.threads or (1 if args.quick else torch.get_num_threads()))
    start = time.perf_counter()
    images = photos(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models, clip_path = build_models(args, tmp)
        n_params = sum(p.numel() for p in models["vild"].parameters())
        match_stock_classifier(models["stock"], models["vild"], [inference_input(images[0])])
        print("inference ...", flush=True)
        inference_ms, detections = bench_inference(
            models, images[:2] if args.quick else images, args.repeats, args.device
        )
        print("training step ...", flush=True)
        train_ms, rois = bench_training(models, images, args.repeats, args.device)
        print("vocabulary ...", flush=True)
        vocab = bench_vocabulary(
            models["vild"], clip_path, tmp, args.quick, args.skip_vit or args.quick, args.device
        )
        print("crops ...", flush=True)
        crops = bench_crops(
            images, args.quick, args.skip_vit, clip_path, max(args.repeats, 3), args.device
        )
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({args.device})"
    result = {
        "device": device,
        "inference_ms": {k: inference_ms[k] for k in ("stock", "vild", "vild_ensemble")},
        "train_step_ms": {k: train_ms[k] for k in ("stock", "vild", "vild_ensemble")},
        "vocabulary_ms": {k: vocab[k] for k in ("cold_1203", "cached_switch")},
        "crops_per_s": crops["crops_per_s"],
        "min_cosine_fast_vs_reference": crops["min_cosine_fast_vs_reference"],
        "ratios": {
            "inference_vild_vs_stock": inference_ms["vild"] / inference_ms["stock"],
            "inference_ensemble_vs_stock": inference_ms["vild_ensemble"] / inference_ms["stock"],
            "train_vild_vs_stock_same_rois": train_ms["vild"] / train_ms["stock_same_rois"],
            "train_vild_vs_stock": train_ms["vild"] / train_ms["stock"],
            "train_ensemble_vs_stock": train_ms["vild_ensemble"] / train_ms["stock"],
            "crops_fast_vs_reference": crops["crops_per_s"]["fast"]
            / crops["crops_per_s"]["reference"],
        },
        "train_step_ms_same_rois": {"stock": train_ms["stock_same_rois"], "vild": train_ms["vild"]},
        "vocabulary_extra": {
            k: v for k, v in vocab.items() if k not in ("cold_1203", "cached_switch")
        },
        "detections_per_image_last": detections,
        "setup": {
            "model": "toy R18-FPN (configs/Toy)"
            if args.quick
            else "R50-FPN Mask R-CNN (configs/Base-ViLD-RCNN-FPN.yaml)",
            "parameters_vild": n_params,
            "image_short_side": args.size,
            "images": "skimage astronaut, coffee, chelsea, rocket",
            "classes": 1203,
            "train_batch": 2,
            "sampled_rois_per_image": models["stock"].roi_heads.batch_size_per_image,
            "box_head_rois_per_train_step": rois,
            "distill_boxes_per_image": NUM_DISTILL,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "quick": args.quick,
            "torch": torch.__version__,
            "crops": crops["crops_note"],
            "wall_s": round(time.perf_counter() - start, 1),
        },
    }
    Path(args.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).expanduser().write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
