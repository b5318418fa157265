"""Worker of :func:`benchmarks.train_processes.train_in_processes`: train runs of configs in N
processes (``vild_d2.engine.launch``: gloo on a CPU, NCCL on GPUs) and record every step.
Run in a fresh interpreter, so that it owns the process group whatever state its caller is in:

    python -m benchmarks.train_worker '[RUNS, OUT, NUM_PROCESSES, TIMEOUT_S]'

(one JSON argument; RUNS = ``{name: [config_file, opts]}``, OUT = the record's JSON file).
"""

import vild_d2  # noqa: F401  (first: compat bridges)

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Dict

from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from vild_d2.config import load_config
from vild_d2.engine import Trainer, launch


def record_training(runs: Dict[str, list], out: str) -> None:
    """
    ``launch`` main function: train each run ``{name: [config_file, opts]}`` in turn with
    :class:`vild_d2.engine.Trainer`, seeded as ``default_setup`` seeds (SEED + rank), and write
    rank 0's record of every step to ``out`` (JSON): ``{name: {"losses": {key: [per step]},
    "step_s": [...], "output_dir": ...}}``. The losses are detectron2's logged ones: each
    process's, averaged over the processes.
    """
    record = {}
    for name, (config_file, opts) in runs.items():
        # Every rank parses the same runs from this process's one command line: the configs
        # agree by construction (what the tools' setup checks across machines).
        cfg = load_config(config_file, opts)
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


def main(argv=None) -> None:
    runs, out, num_processes, timeout = json.loads((argv or sys.argv[1:])[0])
    # Spawned processes find record_training as this module's (run as __main__ or imported).
    launch(
        record_training,
        num_processes,
        dist_url="auto",
        args=(runs, out),
        timeout=timedelta(seconds=timeout),
    )


if __name__ == "__main__":
    main()
