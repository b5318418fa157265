"""The ``train`` task: a training step (batch 2) of stock Mask R-CNN, ViLD and ViLD-ensemble,
and of stock sampling as many RoIs as ViLD puts through its box head."""

import contextlib
from typing import Callable, List

import torch
from detectron2.utils.events import EventStorage

from .common import NUM_DISTILL, round_robin, training_input
from .models import BenchmarkSetup

__all__ = ["benchmark_train"]


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
        count += inputs[0].shape[0]  # the pooled RoI features: (R, C, h, w)

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
