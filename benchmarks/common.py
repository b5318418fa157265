"""What the benchmarks share: the task names, timing in turns (:func:`round_robin`), the inputs
(real photos, training dicts with random boxes) and Python run in a fresh interpreter
(:func:`run_python`).

Every candidate of a task is timed in turns with the others, after a warm-up, on the same
inputs and thread count; the results are medians and ratios of medians measured in the same
run, never a speed asserted against a fixed number.
"""

import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from vild_d2.data.images import SAMPLE_PHOTOS, sample_photo
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = [
    "TASKS",
    "SCALE_TASKS",
    "ROOT",
    "round_robin",
    "median_ms",
    "sync",
    "photos",
    "inference_input",
    "training_input",
    "proposal_like_boxes",
    "run_python",
]

# The tasks of ``--task all``, and those run only when named: each of the latter starts
# processes, writes stores or serves, and has its own sections of the report.
TASKS = ("inference", "train", "vocabulary", "crops")
SCALE_TASKS = ("train_processes", "precompute")

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/, tools/, benchmarks/
NUM_CLASSES = 1203  # LVIS v1
NUM_DISTILL = 300  # distillation boxes per image (the paper's)
EMBED_DIM = 512  # CLIP ViT-B/32's embedding width: the vocabularies and targets have it
PHOTOS = "skimage " + ", ".join(SAMPLE_PHOTOS)


# ---------------------------------------------------------------------------------------------
# Timing
def sync(device: str) -> None:
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
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn: Callable[[], object], runs: int) -> float:
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
    """Four real photos (BGR uint8, (H, W, 3)), short side resized to ``size``: real images
    give the RPN and the heads realistic work, and scikit-image ships them (no download)."""
    import cv2

    out = []
    for rgb in map(sample_photo, SAMPLE_PHOTOS):
        h, w = rgb.shape[:2]
        s = size / min(h, w)
        out.append(cv2.resize(rgb[:, :, ::-1], (round(w * s), round(h * s))))
    return out


def inference_input(bgr: np.ndarray) -> dict:
    """detectron2's model input for a BGR (H, W, 3) image, at its own size: a (3, H, W)
    uint8 tensor with the height and width."""
    image = torch.as_tensor(np.ascontiguousarray(bgr.transpose(2, 0, 1)))
    return {"image": image, "height": bgr.shape[0], "width": bgr.shape[1]}


def _random_boxes(n: int, w: int, h: int, g: torch.Generator) -> torch.Tensor:
    """(n, 4) XYXY boxes at least 16 px wide and high, inside a (w, h) image."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
    return torch.cat([xy, xy + wh], 1)


def training_input(bgr: np.ndarray, seed: int, num_gt: int = 6) -> dict:
    """A training dict: the photo, ``num_gt`` random gt boxes with box-shaped masks over
    NUM_CLASSES classes, and NUM_DISTILL random distillation boxes with random (EMBED_DIM,)
    targets."""
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


# ---------------------------------------------------------------------------------------------
# Fresh interpreters
def run_python(*args: str, what: str, env: dict = None) -> str:
    """
    ``python ARGS`` (``-m benchmarks.<worker> ...`` or a tool's path) in a fresh interpreter,
    in this working directory; returns its stdout. The repository root leads its PYTHONPATH,
    so that ``benchmarks`` (not installed) and this checkout's ``vild_d2`` import from
    anywhere. A failure is a RuntimeError that names ``what`` and shows the end of stderr.
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout
