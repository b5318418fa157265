#!/usr/bin/env python
"""How `make demo`'s slow stages run before and after this round's changes, side by side in
one run, on an existing run's world, teacher and stores (docs/SHAPES.md "Stage times").

    python demo/stage_speed.py --run output/shapes [--teacher-steps 60 --iters 60]

Measures, each way in turn on the same inputs:
  teacher    seconds per step: the whole 49408-row token table, 2 threads (before) / the rows
             the captions use, 2 threads / the same, 1 thread (as it runs beside the RPN)
  detector   seconds per iteration of ViLD-ensemble: 1 process (torch's threads) / 2
             data-parallel processes of 1 thread (tools/train_net.py --num-gpus 2)
  targets    seconds for the CLIP targets of every training image: 1 process / 2 shards at once
and writes them with their ratios to <run>/stage_speed.json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "demo"))


def teacher_step_seconds(world_dir: str, steps: int, compact: bool, threads: int) -> float:
    """Seconds per teacher step (the scenes recipe), timed between its first and last step."""
    code = f"""
import time, torch, json
torch.set_num_threads({threads})
import tiny_clip as tc
from vild_d2.data.datasets.shapes import load_world_spec
tc.teacher_report = lambda *a, **k: {{}}
stamps = []
log = lambda m: stamps.append(time.perf_counter()) if m.startswith("teacher: step") else None
spec = tc.TeacherSpec(data="scenes", temperature=(0.07, 0.01), steps={steps},
                      crops_per_class=24, heldout_per_class=2)
tc.train_tiny_clip(load_world_spec({world_dir!r}), {str(Path(tempfile.gettempdir()) / "t.pt")!r},
                   spec, log=log, compact_vocabulary={compact})
print("PER_STEP", (stamps[-1] - stamps[0]) / ({steps} - 1))
"""
    # log() is called at step 1, every 100 and the last: first and last bracket steps-1 steps.
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'demo'}{os.pathsep}{REPO}")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return float(re.search(r"PER_STEP ([\d.e-]+)", out).group(1))


def detector_iter_seconds(run: Path, teacher: str, iters: int, processes: int) -> float:
    """Seconds per iteration from detectron2's 'Overall training speed' line."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "tools/train_net.py",
            "--config-file",
            "configs/Shapes/vild_ensemble.yaml",
            *(["--num-gpus", str(processes)] if processes > 1 else []),
            "MODEL.VILD.CLIP_MODEL",
            teacher,
            "MODEL.VILD.EMBEDDING_CACHE_DIR",
            str(run / "cache"),
            "MODEL.VILD.TRAIN_VOCABULARY",
            str(run / "vocabulary" / "base.pth"),
            "MODEL.VILD.TEST_VOCABULARY",
            str(run / "vocabulary" / "all.pth"),
            "MODEL.VILD.DISTILL.STORES",
            f"('{run / 'stores' / 'clip_train'}',)",
            "SOLVER.MAX_ITER",
            str(iters),
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            tmp,
        ]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True).stdout
        out += open(Path(tmp) / "log.txt").read()
    return float(re.search(r"Overall training speed: .*\(([\d.]+) s / it\)", out).group(1))


def targets_seconds(run: Path, teacher: str, shards: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        base = [
            sys.executable,
            "tools/precompute_clip_embeddings.py",
            "--proposals",
            str(run / "stores" / "proposals_train"),
            "--dataset",
            "shapes_train_base",
            "--clip",
            teacher,
            "--output",
            str(Path(tmp) / "store"),
            "--max-proposals",
            "100",
            "--num-workers",
            "1",
        ]
        env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if shards > 1 else {}))
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                base + ["--shard", str(i), "--num-shards", str(shards)],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(shards)
        ]
        if any(p.wait() for p in procs):
            raise RuntimeError("a targets shard failed")
        return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="output/shapes", help="a run_shapes.py --output folder")
    p.add_argument("--teacher", default="", help="its teacher (default <run>/teacher/tiny_clip.pt)")
    p.add_argument("--datasets", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    p.add_argument("--teacher-steps", type=int, default=60)
    p.add_argument("--iters", type=int, default=60)
    args = p.parse_args()
    run = Path(args.run).resolve()
    teacher = args.teacher or str(run / "teacher" / "tiny_clip.pt")
    os.environ["DETECTRON2_DATASETS"] = str(Path(args.datasets).resolve())
    world = str(Path(args.datasets).resolve() / "shapes")
    t = {
        "full table, 2 threads": teacher_step_seconds(world, args.teacher_steps, False, 2),
        "used rows, 2 threads": teacher_step_seconds(world, args.teacher_steps, True, 2),
        "used rows, 1 thread": teacher_step_seconds(world, args.teacher_steps, True, 1),
    }
    d = {f"{n} process(es)": detector_iter_seconds(run, teacher, args.iters, n) for n in (1, 2)}
    c = {f"{n} shard(s)": targets_seconds(run, teacher, n) for n in (1, 2)}
    report = {
        "teacher_s_per_step": t,
        "detector_s_per_iter": d,
        "targets_s": c,
        "ratios": {
            "teacher used rows / full table (2 threads)": t["used rows, 2 threads"]
            / t["full table, 2 threads"],
            "detector 2 processes / 1": d["2 process(es)"] / d["1 process(es)"],
            "targets 2 shards / 1": c["2 shard(s)"] / c["1 shard(s)"],
        },
        "cores": os.cpu_count(),
    }
    (run / "stage_speed.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
