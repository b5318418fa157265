#!/usr/bin/env python
"""Issue 32's measurement: fine-tuning on new data that keeps the open vocabulary, method by
method, over seeds (docs/OWN_DATA.md, "Keeping the open vocabulary: design").

    python demo/finetune_keep_vocab.py --shapes output/shapes --datasets datasets \\
        --output output/keep_vocab [--variant vild_ensemble] [--seeds 0 1 2] [--iters 300]
        # --new-style paper: the new data has names the shapes world lacks (the issue's)

From the model `make demo` trained (``<shapes>/<variant>/model_final.pth``, its tiny CLIP, its
base RPN; the old world ``shapes_*`` registered from ``--datasets``), for each method and seed:
fine-tune on the new data's ``<new>_train_base`` with tools/train_net.py, evaluate the old world
(``shapes_val``: box APr, AP) and the new data (``<new>_val``: box AP on its base and novel
classes) with ``--eval-only``, and time the fine-tune. Methods (:data:`METHODS`):

* ``plain``: the fine-tune's own losses only (``MODEL.VILD.DISTILL_WEIGHT 0``);
* ``vild_distill``: ViLD's distillation on the new images (the config's weight; CLIP targets of
  the old RPN's proposals on the new training images);
* ``self_distill``: ``MODEL.VILD.SELF_DISTILL`` from the starting model;
* ``freeze``: the backbone's bottom-up network frozen (``MODEL.BACKBONE.FREEZE_AT 5``);
* ``vild_self_distill``: ``vild_distill`` and ``self_distill`` together;
* ``wise_ft``: tools/interpolate_checkpoints.py between the start and ``plain``'s model of the
  same seed, alpha chosen by docs/OWN_DATA.md's rule on a held-out split of the new data only
  (``<select>_val``, never the old world and never the split the table reports).

Writes ``<output>/keep_vocab.json`` (every run's figures, the start's, means, spreads, goals)
and ``keep_vocab.md`` (the table). Everything runs through the project's tools in subprocesses;
a rerun skips what exists. ``--opts KEY VALUE ...`` go to every tool run (a smoke test's small
sizes).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "demo"))
from own_data import write_coco_dataset  # noqa: E402  (demo/)

# Method -> options of its fine-tune (on top of the common ones). wise_ft reuses plain's model.
METHODS: Dict[str, List[str]] = {
    "plain": ["MODEL.VILD.DISTILL_WEIGHT", "0.0"],
    "vild_distill": [],
    "self_distill": ["MODEL.VILD.DISTILL_WEIGHT", "0.0", "MODEL.VILD.SELF_DISTILL.WEIGHT"],
    "freeze": ["MODEL.VILD.DISTILL_WEIGHT", "0.0", "MODEL.BACKBONE.FREEZE_AT", "5"],
    # ViLD's distillation and self-distillation together (a candidate for the chosen recipe)
    "vild_self_distill": ["MODEL.VILD.SELF_DISTILL.WEIGHT"],
    "wise_ft": [],
}
OLD, OLD_KEYS = "shapes_val", ("APr", "AP")  # the LVIS evaluator's
NEW_KEYS = ("AP-base", "AP-novel", "AP50-base", "AP50-novel", "AP-all")  # the COCO OVD one's
MARGIN = 1.0  # docs/OWN_DATA.md's rule for alpha: within 1 point of the best alpha's AP-all


def _dataset_name(dataset_file: Path) -> str:
    entry = yaml.safe_load(dataset_file.read_text())
    return (entry[0] if isinstance(entry, list) else entry)["name"]


class Runner:
    """The tools, run as subprocesses from the checkout with one log; a step whose last output
    exists is skipped."""

    def __init__(self, output: Path, datasets: Path, common: List[str]):
        self.output, self.common = output, common
        self.env = dict(os.environ, DETECTRON2_DATASETS=str(datasets))
        self.env.setdefault("OMP_NUM_THREADS", "1")  # a busy machine: threads wait for each other
        self.log = open(output / "keep_vocab.log", "a")

    def run(self, args: Sequence[str], done: Path, touch: bool = False) -> float:
        """Seconds the tool ran (0 when skipped); ``touch``: ``done`` is a marker written here
        once the tool succeeded (a store's folder exists before it is complete)."""
        if done.exists():
            return 0.0
        self.log.write("+ " + " ".join(map(str, args)) + "\n")
        self.log.flush()
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, *map(str, args)],
            cwd=REPO,
            stdout=self.log,
            stderr=self.log,
            env=self.env,
        )
        if proc.returncode:
            raise SystemExit(
                f"failed (exit {proc.returncode}): {' '.join(map(str, args))}; "
                f"see {self.log.name}"
            )
        if touch:
            done.touch()
        return time.perf_counter() - start

    def evaluate(self, config: str, weights: Path, tests: Sequence[str], folder: Path) -> dict:
        """Box results of ``weights`` on each of ``tests`` ({dataset: {metric: value}})."""
        done = folder / "inference" / tests[-1] / "results.json"
        tuple_ = "(" + ", ".join(f"'{t}'" for t in tests) + ",)"
        self.run(
            [
                "tools/train_net.py",
                "--config-file",
                config,
                "--eval-only",
                *self.common,
                "MODEL.WEIGHTS",
                weights,
                "DATASETS.TEST",
                tuple_,
                "OUTPUT_DIR",
                folder,
            ],
            done,
        )
        return {
            t: json.loads((folder / "inference" / t / "results.json").read_text())["bbox"]
            for t in tests
        }


def _figures(results: dict, new: str) -> dict:
    return {
        **{f"old {k}": results[OLD][k] for k in OLD_KEYS},
        **{f"new {k}": results[f"{new}_val"][k] for k in NEW_KEYS},
    }


def _choose_alpha(scores: Dict[float, float]) -> float:
    """The smallest alpha whose AP-all is within MARGIN of the best alpha's."""
    best = max(scores.values())
    return min(a for a, s in scores.items() if s >= best - MARGIN)


def measure(args) -> dict:
    out, shapes = args.output.resolve(), args.shapes.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    # The default new data: demo/own_data.py's, of --new-style ("paper": names the world lacks).
    name = "paper_shapes" if args.new_style == "paper" else "new_shapes"
    dataset_file = args.dataset_file or data / name / f"{name}.yaml"
    select_file = args.select_dataset_file or data / f"{name}_select" / f"{name}_select.yaml"
    if not args.dataset_file and not dataset_file.is_file():
        write_coco_dataset(
            data / name,
            name=name,
            num_train=args.num_train,
            num_val=args.num_val,
            style=args.new_style,
        )
    if not args.select_dataset_file and not select_file.is_file():  # another draw, held out
        write_coco_dataset(
            data / f"{name}_select",
            name=f"{name}_select",
            seed=1,
            num_train=4,
            num_val=args.num_val,
            style=args.new_style,
        )
    new, select = _dataset_name(dataset_file), _dataset_name(select_file)
    teacher, start = shapes / "teacher" / "tiny_clip.pt", shapes / args.variant / "model_final.pth"
    config = f"configs/Shapes/{args.variant}.yaml"
    common = [
        *("MODEL.VILD.CLIP_MODEL", teacher),
        *("MODEL.VILD.DATASET_FILES", f"('{dataset_file}', '{select_file}')"),
        *("MODEL.VILD.EMBEDDING_CACHE_DIR", out / "cache"),
        *("DATALOADER.NUM_WORKERS", "1"),
        *args.opts,
    ]
    runner = Runner(out, args.datasets.resolve(), [str(x) for x in common])
    # ViLD's distillation targets on the new training images (every method's loader reads them;
    # only vild_distill weighs them): the old world's base RPN, the same CLIP.
    proposals, targets = out / "stores" / "proposals", out / "stores" / "targets"
    runner.run(
        [
            "tools/precompute_proposals.py",
            "--config-file",
            "configs/Shapes/rpn.yaml",
            "--dataset",
            f"{new}_train_base",
            "--output",
            proposals,
            "--num-proposals",
            args.max_boxes,
            "MODEL.WEIGHTS",
            shapes / "rpn" / "model_final.pth",
            *runner.common,
        ],
        out / "stores" / "proposals.done",
        touch=True,
    )
    runner.run(
        [
            "tools/precompute_clip_embeddings.py",
            "--dataset-file",
            dataset_file,
            "--proposals",
            proposals,
            "--dataset",
            f"{new}_train_base",
            "--clip",
            teacher,
            "--output",
            targets,
            "--max-proposals",
            args.max_boxes,
        ],
        out / "stores" / "targets.done",
        touch=True,
    )
    tests = (OLD, f"{new}_val")
    report = {"start": _figures(runner.evaluate(config, start, tests, out / "start"), new)}
    report["runs"] = {m: {} for m in args.methods}
    it = args.iters
    schedule = [
        *("SOLVER.MAX_ITER", it, "SOLVER.STEPS", f"({int(it * 0.8)},)"),
        *("SOLVER.BASE_LR", args.lr, "SOLVER.WARMUP_ITERS", max(1, it // 6)),
        *("DATASETS.TRAIN", f"('{new}_train_base',)", "DATASETS.TEST", "()"),
        *("MODEL.VILD.DISTILL.STORES", f"('{targets}',)", "MODEL.WEIGHTS", start),
    ]
    for seed in args.seeds:
        for method in sorted(args.methods, key=lambda m: m == "wise_ft"):  # wise_ft: plain's
            folder = out / method / f"seed{seed}"
            trained = out / ("plain" if method == "wise_ft" else method) / f"seed{seed}"
            opts = list(METHODS["plain" if method == "wise_ft" else method])
            if method in ("self_distill", "vild_self_distill"):
                opts += [args.self_distill_weight, "MODEL.VILD.SELF_DISTILL.START_WEIGHTS", start]
            seconds = runner.run(
                [
                    "tools/train_net.py",
                    "--config-file",
                    config,
                    *runner.common,
                    *schedule,
                    *opts,
                    "SEED",
                    seed,
                    "OUTPUT_DIR",
                    trained,
                ],
                trained / "model_final.pth",
            )
            weights, extra, times = trained / "model_final.pth", {}, _times(out)
            if method == "wise_ft":  # its cost: plain's fine-tune, the alphas and their choice
                began = time.perf_counter()
                weights, extra = _wise(runner, config, start, weights, folder, select, args)
                seconds = times.get(f"plain/seed{seed}", 0.0) + time.perf_counter() - began
            key = f"{method}/seed{seed}"
            times[key] = times.get(key) or seconds  # a rerun's skipped run keeps its first time
            (out / "times.json").write_text(json.dumps(times, indent=1))
            run = _figures(runner.evaluate(config, weights, tests, folder / "eval"), new)
            report["runs"][method][seed] = {**run, "wall s": times[key], **extra}
    report["summary"] = _summary(report, args.methods)
    report["choice"] = choose(report["summary"])
    # The explaining experiment (docs/OWN_DATA.md): WiSE-FT's whole path, both worlds.
    report["frontier"] = {
        seed: {
            a: _figures(
                runner.evaluate(
                    config,
                    out / "wise_ft" / f"seed{seed}" / f"alpha_{a}.pth",
                    tests,
                    out / "wise_ft" / f"seed{seed}" / f"frontier_{a}",
                ),
                new,
            )
            for a in args.alphas
        }
        for seed in (args.frontier_seeds if "wise_ft" in args.methods else [])
    }
    (out / "keep_vocab.json").write_text(json.dumps(report, indent=1))
    (out / "keep_vocab.md").write_text(_table(report, args.methods))
    return report


def _times(out: Path) -> dict:
    path = out / "times.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _wise(runner, config, start, finetuned, folder, select, args):
    """The alpha of docs/OWN_DATA.md's rule on ``<select>_val``; its checkpoint and choice."""
    scores = {}
    for a in args.alphas:
        path = folder / f"alpha_{a}.pth"
        runner.run(
            [
                "tools/interpolate_checkpoints.py",
                "--start",
                start,
                "--finetuned",
                finetuned,
                "--alpha",
                a,
                "--output",
                path,
            ],
            path,
        )
        result = runner.evaluate(config, path, (f"{select}_val",), folder / f"select_{a}")
        scores[a] = result[f"{select}_val"]["AP-all"]
    alpha = _choose_alpha(scores)
    return folder / f"alpha_{alpha}.pth", {"alpha": alpha, "select AP-all": scores}


def _summary(report: dict, methods: Sequence[str]) -> dict:
    """Per method: mean and spread (sample standard deviation) of each figure over the seeds,
    and the issue's three goals (None where plain or the start is missing)."""
    start, summary = report["start"], {}
    for method in methods:
        runs = list(report["runs"][method].values())
        keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))] if runs else []
        stats = {
            k: {
                "mean": statistics.fmean(r[k] for r in runs),
                "spread": statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0,
            }
            for k in keys
        }
        summary[method] = {"seeds": len(runs), **stats}
    plain = summary.get("plain", {}).get("new AP-base", {}).get("mean")
    for s in summary.values():
        if not s["seeds"]:
            continue
        gain = s["new AP-base"]["mean"] - start["new AP-base"]
        plain_gain = None if plain is None else plain - start["new AP-base"]
        # How far each goal is from being missed (>= 0: met): the table's margins.
        s["margins"] = {
            "old APr - (start - 2)": s["old APr"]["mean"] - (start["old APr"] - 2.0),
            "base gain / plain's": None if not plain_gain else gain / plain_gain,
            "new AP-novel - start": s["new AP-novel"]["mean"] - start["new AP-novel"],
        }
        margin = s["margins"]
        s["goals"] = {
            "old APr within 2 of the start": margin["old APr - (start - 2)"] >= 0,
            "new base gain >= 80% of plain's": None
            if plain_gain is None
            else gain >= 0.8 * plain_gain,
            "new novel AP >= the start's": margin["new AP-novel - start"] >= 0,
        }
    return summary


def choose(summary: dict) -> dict:
    """The design's choice: among the methods that meet all three goals, the highest mean new
    base AP; of the methods within each other's spread of it (their means differ by no more
    than the larger of the two spreads), the one with the lowest mean wall time. None when no
    method meets all three."""
    kept = [m for m, s in summary.items() if s["seeds"] and all(s["goals"].values())]
    if not kept:
        return {"chosen": None, "meeting all goals": []}
    base = {m: summary[m]["new AP-base"] for m in kept}
    best = max(kept, key=lambda m: base[m]["mean"])
    close = [
        m
        for m in kept
        if base[best]["mean"] - base[m]["mean"] <= max(base[m]["spread"], base[best]["spread"])
    ]
    chosen = min(close, key=lambda m: summary[m]["wall s"]["mean"])
    return {"chosen": chosen, "meeting all goals": kept, "best base AP": best, "close": close}


def _table(report: dict, methods: Sequence[str]) -> str:
    """One row per method (mean +- sample std over seeds), the goals' margins, the choice."""
    cols = ["old APr", "old AP", "new AP-base", "new AP-novel", "wall s"]
    margins = ["old APr - (start - 2)", "base gain / plain's", "new AP-novel - start"]
    lines = [
        "| method | seeds | " + " | ".join(cols + margins) + " | goals met |",
        "|---|---|" + "---|" * (len(cols) + len(margins)) + "---|",
        "| start | - | "
        + " | ".join([f"{report['start'].get(c, float('nan')):.1f}" for c in cols[:-1]])
        + " | -" * (2 + len(margins))
        + " |",
    ]
    for m in methods:
        s = report["summary"][m]
        if not s["seeds"]:
            continue
        cells = [f"{s[c]['mean']:.1f} +- {s[c]['spread']:.1f}" for c in cols]
        cells += ["-" if s["margins"][k] is None else f"{s['margins'][k]:+.2f}" for k in margins]
        met = sum(bool(v) for v in s["goals"].values())
        lines.append(f"| {m} | {s['seeds']} | " + " | ".join(cells) + f" | {met}/3 |")
    for seed, path in report.get("frontier", {}).items():
        lines += [
            "",
            f"WiSE-FT's path, seed {seed} (every alpha on both worlds; explains, never chooses):",
            "",
            "| alpha | " + " | ".join(cols[:-1]) + " |",
            "|---|" + "---|" * (len(cols) - 1),
        ]
        for a, fig in path.items():
            lines.append(f"| {a} | " + " | ".join(f"{fig[c]:.1f}" for c in cols[:-1]) + " |")
    choice = report.get("choice", {}).get("chosen")
    lines.append(
        ""
        if not report.get("choice")
        else f"\nChosen by the design's rule: {choice or 'none (no method meets all three goals)'}"
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=Path, default=Path("output/shapes"), help="`make demo`'s")
    p.add_argument("--datasets", type=Path, default=Path("datasets"), help="holds shapes/")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--variant", default="vild_ensemble", choices=["vild_ensemble", "vild"])
    p.add_argument("--dataset-file", type=Path, help="the new data (default: demo/own_data.py's)")
    p.add_argument("--select-dataset-file", type=Path, help="held-out data for WiSE-FT's alpha")
    p.add_argument(
        "--new-style",
        choices=["shapes", "paper"],
        default="shapes",
        help="the default new data's style (demo/own_data.py --style): paper has new names",
    )
    p.add_argument("--num-train", type=int, default=300)
    p.add_argument("--num-val", type=int, default=60)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--max-boxes", type=int, default=100)
    p.add_argument("--self-distill-weight", type=float, default=1.0)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument(
        "--frontier-seeds",
        type=int,
        nargs="*",
        default=[],
        help="seeds whose WiSE-FT alphas are all evaluated on both worlds (the explaining run)",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE ... for all")
    args = p.parse_args(argv)
    report = measure(args)
    print(_table(report, args.methods), end="")


if __name__ == "__main__":
    main()
