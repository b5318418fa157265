"""The benchmarks of ``tools/benchmark.py``: ViLD against stock detectron2 Mask R-CNN, side by
side in one process.

Every candidate of a task is timed in turns with the others (:func:`round_robin`), after a
warm-up, on the same inputs and thread count; the results are medians and ratios of medians
measured in the same run, never a speed asserted against a fixed number.

All models share one architecture (backbone, RPN, box head, mask head, class-agnostic box
regression and masks, 1203 LVIS classes) and the same weights where they have the same parts;
they differ only in the classifier: stock = a learned linear layer over 1203+1 classes,
ViLD = cosine similarity to 1203 text embeddings + a background embedding. Weights are random
(nothing can be downloaded here): speed does not depend on them, but the score- and
proposal-dependent work does, so :func:`build_models` makes it alike for all models.

The tasks, each a function of a :class:`BenchmarkSetup` returning its sections of the JSON
report (``docs/benchmarks/cpu_2core.json`` shows the whole layout):

* :func:`benchmark_inference`: per-image inference of stock, ViLD and ViLD-ensemble.
* :func:`benchmark_train`: a training step (batch 2), also stock with ViLD's RoI count.
* :func:`benchmark_vocabulary`: building the text classifier and switching vocabularies.
* :func:`benchmark_crops`: distillation crops, fast vs reference, and their CLIP agreement.

Scale-out tasks, not part of ``all`` (:data:`SCALE_TASKS`, ``--task`` only):

* :func:`benchmark_train_processes`: training iterations/s in 1 and 2 processes.
* :func:`benchmark_precompute`: the CLIP-targets job end to end vs the CLIP forward alone.
"""

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import clip
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from PIL import Image

from ..config import load_config
from ..data.categories import builtin_vocabulary
from ..distill import encode_crops, fast_crops, reference_crops
from ..text import (
    VIT_B_32,
    TextEncoder,
    Vocabulary,
    build_clip,
    fill_prompts,
    load_clip,
    load_templates,
)

__all__ = [
    "TASKS",
    "BenchmarkSetup",
    "round_robin",
    "build_models",
    "benchmark_inference",
    "benchmark_train",
    "benchmark_vocabulary",
    "benchmark_crops",
    "SCALE_TASKS",
    "record_training",
    "train_in_processes",
    "benchmark_train_processes",
    "benchmark_precompute",
]

TASKS = ("inference", "train", "vocabulary", "crops")
NUM_CLASSES = 1203  # LVIS v1
NUM_DISTILL = 300  # distillation boxes per image (the paper's)
EMBED_DIM = 512  # CLIP ViT-B/32's embedding width: the vocabularies and targets have it

# A tiny text and image tower with ViT-B/32's 512-d output, so its vocabularies fit the models.
TINY_CLIP = dict(
    embed_dim=EMBED_DIM, image_resolution=32, vision_layers=1, vision_width=64,
    vision_patch_size=16, transformer_width=64, transformer_layers=1,
)  # fmt: skip
TINY_CLIP_LABEL = "tiny random CLIP (1 layer, width 64)"

FULL_CONFIG = "configs/Base-ViLD-RCNN-FPN.yaml"
FULL_MODEL = "R50-FPN Mask R-CNN (configs/Base-ViLD-RCNN-FPN.yaml)"
QUICK_CONFIG = "configs/Shapes/Base-Shapes-R18-FPN.yaml"
QUICK_MODEL = "shapes R18-FPN, tiny heads (configs/Shapes/Base-Shapes-R18-FPN.yaml + QUICK_OPTS)"
# The shapes model at the tests' size (tests/tiny_world.py: TINY_OPTS): small heads and few
# test proposals, so that --quick stays a smoke run of a few seconds.
QUICK_OPTS = [
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "400", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    # Enough training proposals for the same-RoI-count stock run (64 + 300 RoIs per image).
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "1000", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "500",
    "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
    "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "TEST.DETECTIONS_PER_IMAGE", "50",
]  # fmt: skip
PHOTOS = "skimage astronaut, coffee, chelsea, rocket"


# ---------------------------------------------------------------------------------------------
# Timing
def _sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer stops after it, not when it is queued."""
    if device == "cuda":
        torch.cuda.synchronize()


def round_robin(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    device: str = "cpu",
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, float]:
    """
    ``{name: median seconds}`` of each fn: all run ``warmup`` times, then ``repeats`` rounds
    in which each runs once, in turn. Taking turns spreads a busy machine's slow spells over
    all candidates alike, so their ratios stay meaningful where absolute times are not.
    """
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median milliseconds of ``runs`` calls of ``fn`` (a measure without a rival)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Inputs
def photos(size: int) -> List[np.ndarray]:
    """Four real photos (BGR uint8), short side resized to ``size``: real images give the RPN
    and the heads realistic work, and scikit-image ships them (nothing to download)."""
    import cv2
    from skimage import data as skdata

    out = []
    for rgb in (skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()):
        h, w = rgb.shape[:2]
        s = size / min(h, w)
        out.append(cv2.resize(rgb[:, :, ::-1], (round(w * s), round(h * s))))
    return out


def inference_input(bgr: np.ndarray) -> dict:
    """detectron2's model input for a BGR image, at its own size."""
    image = torch.as_tensor(np.ascontiguousarray(bgr.transpose(2, 0, 1)))
    return {"image": image, "height": bgr.shape[0], "width": bgr.shape[1]}


def _random_boxes(n: int, w: int, h: int, g: torch.Generator) -> torch.Tensor:
    """(n, 4) XYXY boxes at least 16 px wide and high, inside a (w, h) image."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
    return torch.cat([xy, xy + wh], 1)


def training_input(bgr: np.ndarray, seed: int, num_gt: int = 6) -> dict:
    """A training dict: the photo, ``num_gt`` random gt boxes with box-shaped masks over
    NUM_CLASSES classes, and NUM_DISTILL random distillation boxes with random targets."""
    g = torch.Generator().manual_seed(seed)
    h, w = bgr.shape[:2]
    gt = Instances((h, w))
    gt.gt_boxes = Boxes(_random_boxes(num_gt, w, h, g))
    gt.gt_classes = torch.randint(0, NUM_CLASSES, (num_gt,), generator=g)
    masks = torch.zeros(num_gt, h, w, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(gt.gt_boxes.tensor.int().tolist()):
        masks[k, y0:y1, x0:x1] = True
    gt.gt_masks = BitMasks(masks)
    distill = Instances((h, w))
    distill.boxes = Boxes(_random_boxes(NUM_DISTILL, w, h, g))
    distill.embeddings = torch.randn(NUM_DISTILL, EMBED_DIM, generator=g)
    return {**inference_input(bgr), "instances": gt, "distill": distill}


def proposal_like_boxes(m: int, w: int, h: int, seed: int = 0) -> torch.Tensor:
    """(m, 4) XYXY boxes inside a (w, h) image, width and height log-uniform from 16 px to 80%
    of the short side (as RPN proposals spread over scales)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(16), math.log(0.8 * min(w, h))
    wh = torch.exp(lo + (hi - lo) * torch.rand(m, 2, generator=g))
    xy = torch.rand(m, 2, generator=g) * (torch.tensor([w, h]) - wh)
    return torch.cat([xy, xy + wh], 1)


def save_clip(path, seed: int = 0, **dims) -> str:
    """A random-weight CLIP of ``dims`` (see :func:`vild_d2.text.build_clip`) saved where
    ``clip.load`` reads it, as the configs and the text encoder want a checkpoint path."""
    torch.manual_seed(seed)
    torch.save(build_clip(**dims).state_dict(), str(path))
    return str(path)


def save_random_vocabulary(path, names: Sequence[str], dim: int = EMBED_DIM) -> str:
    """A vocabulary of ``names`` with random unit embeddings, saved: the models' training and
    test vocabulary, so that building them encodes nothing."""
    g = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(len(names), dim, generator=g), dim=1)
    Vocabulary(names, embeddings).save(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Models
def model_opts(
    quick: bool,
    device: str,
    size: int,
    score_thresh: float,
    clip_path: str,
    vocabulary: str,
    cache_dir: str,
) -> List[str]:
    """The config overrides every model of the benchmark shares: the tiny CLIP, ``vocabulary``
    (a saved file) for training and test, test images of short side ``size``."""
    opts = [
        "MODEL.DEVICE", device,
        "MODEL.WEIGHTS", "",
        "MODEL.VILD.CLIP_MODEL", clip_path,
        "MODEL.VILD.EMBEDDING_CACHE_DIR", cache_dir,
        "MODEL.VILD.TRAIN_VOCABULARY", vocabulary,
        "MODEL.VILD.TEST_VOCABULARY", vocabulary,
        # Inputs are made here, not loaded: no datasets, no distillation stores.
        "MODEL.VILD.DISTILL.STORES", "()", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size * 2),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(score_thresh),
    ]  # fmt: skip
    if quick:
        return opts + QUICK_OPTS
    return opts + ["MODEL.BACKBONE.FREEZE_AT", "2"]  # detectron2's default for R50 training


def build_vild(config_file: str, opts: Sequence[str], variant: str = "vild"):
    """A ViLD model (eval mode) of ``variant``, seeded so every build starts alike."""
    torch.manual_seed(0)
    model = build_model(load_config(config_file, [*opts, "MODEL.VILD.VARIANT", variant]))
    return model.eval()


def build_stock(config_file: str, opts: Sequence[str]):
    """detectron2's own Mask R-CNN (eval mode) of the same config, over NUM_CLASSES + 1."""
    stock_opts = [
        *opts,
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES),
    ]  # fmt: skip
    torch.manual_seed(0)
    return build_model(load_config(config_file, stock_opts)).eval()


@torch.no_grad()
def zero_rpn_deltas(model) -> None:
    """Random RPN deltas on a randomly initialised ResNet are huge: the proposals collapse to a
    few dozen clipped boxes and the RoI heads get almost no work. With zero deltas the
    proposals are the anchors, as many as a trained RPN gives."""
    model.proposal_generator.rpn_head.anchor_deltas.weight.zero_()
    model.proposal_generator.rpn_head.anchor_deltas.bias.zero_()


@torch.no_grad()
def copy_text_branch_to_image_branch(ensemble) -> None:
    """ViLD-ensemble's image branch := its text branch, so its scores are as peaked as ViLD's
    (a random image branch gives ~1/K everywhere and nearly no detections to process)."""
    heads = ensemble.roi_heads
    heads.image_box_head.load_state_dict(heads.box_head.state_dict())
    heads.image_projection.load_state_dict(heads.box_predictor.cls_score.projection.state_dict())


@torch.no_grad()
def match_stock_classifier(stock, vild, inputs: List[dict]) -> None:
    """
    Set stock's linear classifier to the linear map closest to ViLD's cosine classifier, so
    both give similar score distributions and their score-dependent post-processing (NMS, mask
    head on the detections) does similar work: W = E P / (T s), b = E p / (T s), with E the unit
    (K+1, D) class embeddings (background last), P, p ViLD's projection, T its temperature and
    s the mean norm of P x + p over the RoI features x of ``inputs``. ``vild`` in eval mode.
    """
    classifier = vild.roi_heads.box_predictor.cls_score
    heads = vild.roi_heads
    images = vild.preprocess_image(inputs)
    features = vild.backbone(images.tensor)
    proposals, _ = vild.proposal_generator(images, features)
    pooled = heads.box_pooler(
        [features[f] for f in heads.box_in_features], [p.proposal_boxes for p in proposals]
    )
    projection = classifier.projection
    scale = classifier.temperature * projection(heads.box_head(pooled)).norm(dim=1).mean()
    classes = F.normalize(classifier.class_embeddings(), dim=1)  # eval: test vocabulary + bg
    stock_score = stock.roi_heads.box_predictor.cls_score
    stock_score.weight.copy_(classes @ projection.weight / scale)
    stock_score.bias.copy_(classes @ projection.bias / scale)


def build_models(config_file: str, opts: Sequence[str], vild, image: np.ndarray) -> dict:
    """``{"stock", "vild", "vild_ensemble"}`` in eval mode, alike where they can be (see the
    functions called); ``vild`` from :func:`build_vild`, whose RPN deltas are zeroed here."""
    zero_rpn_deltas(vild)
    ensemble = build_vild(config_file, opts, "ensemble")
    ensemble.load_state_dict(vild.state_dict(), strict=False)
    copy_text_branch_to_image_branch(ensemble)
    stock = build_stock(config_file, opts)
    # Same weights where the parts are the same (backbone, RPN, box head, box deltas, masks).
    ours = stock.state_dict()
    stock.load_state_dict({k: v for k, v in vild.state_dict().items() if k in ours}, strict=False)
    match_stock_classifier(stock, vild, [inference_input(image)])
    return {"stock": stock, "vild": vild, "vild_ensemble": ensemble}


# ---------------------------------------------------------------------------------------------
# What the tasks share
class BenchmarkSetup:
    """
    The options and inputs every task shares: the photos, a random tiny CLIP and a random
    1203-class vocabulary saved under ``workdir``, and the models, built on first use (the
    crops task needs none, the vocabulary task only ViLD).
    """

    def __init__(
        self,
        workdir,
        *,
        quick: bool = False,
        device: str = "cpu",
        size: int = 512,
        repeats: int = 3,
        score_thresh: float = 0.05,
        skip_vit: bool = False,
    ):
        """
        Args:
            workdir: an empty folder for the CLIP, the vocabulary and the embedding cache.
            quick: the small shapes model and no ViT-B/32 (a smoke run of a few seconds).
            size: short side of the photos.
            repeats: timed rounds per measure.
            score_thresh: test score threshold of all models.
            skip_vit: no ViT-B/32 (random weights) measures.
        """
        workdir = Path(workdir)
        self.quick, self.device, self.size, self.repeats = quick, device, size, repeats
        # ViT-B/32 is slow on a CPU: the quick run uses the tiny CLIP everywhere.
        self.use_vit = not (quick or skip_vit)
        self.images = photos(size)
        self.clip_path = save_clip(workdir / "tiny_clip.pt", **TINY_CLIP)
        vocabulary = save_random_vocabulary(
            workdir / "lvis_random.pth", builtin_vocabulary("lvis").names
        )
        self.config_file = QUICK_CONFIG if quick else FULL_CONFIG
        self.opts = model_opts(
            quick, device, size, score_thresh, self.clip_path, vocabulary, str(workdir / "cache")
        )
        self._vild = None
        self._models = None

    @property
    def vild(self):
        """The ViLD model (eval mode)."""
        if self._vild is None:
            self._vild = build_vild(self.config_file, self.opts)
        return self._vild

    @property
    def models(self) -> dict:
        """``{"stock", "vild", "vild_ensemble"}`` (eval mode), see :func:`build_models`."""
        if self._models is None:
            self._models = build_models(self.config_file, self.opts, self.vild, self.images[0])
        return self._models

    def describe(self) -> dict:
        """The report's ``setup`` entries every task shares."""
        out = {"model": QUICK_MODEL if self.quick else FULL_MODEL}
        if self._vild is not None:
            out["parameters_vild"] = sum(p.numel() for p in self._vild.parameters())
        out.update(
            image_short_side=self.size,
            images=PHOTOS,
            classes=NUM_CLASSES,
            distill_boxes_per_image=NUM_DISTILL,
            repeats=self.repeats,
            quick=self.quick,
            torch=torch.__version__,
        )
        return out


# ---------------------------------------------------------------------------------------------
# Inference
def benchmark_inference(setup: BenchmarkSetup) -> dict:
    """Milliseconds per image (batch 1) of each model, their ratios, and each model's
    detections on the last image (to show the models did alike work)."""
    models = setup.models
    images = setup.images[:2] if setup.quick else setup.images
    inputs = [inference_input(im) for im in images]
    detections = {}

    def infer(name):
        @torch.no_grad()
        def fn():
            for x in inputs:
                detections[name] = len(models[name]([x])[0]["instances"])

        return fn

    seconds = round_robin({n: infer(n) for n in models}, setup.repeats, setup.device)
    ms = {n: 1000 * t / len(inputs) for n, t in seconds.items()}
    return {
        "inference_ms": ms,
        "ratios": {
            "inference_vild_vs_stock": ms["vild"] / ms["stock"],
            "inference_ensemble_vs_stock": ms["vild_ensemble"] / ms["stock"],
        },
        "detections_per_image_last": detections,
    }


# ---------------------------------------------------------------------------------------------
# Training
def train_step(model, batch: List[dict]) -> Callable[[], None]:
    """One forward + backward + SGD step of ``model`` on ``batch``; lr 0 keeps the weights."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def step():
        with EventStorage():  # detectron2's heads log to it in training
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()

    return step


def with_rois_per_image(stock, rois: int, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with stock's RoI heads sampling ``rois`` RoIs per image."""

    def fn():
        base = stock.roi_heads.batch_size_per_image
        stock.roi_heads.batch_size_per_image = rois
        try:
            step()
        finally:
            stock.roi_heads.batch_size_per_image = base

    return fn


def count_box_head_rois(model, fn: Callable[[], None]) -> int:
    """Run ``fn`` and return how many RoIs went through ``model``'s box head(s)."""
    count = 0

    def hook(module, inputs, output):
        nonlocal count
        count += inputs[0].shape[0]

    heads = [model.roi_heads.box_head, getattr(model.roi_heads, "image_box_head", None)]
    handles = [h.register_forward_hook(hook) for h in heads if h is not None]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return count


@contextlib.contextmanager
def training_mode(models):
    """The models in train mode inside, back in eval mode after."""
    for m in models:
        m.train()
    try:
        yield
    finally:
        for m in models:
            m.eval()


def benchmark_train(setup: BenchmarkSetup) -> dict:
    """
    Milliseconds of a training step (batch 2) of each model, ViLD with NUM_DISTILL
    distillation boxes per image through its box head; ``stock_same_rois`` is stock sampling
    that many more RoIs per image, so the same number of RoIs goes through its box head
    (reported in ``box_head_rois_per_train_step``, counted in the warm-up step).
    """
    models = setup.models
    stock = models["stock"]
    batch = [training_input(im, seed=i) for i, im in enumerate(setup.images[:2])]
    sampled = stock.roi_heads.batch_size_per_image
    steps = {n: train_step(m, batch) for n, m in models.items()}
    steps["stock_same_rois"] = with_rois_per_image(stock, sampled + NUM_DISTILL, steps["stock"])
    owner = {**models, "stock_same_rois": stock}
    with training_mode(models.values()):
        rois = {n: count_box_head_rois(owner[n], step) for n, step in steps.items()}  # warm-up
        seconds = round_robin(steps, setup.repeats, setup.device, warmup=0)
    ms = {n: 1000 * t for n, t in seconds.items()}
    return {
        "train_step_ms": {n: ms[n] for n in models},
        "ratios": {
            "train_vild_vs_stock_same_rois": ms["vild"] / ms["stock_same_rois"],
            "train_vild_vs_stock": ms["vild"] / ms["stock"],
            "train_ensemble_vs_stock": ms["vild_ensemble"] / ms["stock"],
        },
        "train_step_ms_same_rois": {"stock": ms["stock_same_rois"], "vild": ms["vild"]},
        "setup": {
            "train_batch": len(batch),
            "sampled_rois_per_image": sampled,
            "box_head_rois_per_train_step": rois,
        },
    }


# ---------------------------------------------------------------------------------------------
# Vocabulary
def time_cold_encoding(encoder: TextEncoder, names: Sequence[str], num_names: int) -> float:
    """Milliseconds to encode all ``names`` with ``encoder`` (tokenising included), measured on
    the first ``num_names`` and scaled linearly; CLIP is loaded before the timing."""
    encoder.model  # loads CLIP
    start = time.perf_counter()
    encoder.encode(names[:num_names])
    return (time.perf_counter() - start) * 1000 * len(names) / num_names


def time_cached_switch(vild, specs: Sequence, rounds: int) -> float:
    """Median milliseconds of ``vild.set_vocabulary`` between ``specs`` once each is in the
    disk cache (the first builds fill it)."""
    for spec in specs:
        vild.set_vocabulary(spec)
    times = []
    for spec in list(specs) * rounds:
        start = time.perf_counter()
        vild.set_vocabulary(spec)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_vit_b_32_text(names: Sequence[str], templates, device: str, num_names: int = 4) -> dict:
    """ViT-B/32's text tower (random weights): tokenise + encode ``num_names`` names' prompts,
    scaled linearly to all ``names`` (the whole set takes about an hour on a CPU)."""
    torch.manual_seed(0)
    model = build_clip(**VIT_B_32).to(device).eval()
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
        f"scaled linearly to {len(names)}; random weights",
    }


_ENCODE_NAMES = """
import re, sys, time
import vild_d2
from vild_d2.text import TextEncoder
clip_path, n = sys.argv[1], int(sys.argv[2])
encoder = TextEncoder(clip_path, cache_dir=None)
encoder.model  # loaded before the timing
start = time.perf_counter()
encoder.encode([f"class number {i}" for i in range(n)])
seconds = time.perf_counter() - start
status = open("/proc/self/status").read()
print(seconds, int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)) / 1024)
"""


def vocabulary_scaling(clip_path: str, sizes: Sequence[int]) -> dict:
    """
    Building vocabularies of ``sizes`` names (x the 63 templates), each in a fresh process so
    that its peak memory is its own: {n: {"names_per_s", "peak_mib"}} (peak = the process's
    VmHWM, Linux only; CLIP and torch included). Cost per name should be flat and the peak
    should not grow with n (prompts are made and encoded a batch at a time).
    """
    out = {}
    for n in sizes:
        result = subprocess.run(
            [sys.executable, "-c", _ENCODE_NAMES, clip_path, str(n)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        seconds, peak = map(float, result.stdout.split()[-2:])
        out[str(n)] = {"names_per_s": n / seconds, "peak_mib": peak}
    return out


def benchmark_vocabulary(setup: BenchmarkSetup) -> dict:
    """
    Building the text classifier: the 1203 LVIS names x the 63 prompt templates encoded cold
    with the tiny CLIP (quick: 60 names, scaled) and, unless skipped, ViT-B/32's text tower;
    switching ViLD's vocabulary from the disk cache (``lvis`` <-> ``coco``; quick: 10 names <->
    ``voc``) and in memory. ViLD's vocabulary is restored afterwards.
    """
    vild = setup.vild
    names = builtin_vocabulary("lvis").names
    templates = load_templates()
    # The model's own cache: the full run's cold build is then the model's first "lvis".
    cache_dir = vild.text_encoder.cache_dir
    encoder = TextEncoder(
        setup.clip_path, templates=templates, cache_dir=str(cache_dir), device=setup.device
    )
    num_names = 60 if setup.quick else len(names)
    pair = [names[:10], "voc"] if setup.quick else ["lvis", "coco"]
    original = vild.vocabulary
    try:
        cold = time_cold_encoding(encoder, names, num_names)
        cached = time_cached_switch(vild, pair, rounds=3 if setup.quick else 10)
        # ViLDPredictor's in-memory LRU hit: only the classifier's buffers change.
        last = vild.vocabulary
        in_memory = _median_ms(lambda: vild.set_vocabulary(last), runs=20)
    finally:
        vild.set_vocabulary(original)
    extra = {"cold_1203_clip": TINY_CLIP_LABEL}
    if num_names < len(names):
        extra["cold_1203_scaled_from_names"] = num_names
    extra["cached_switch_between"] = ["10 names" if setup.quick else "lvis", pair[1]]
    extra["cached_switch_in_memory"] = in_memory
    if setup.use_vit:
        extra.update(time_vit_b_32_text(names, templates, setup.device))
    if os.path.exists("/proc/self/status"):  # peak memory is read from Linux's /proc
        sizes = (50, 200) if setup.quick else (1000, 10000)
        extra["build_scaling_tiny_clip"] = vocabulary_scaling(setup.clip_path, sizes)
    return {
        "vocabulary_ms": {"cold_1203": cold, "cached_switch": cached},
        "vocabulary_extra": extra,
    }


# ---------------------------------------------------------------------------------------------
# Crops
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
    boxes = proposal_like_boxes(m, w, h)
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
        ref = encode_crops(model, ref, num_scales=2)
    return {
        "crops_per_s": per_s,
        "min_cosine_fast_vs_reference": float((fast * ref).sum(dim=1).min()),
        "ratios": {"crops_fast_vs_reference": per_s["fast"] / per_s["reference"]},
        "setup": {
            "crops": f"{m} proposal-like boxes x 2 scales at {size}x{size}, image {w}x{h}; "
            f"cosine on {len(sub)} of them: {label}"
        },
    }


# ---------------------------------------------------------------------------------------------
# Scale-out: training in several processes, the precompute stage end to end
# Not part of "all" (TASKS): each starts processes or writes stores, and has its own sections.
SCALE_TASKS = ("train_processes", "precompute")
# The training script of :func:`train_in_processes`, run as ``python -c``: a fresh interpreter
# owns the process group, whatever state the caller is in.
_TRAIN_MAIN = """
import json, sys
import vild_d2
from datetime import timedelta
from vild_d2.engine import launch
from vild_d2.utils.benchmark import record_training
runs, out, n, timeout = json.loads(sys.argv[1])
launch(record_training, n, dist_url="auto", args=(runs, out), timeout=timedelta(seconds=timeout))
"""


def record_training(runs: Dict[str, list], out: str) -> None:
    """
    ``launch`` main function: train each run ``{name: [config_file, opts]}`` in turn with
    :class:`vild_d2.engine.Trainer`, seeded as ``default_setup`` seeds (SEED + rank), and write
    rank 0's record of every step to ``out`` (JSON): ``{name: {"losses": {key: [per step]},
    "step_s": [...], "output_dir": ...}}``. The losses are detectron2's logged ones: each
    process's, averaged over the processes.
    """
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from ..engine.trainer import Trainer, check_same_config

    record = {}
    for name, (config_file, opts) in runs.items():
        cfg = load_config(config_file, opts)
        check_same_config(cfg)
        seed_all_rng(cfg.SEED + comm.get_rank())
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        if comm.is_main_process():
            history = trainer.storage.histories()
            record[name] = {
                "losses": {
                    k: [v for v, _ in h.values()]
                    for k, h in history.items()
                    if k.startswith("loss") or k == "total_loss"
                },
                # detectron2's IterationTimer: seconds per step after its 3 warm-up steps.
                "step_s": [v for v, _ in history["time"].values()] if "time" in history else [],
                "output_dir": cfg.OUTPUT_DIR,
            }
        comm.synchronize()
    if comm.is_main_process():
        Path(out).write_text(json.dumps(record, indent=1))


def train_in_processes(
    runs: Dict[str, list], num_processes: int, out, *, env=None, timeout: float = 600
) -> dict:
    """:func:`record_training` in ``num_processes`` processes (``vild_d2.engine.launch``,
    gloo on a CPU), from a fresh interpreter; returns its record."""
    args = json.dumps([runs, str(out), num_processes, timeout])
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN_MAIN, args], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"training in {num_processes} process(es) failed:\n{proc.stderr[-4000:]}"
        )
    return json.loads(Path(out).read_text())


def make_shapes_training(
    workdir, clip_path: str, *, num_train: int, size: int
) -> Tuple[dict, list]:
    """
    A shapes world under ``workdir`` (registered as ``shapes_*`` in processes started with the
    returned environment) with ViLD's distillation store for its training images: a random
    RPN's proposals and the CLIP's targets, made by the project's precompute jobs.

    Returns:
        (environment for the training processes, config overrides that train on it)
    """
    from detectron2.data import DatasetCatalog, DatasetMapper

    from ..data.datasets.shapes import WorldSpec, generate_shapes_world, register_shapes_world
    from ..distill import CLIPTeacher, DistillStore, StoreWriter
    from ..distill.precompute import (
        embeddings_header,
        iter_embeddings,
        iter_proposals,
        proposals_header,
        run_precompute,
    )

    workdir = Path(workdir)
    spec = WorldSpec(num_train=num_train, num_val=2, image_size=size, objects_per_image=(2, 4))
    generate_shapes_world(workdir / "shapes", spec)
    dataset = register_shapes_world(str(workdir), prefix="bench_shapes", folder="shapes")[0]
    dicts = DatasetCatalog.get(dataset)
    m = 40
    common = ["MODEL.VILD.CLIP_MODEL", clip_path,
              "MODEL.VILD.EMBEDDING_CACHE_DIR", str(workdir / "cache")]  # fmt: skip
    rpn_cfg = load_config("configs/Shapes/rpn.yaml", common)
    torch.manual_seed(0)
    rpn = build_model(rpn_cfg).eval()
    header = proposals_header(dataset, len(dicts), chunk_size=4, max_proposals=m, model={})
    run_precompute(
        StoreWriter(str(workdir / "proposals"), header),
        dicts,
        lambda chunks: iter_proposals(rpn, chunks, DatasetMapper(rpn_cfg, False), max_proposals=m),
        progress=False,
    )
    proposals = DistillStore(str(workdir / "proposals"))
    teacher = CLIPTeacher(clip_path)
    header = embeddings_header(
        dataset, len(dicts), chunk_size=4, max_proposals=m,
        teacher_settings=teacher.settings(), proposals=proposals,
    )  # fmt: skip
    run_precompute(
        StoreWriter(str(workdir / "targets"), header),
        dicts,
        lambda chunks: iter_embeddings(teacher, chunks, proposals, max_boxes=m),
        progress=False,
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(workdir))
    opts = [*common, "MODEL.VILD.DISTILL.STORES", f"('{workdir / 'targets'}',)",
            "MODEL.VILD.DISTILL.MAX_BOXES", str(m), "DATASETS.TEST", "()"]  # fmt: skip
    return env, opts


def benchmark_train_processes(
    setup: BenchmarkSetup, extra_runs: Dict[str, list] = None
) -> dict:
    """
    ViLD training iterations/s on the shapes world with the same global batch in 1 process and
    in 2 (gloo on a CPU, NCCL on GPUs), run one after the other in this run: medians of
    detectron2's per-step times after its warm-up. On a CPU each process gets torch's thread
    count divided by the processes, so that both runs use the same cores.

    Args:
        extra_runs: ``{name: config overrides}`` also trained in 2 processes (e.g. SyncBN).
    """
    import tempfile

    quick = setup.quick
    batch, iters = (2, 8) if quick else (4, 23)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        env, opts = make_shapes_training(
            tmp, setup.clip_path, num_train=8 if quick else 24, size=64 if quick else 128
        )
        opts += [
            *(QUICK_OPTS if quick else []),
            "INPUT.MIN_SIZE_TRAIN", "(64,)" if quick else "(128,)",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", setup.device,
            "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.MAX_ITER", str(iters),
            "SOLVER.BASE_LR", "0.0025", "SOLVER.CHECKPOINT_PERIOD", "100000",
        ]  # fmt: skip
        runs = {1: {"vild": []}, 2: {"vild": [], **(extra_runs or {})}}
        records = {}
        for n, named in runs.items():
            run_env = dict(env, OMP_NUM_THREADS=str(max(1, threads // n)))
            todo = {
                name: [
                    "configs/Shapes/vild.yaml", [*opts, *extra, "OUTPUT_DIR", f"{tmp}/{name}{n}"]
                ]
                for name, extra in named.items()
            }
            records[n] = train_in_processes(todo, n, f"{tmp}/record{n}.json", env=run_env)
    per_s = {n: 1.0 / statistics.median(records[n]["vild"]["step_s"]) for n in (1, 2)}
    out = {
        "train_iters_per_s": {"1_process": per_s[1], "2_processes": per_s[2]},
        "ratios": {"train_2_vs_1_processes": per_s[2] / per_s[1]},
        "setup": {
            "train_processes": f"configs/Shapes/vild.yaml, global batch {batch}, {iters} "
            f"iterations (median of the last {iters - 3}); threads: {threads} in 1 process, "
            f"{max(1, threads // 2)} in each of 2"
        },
    }
    for name in extra_runs or {}:
        rec = records[2][name]
        out["train_iters_per_s"][f"{name}_2_processes"] = 1.0 / statistics.median(rec["step_s"])
    return out


def benchmark_precompute(setup: BenchmarkSetup) -> dict:
    """
    The CLIP-targets job end to end (image files read and hashed, crops, CLIP, the store
    written: ``run_precompute`` + ``iter_embeddings``) against the CLIP forward alone on the
    same crops (made beforehand), in crops/s; their ratio is how close the job comes to its
    limit. M proposal-like boxes per photo, scales (1.0, 1.5); M = 300 on a GPU, else 16.
    """
    import tempfile

    import cv2

    from ..distill import CLIPTeacher, StoreWriter
    from ..distill.precompute import embeddings_header, iter_embeddings, run_precompute

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
            images.append(torch.as_tensor(rgb_chw))
            boxes.append(proposal_like_boxes(m, w, h, seed=i))
        proposals = _proposals_store(f"{tmp}/proposals", dicts, boxes)
        teacher = CLIPTeacher(clip_file, device=setup.device)
        size = teacher.input_size
        crops = [
            fast_crops(im.to(setup.device), b, (1.0, 1.5), size) for im, b in zip(images, boxes)
        ]
        runs = iter(range(10**6))

        def end_to_end():
            header = embeddings_header(
                "bench_photos", len(dicts), chunk_size=2, max_proposals=m,
                teacher_settings=teacher.settings(), proposals=proposals,
            )  # fmt: skip
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


def _proposals_store(path: str, dicts: List[dict], boxes: List[torch.Tensor]):
    """A proposals store holding ``boxes`` (zero objectness) for the images of ``dicts``."""
    from ..distill import DistillStore, StoreWriter
    from ..distill.precompute import proposals_header, run_precompute

    m = len(boxes[0])
    header = proposals_header("bench_photos", len(dicts), chunk_size=2, max_proposals=m, model={})
    records = {d["image_id"]: b for d, b in zip(dicts, boxes)}

    def compute(chunks):
        for d in (d for chunk in chunks for d in chunk):
            b = records[d["image_id"]].numpy().astype(np.float32)
            yield d["image_id"], {"boxes": b, "objectness_logits": np.zeros(len(b), np.float32)}

    run_precompute(StoreWriter(path, header), dicts, compute, progress=False)
    return DistillStore(path)
