#!/usr/bin/env python
"""The GPU checks of docs/DISTRIBUTED.md, in at most ~5 minutes, on a machine without a registry.

    python tools/gpu_check.py --wheels wheels/ --out gpu_check.json

Measures, each as a ratio of medians taken in the same run (benchmarks/, beside tools/):

* crops: the CUDA RoIAlign crop path vs the PIL reference (crops/s);
* clip: a random-weight CLIP of ViT-B/32's size, fp16, crops/s;
* train_fp16: a ViLD training step under fp16 autocast (the tools' AMP), ms;
* inference: ViLD and ViLD-ensemble vs stock Mask R-CNN (R50-FPN), ms per image;
* ddp: with 2 GPUs, training in 2 processes (NCCL, and torch's SyncBatchNorm) vs 1.

Without CUDA every check says "skipped" and the script exits 0 (it runs in the CPU test suite).

The GPU machines have torch and torchvision (for Python 3.12) but no registry: bring the other
packages as wheels. On a machine with a registry, for the GPU machine's Python:

    pip download -d wheels/ --python-version 3.12 --only-binary=:all: \\
        $(python tools/gpu_check.py --print-requirements)
    pip wheel -d wheels/ --no-deps <pb1-detectron2 unpacked as tools/install_detectron2.py does>

(or `pip wheel -d wheels/ --no-deps .` of a detectron2 0.6 source tree). ``--wheels DIR``
installs from DIR with ``pip install --no-index`` before the checks; vild_d2 itself runs from
this checkout.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What vild_d2 imports beyond torch / torchvision, pinned as in requirements.lock; detectron2
# itself comes as a wheel built from its 0.6 sources (the registry has only an sdist).
REQUIREMENTS = [
    "clip-anytorch==2.6.0",
    "fvcore==0.1.5.post20221221",
    "iopath==0.1.9",
    "yacs==0.1.8",
    "pycocotools==2.0.11",
    "lvis==0.5.3",
    "omegaconf==2.3.1",
    "hydra-core==1.3.8",
    "opencv-python-headless==5.0.0.93",
    "scikit-image==0.26.0",
    "ftfy==6.3.1",
    "regex==2026.11.19",
    "tqdm==4.70.1",
    "termcolor==3.3.0",
    "tabulate==0.10.0",
    "portalocker==4.4.2",
    "cloudpickle==3.1.3",
    "matplotlib==3.11.2",
    "antlr4-python3-runtime==4.9.3",
    "setuptools==80.9.0",
]
CHECKS = ("crops", "clip", "train_fp16", "inference", "ddp")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="JSON report")
    p.add_argument("--wheels", default="", help="install the requirements from this folder first")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    p.add_argument("--budget-s", type=float, default=270, help="skip checks after this long")
    p.add_argument("--print-requirements", action="store_true", help="print them and exit")
    return p


def install(wheels: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        wheels,
        "detectron2",
        *REQUIREMENTS,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def check_crops(setup):
    from benchmarks.crops import benchmark_crops

    return benchmark_crops(setup)


def check_clip(setup):
    """Random ViT-B/32 (fp16 autocast) on 256 random crops per forward, crops/s."""
    import torch

    from vild_d2.distill import encode_crops
    from vild_d2.text import VIT_B_32, build_clip
    from benchmarks.common import round_robin

    torch.manual_seed(0)
    model = build_clip(**VIT_B_32).cuda().eval()
    crops = torch.rand(512, 3, 224, 224, device="cuda")
    seconds = round_robin({"vit_b_32": lambda: encode_crops(model, crops, 2, 256)}, 3, "cuda")
    return {"clip_vit_b_32_fp16_crops_per_s": len(crops) / seconds["vit_b_32"]}


def check_train_fp16(setup):
    """A ViLD training step (batch 2) under fp16 autocast with a GradScaler, as AMPTrainer."""
    import torch
    from detectron2.utils.events import EventStorage

    from benchmarks.common import round_robin, training_input

    model = setup.vild
    model.train()
    batch = [training_input(im, seed=i) for i, im in enumerate(setup.images[:2])]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        with EventStorage(), torch.autocast("cuda", dtype=torch.float16):
            loss = sum(model(batch).values())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fp16 step gave loss {loss}")

    try:
        ms = 1000 * round_robin({"vild": step}, 3, "cuda")["vild"]
    finally:
        model.eval()
    return {"train_step_fp16_ms": ms}


def check_inference(setup):
    from benchmarks.inference import benchmark_inference

    return benchmark_inference(setup)


def check_ddp(setup):
    """1 vs 2 processes (NCCL); and the official head's SyncBN (torch's, CUDA only) in 2."""
    import torch

    from benchmarks.train_processes import benchmark_train_processes

    if torch.cuda.device_count() < 2:
        return {"ddp": f"skipped: {torch.cuda.device_count()} GPU"}
    return benchmark_train_processes(
        setup,
        extra_runs={
            "syncbn": [
                "MODEL.ROI_BOX_HEAD.NAME",
                "ViLDConvFCHead",
                "MODEL.ROI_BOX_HEAD.NORM",
                "SyncBN",
                "MODEL.RESNETS.NORM",
                "SyncBN",
                "MODEL.FPN.NORM",
                "SyncBN",
            ]
        },
    )


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.print_requirements:
        print(" ".join(REQUIREMENTS))
        return 0
    if args.wheels:
        install(args.wheels)
    # vild_d2 and vild_d2_runtime from this checkout, installed or not; benchmarks/
    sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]
    import torch

    report = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        report["checks"] = {c: "skipped: no CUDA" for c in args.checks}
    else:
        import vild_d2  # noqa: F401  (compat bridges before detectron2)
        from benchmarks.models import BenchmarkSetup

        report["device"] = torch.cuda.get_device_name()
        report["gpus"] = torch.cuda.device_count()
        report["checks"] = {}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            setup = BenchmarkSetup(tmp, device="cuda", size=512, repeats=3)
            for name in args.checks:
                if time.perf_counter() - start > args.budget_s:
                    report["checks"][name] = f"skipped: over the {args.budget_s:g} s budget"
                    continue
                print(f"{name} ...", flush=True)
                t = time.perf_counter()
                try:
                    report["checks"][name] = globals()[f"check_{name}"](setup)
                except Exception as e:  # a report of every check, whichever fails
                    report["checks"][name] = f"failed: {type(e).__name__}: {e}"
                print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
        report["wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2, default=str)
    Path(args.out).write_text(text)
    print(text)
    failed = [c for c, r in report["checks"].items() if str(r).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
