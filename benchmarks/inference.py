"""The ``inference`` task: milliseconds per image (batch 1) of stock Mask R-CNN, ViLD and
ViLD-ensemble on the same photos, in turns (:func:`~benchmarks.common.round_robin`)."""

import torch

from .common import inference_input, round_robin
from .models import BenchmarkSetup

__all__ = ["benchmark_inference"]


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
