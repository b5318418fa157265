"""The ``train_processes`` task: ViLD training iterations/s on a small shapes world with the
same global batch in 1 process and in 2, and :func:`train_in_processes`, which the tests of
data-parallel training use too."""

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch
from detectron2.modeling import build_model

from vild_d2.config import load_config

from .common import ROOT, run_python
from .models import QUICK_OPTS, BenchmarkSetup

__all__ = ["benchmark_train_processes", "make_shapes_training", "train_in_processes"]


def train_in_processes(
    runs: Dict[str, list], num_processes: int, out, *, env=None, timeout: float = 600
) -> dict:
    """
    Train ``runs`` (``{name: [config_file, opts]}``, in turn) in ``num_processes`` processes
    (``vild_d2.engine.launch``, gloo on a CPU) started from a fresh interpreter
    (:mod:`benchmarks.train_worker`); returns rank 0's record, written to ``out``:
    ``{name: {"losses": {key: [per step]}, "step_s": [...], "output_dir": ...}}``.

    Args:
        env: the processes' environment (default: this one's).
        timeout: seconds for the rendezvous and every collective operation.
    """
    args = json.dumps([runs, str(out), num_processes, timeout])
    what = f"training in {num_processes} process(es)"
    run_python("-m", "benchmarks.train_worker", args, what=what, env=env)
    return json.loads(Path(out).read_text())


def make_shapes_training(
    workdir, clip_path: str, *, num_train: int, size: int
) -> Tuple[dict, list]:
    """
    A shapes world under ``workdir`` (``shapes_*`` in processes started with the returned
    environment) with ViLD's distillation store for its base training images: a random RPN's
    proposals and the CLIP's targets, made by the project's tools (tools/make_shapes_world.py,
    tools/precompute_proposals.py, tools/precompute_clip_embeddings.py).

    Returns:
        (environment for the training processes, config overrides that train on it)
    """
    workdir = Path(workdir)
    env = dict(os.environ, DETECTRON2_DATASETS=str(workdir))
    m = 40  # proposals and distillation boxes per image
    common = [
        "MODEL.VILD.CLIP_MODEL",
        clip_path,
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(workdir / "cache"),
    ]
    store = dict(chunk_size=4, num_workers=0)  # small chunks, no loader processes

    def tool(name: str, *opts: str, **flags) -> None:
        """``tools/<name> --flag VALUE ... OPTS`` in a fresh interpreter that registers the
        world as ``shapes_*`` (``--flag`` from the keyword, ``_`` as ``-``; a tuple: values)."""
        args = []
        for flag, value in flags.items():
            values = value if isinstance(value, tuple) else (value,)
            args += [f"--{flag.replace('_', '-')}", *map(str, values)]
        run_python(str(ROOT / "tools" / name), *args, *opts, what=f"tools/{name}", env=env)

    tool(
        "make_shapes_world.py",
        root=workdir / "shapes",
        num_train=num_train,
        num_val=2,
        image_size=size,
        objects_per_image=(2, 4),
    )
    rpn_cfg = load_config("configs/Shapes/rpn.yaml", common)
    torch.manual_seed(0)
    torch.save({"model": build_model(rpn_cfg).state_dict()}, str(workdir / "rpn.pth"))
    tool(
        "precompute_proposals.py",
        *common,
        "MODEL.WEIGHTS",
        str(workdir / "rpn.pth"),
        config_file="configs/Shapes/rpn.yaml",
        dataset="shapes_train_base",
        output=workdir / "proposals",
        num_proposals=m,
        **store,
    )
    tool(
        "precompute_clip_embeddings.py",
        proposals=workdir / "proposals",
        dataset="shapes_train_base",
        clip=clip_path,
        device="cpu",  # as CLIPTeacher's default: the targets are made alike on any machine
        output=workdir / "targets",
        max_proposals=m,
        **store,
    )
    opts = [
        *common,
        "MODEL.VILD.DISTILL.STORES",
        f"('{workdir / 'targets'}',)",
        "MODEL.VILD.DISTILL.MAX_BOXES",
        str(m),
        "DATASETS.TEST",
        "()",
    ]
    return env, opts


def benchmark_train_processes(setup: BenchmarkSetup, extra_runs: Dict[str, list] = None) -> dict:
    """
    ViLD training iterations/s on the shapes world with the same global batch in 1 process and
    in 2 (gloo on a CPU, NCCL on GPUs), run one after the other in this run: medians of
    detectron2's per-step times after its warm-up. On a CPU each process gets torch's thread
    count divided by the processes, so that both runs use the same cores.

    Args:
        extra_runs: ``{name: config overrides}`` also trained in 2 processes (e.g. SyncBN).
    """
    quick = setup.quick
    batch, iters = (2, 8) if quick else (4, 23)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        env, opts = make_shapes_training(
            tmp, setup.clip_path, num_train=8 if quick else 24, size=64 if quick else 128
        )
        opts += [
            *(QUICK_OPTS if quick else []),
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)" if quick else "(128,)",
            "DATALOADER.NUM_WORKERS",
            "0",
            "MODEL.DEVICE",
            setup.device,
            "SOLVER.IMS_PER_BATCH",
            str(batch),
            "SOLVER.MAX_ITER",
            str(iters),
            "SOLVER.BASE_LR",
            "0.0025",
            "SOLVER.CHECKPOINT_PERIOD",
            "100000",
        ]
        runs = {1: {"vild": []}, 2: {"vild": [], **(extra_runs or {})}}
        records = {}
        for n, named in runs.items():
            run_env = dict(env, OMP_NUM_THREADS=str(max(1, threads // n)))
            todo = {
                name: [
                    "configs/Shapes/vild.yaml",
                    [*opts, *extra, "OUTPUT_DIR", f"{tmp}/{name}{n}"],
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
