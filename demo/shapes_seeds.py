"""The shapes ablation over several seeds (``demo/run_shapes.py ablation --seeds 0,1,2``): each
seed is a whole run (its own world, teacher and detectors, under ``<output>/seed<k>``); this
module gives each seed its options and folds the runs into mean +- spread per variant.

The spread is half the range, (max - min) / 2, over the seeds; the sample standard deviation is
kept beside it in the JSON. "The ordering holds" (docs/SHAPES.md, issue 31): ViLD's mean box APr
exceeds ViLD-text's by more than the two spreads combined, and the ensemble's mean box APr is at
least ViLD-text's.
"""

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from shapes_pipeline import ShapesOptions

__all__ = ["COLUMNS", "ordering", "seed_options", "seeds_table", "spread", "summarise"]

# (key in the summary, column title): box/mask AP from the LVIS evaluator; the novel val
# objects found (right category, score >= 0.3, IoU >= 0.5) and the novel-category detections
# on background (score >= 0.3), as shapes_picture counts them.
COLUMNS = (
    ("box AP", "box AP"),
    ("box APr", "box APr"),
    ("mask AP", "mask AP"),
    ("mask APr", "mask APr"),
    ("novel found", "novel val objects found"),
    ("novel on background", "novel detections on background"),
)


def seed_options(options: ShapesOptions, seed: int) -> ShapesOptions:
    """One seed's run: the seed sets the world, the teacher and every detector (config SEED);
    its stages go to ``<output>/seed<k>``, its world to ``<datasets>/<output name>_seed<k>``."""
    out = Path(options.output)
    return dataclasses.replace(
        options,
        seed=seed,
        detector_seed=seed,
        output=str(out / f"seed{seed}"),
        datasets=str(Path(options.datasets) / f"{out.name}_seed{seed}"),
    )


def spread(values: Sequence[float]) -> Dict[str, float]:
    """mean, spread = (max - min) / 2, std (sample, n - 1; 0 for one value), min, max, n."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {
        "mean": mean,
        "spread": (max(values) - min(values)) / 2,
        "std": std,
        "min": min(values),
        "max": max(values),
        "n": n,
    }


def _figures(run: dict, variant: str) -> Dict[str, float]:
    """The COLUMNS figures of ``variant`` in one seed's run summary (run_shapes.run_one)."""
    res = run["results"][variant]
    found = run["novel_found_by_variant"][variant]
    return {
        "box AP": res["bbox"]["AP"],
        "box APr": res["bbox"]["APr"],
        "mask AP": res.get("segm", {}).get("AP", float("nan")),
        "mask APr": res.get("segm", {}).get("APr", float("nan")),
        "novel found": sum(r["found"] for r in found.values()),
        "novel objects": sum(r["objects"] for r in found.values()),
        "novel on background": run["novel_detections"][variant]["background"],
    }


def summarise(runs: Dict[int, dict], variants: Sequence[str]) -> dict:
    """``runs``: {seed: run summary}. Returns {"variants": {variant: {figure: spread(...)}},
    "teacher": {figure: spread(...)}, "per_seed": {seed: {variant: figures}}, "seeds": [...]}."""
    per_seed = {s: {v: _figures(run, v) for v in variants} for s, run in runs.items()}
    out = {"seeds": list(runs), "variants": {}, "per_seed": per_seed, "teacher": {}}
    for v in variants:
        keys = per_seed[next(iter(per_seed))][v]
        out["variants"][v] = {k: spread([per_seed[s][v][k] for s in runs]) for k in keys}
    teachers = [run.get("teacher") for run in runs.values()]
    if all(teachers):
        for k in ("accuracy", "accuracy_base", "accuracy_novel"):
            out["teacher"][k] = spread([100 * t[k] for t in teachers])
    return out


def ordering(summary: dict) -> Optional[dict]:
    """The rule of docs/SHAPES.md on box APr (None if a variant it needs did not run)."""
    v = summary["variants"]
    if not all(k in v for k in ("vild", "vild_text", "vild_ensemble")):
        return None
    vild, text, ens = (v[k]["box APr"] for k in ("vild", "vild_text", "vild_ensemble"))
    margin = vild["mean"] - text["mean"]
    needed = vild["spread"] + text["spread"]
    return {
        "vild_minus_text": margin,
        "spreads_combined": needed,
        "ensemble_minus_text": ens["mean"] - text["mean"],
        "vild_beyond_noise": margin > needed,
        "ensemble_at_least_text": ens["mean"] >= text["mean"],
        "holds": margin > needed and ens["mean"] >= text["mean"],
    }


def _cell(s: Dict[str, float], digits: int) -> str:
    return f"{s['mean']:.{digits}f} ± {s['spread']:.{digits}f}"


def seeds_table(summary: dict) -> str:
    """Markdown: variant x COLUMNS as mean ± spread, then the teacher and the ordering."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [
        "| variant | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---" * (1 + len(COLUMNS)) + "|",
    ]
    for variant, figures in summary["variants"].items():
        cells = []
        for key, _ in COLUMNS:
            cell = _cell(figures[key], 1)
            if key == "novel found":
                cell += f" of {figures['novel objects']['mean']:.0f}"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    notes: List[str] = [
        f"Mean ± spread over seeds {seeds} (spread = (max - min) / 2; each seed sets the world, "
        "the teacher and the detectors)."
    ]
    if summary["teacher"]:
        t = summary["teacher"]
        notes.append(
            f"Teacher zero-shot top-1 on held-out crops: {_cell(t['accuracy'], 1)}% "
            f"(base {_cell(t['accuracy_base'], 1)}%, novel {_cell(t['accuracy_novel'], 1)}%)."
        )
    if "supervised_full" in summary["variants"]:
        notes.append(
            "supervised_full is trained WITH the novel boxes (fully annotated): an upper "
            "reference, not the paper's supervised baseline (whose rare classes have few "
            "examples)."
        )
    rule = ordering(summary)
    if rule is not None:
        notes.append(
            "The ordering "
            + ("holds" if rule["holds"] else "does not hold")
            + f": ViLD - ViLD-text box APr {rule['vild_minus_text']:+.1f} (needs > "
            f"{rule['spreads_combined']:.1f}, the two spreads combined); ViLD-ensemble - "
            f"ViLD-text {rule['ensemble_minus_text']:+.1f} (needs >= 0)."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(notes)
