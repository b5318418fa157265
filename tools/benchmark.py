#!/usr/bin/env python
"""Speed of ViLD against stock detectron2 Mask R-CNN, side by side in one process.

    python tools/benchmark.py --out bench.json              # R50-FPN, 512 px: ~9 min on 2 CPUs
    python tools/benchmark.py --out bench.json --quick      # small shapes model, tiny CLIP: < 30 s
    python tools/benchmark.py --out bench.json --task crops # one task
    python tools/benchmark.py --out scale.json --quick --task train_processes  # 1 vs 2 processes
    python tools/benchmark.py --out serve.json --quick --task serve  # tools/serve.py under load
    python tools/benchmark.py --out deploy.json --task deploy  # ONNX runtime vs PyTorch predictor
    python tools/benchmark.py --out grid.json --task deploy \
        --weights output/shapes/vild_ensemble/model_final.pth  # a trained model: the grid

Tasks (``--task``, default ``all``): inference, train, vocabulary, crops; what each measures and
how the models are made to do alike work is in benchmarks/ (one module per task, beside tools/;
not installed with vild_d2). The scale-out tasks train_processes (iterations/s in 1 and 2
processes) and precompute (the CLIP-targets job end to end vs the CLIP forward alone), and serve
(the web server under load) and deploy (vild_d2_runtime vs the PyTorch predictor), run only
when named. The JSON holds the sections of the tasks that
ran (docs/benchmarks/cpu_2core.json: all of them).
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ is not installed with vild_d2: it is found beside tools/, in the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vild_d2  # noqa: F401  (first: compat bridges)
import torch

from benchmarks.common import SCALE_TASKS, TASKS
from benchmarks.crops import benchmark_crops
from benchmarks.deploy import benchmark_deploy, benchmark_deploy_trained
from benchmarks.inference import benchmark_inference
from benchmarks.models import BenchmarkSetup
from benchmarks.precompute import benchmark_precompute
from benchmarks.serve import benchmark_serve
from benchmarks.train import benchmark_train
from benchmarks.train_processes import benchmark_train_processes
from benchmarks.vocabulary import benchmark_vocabulary

BENCHMARKS = {
    "inference": benchmark_inference,
    "train": benchmark_train,
    "vocabulary": benchmark_vocabulary,
    "crops": benchmark_crops,
    # Only when named: the scale-out tasks, the web server under load (benchmarks/serve.py) and
    # the exported model without PyTorch (benchmarks/deploy.py).
    "train_processes": benchmark_train_processes,
    "precompute": benchmark_precompute,
    "serve": benchmark_serve,
    "deploy": benchmark_deploy,
}
# `--task all` runs TASKS (benchmarks/common.py, which the tests read), in this order.
assert tuple(BENCHMARKS) == TASKS + SCALE_TASKS + ("serve", "deploy")

# The report's layout (docs/benchmarks/cpu_2core.json): sections in this order, absent ones
# (of tasks that did not run) left out.
LAYOUT = (
    "device",
    "inference_ms",
    "train_step_ms",
    "vocabulary_ms",
    "crops_per_s",
    "train_iters_per_s",
    "precompute_crops_per_s",
    "min_cosine_fast_vs_reference",
    "ratios",
    "train_step_ms_same_rois",
    "vocabulary_extra",
    "detections_per_image_last",
    "setup",
)
SETUP_LAYOUT = (
    "model",
    "parameters_vild",
    "image_short_side",
    "images",
    "classes",
    "train_batch",
    "sampled_rois_per_image",
    "box_head_rois_per_train_step",
    "distill_boxes_per_image",
    "threads",
    "repeats",
    "quick",
    "torch",
    "crops",
    "wall_s",
)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument(
        "--task",
        default="all",
        choices=["all", *BENCHMARKS],
        help="what to measure (all: every task but the scale-out ones)",
    )
    p.add_argument("--quick", action="store_true", help="small model and tiny CLIP (for tests)")
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
    p.add_argument(
        "--weights",
        default="",
        help="deploy: a trained ViLD-ensemble checkpoint (with --config-file): the grid of "
        "threads x classes x score thresholds x images on it instead of random models",
    )
    p.add_argument(
        "--config-file",
        default="configs/Shapes/vild_ensemble.yaml",
        help="the config of --weights",
    )
    return p


def merge(report: dict, sections: dict) -> None:
    """Add a task's sections to ``report``; sections several tasks fill (ratios, setup) merge."""
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(report.get(key), dict):
            report[key].update(value)
        else:
            report[key] = value


def ordered(d: dict, keys) -> dict:
    """``d`` with ``keys`` first, in that order."""
    return {**{k: d[k] for k in keys if k in d}, **d}


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.weights and args.task != "deploy":
        print("error: --weights is for --task deploy (its grid)", file=sys.stderr)
        return 2
    if args.weights and not Path(args.weights).is_file():
        print(f"error: --weights {args.weights}: no such file", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    # One thread in quick mode: on a shared, busy CPU two threads that wait for each other
    # made single steps up to 10x slower and the numbers useless.
    torch.set_num_threads(args.threads or (1 if args.quick else torch.get_num_threads()))
    start = time.perf_counter()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({args.device})"
    report = {"device": device}
    with tempfile.TemporaryDirectory() as tmp:
        setup = BenchmarkSetup(
            tmp,
            quick=args.quick,
            device=args.device,
            size=args.size or (96 if args.quick else 512),
            repeats=args.repeats or (1 if args.quick else 3),
            score_thresh=args.score_thresh,
            skip_vit=args.skip_vit,
        )
        for task in TASKS if args.task == "all" else [args.task]:
            print(f"{task} ...", flush=True)
            if task == "deploy" and args.weights:
                merge(report, benchmark_deploy_trained(setup, args.config_file, args.weights))
            else:
                merge(report, BENCHMARKS[task](setup))
        described = setup.describe()
        if args.weights:  # the grid's own model, sizes and images (its deploy_extra)
            described = {"model": f"{args.config_file}, {args.weights}", "torch": torch.__version__}
            described["repeats"] = setup.repeats
        merge(report, {"setup": described})
    wall_s = round(time.perf_counter() - start, 1)
    report["setup"].update(threads=torch.get_num_threads(), wall_s=wall_s)
    report = ordered(report, LAYOUT)
    report["setup"] = ordered(report["setup"], SETUP_LAYOUT)
    text = json.dumps(report, indent=2)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
