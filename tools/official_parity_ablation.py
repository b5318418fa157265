#!/usr/bin/env python
"""Parity of vild_d2's official-architecture model with the official TensorFlow ViLD, and the
ablation: each official difference from detectron2 turned back on its own must break parity.

    python tools/official_parity_ablation.py [--output parity.json] [--configs vild vild_ensemble]

Uses the fixture of tests/fixtures/official_vild (official outputs for two images with seeded
random weights; FORMAT.md there). Prints per config, stage and image the largest
|ours - official| relative to the official tensor's largest magnitude (and the matched
fractions of proposals, detections and masks); then, on ViLD, the stages that fail with each
difference reverted (stages up to the proposals; ``--full`` runs the heads too). Writes all
figures to ``--output``. Exit status 1 if parity fails or a reverted difference does not break
it.
"""

import argparse
import json
import sys
import tempfile

import vild_d2  # noqa: F401  (first: compat bridges)
import numpy as np

from reference.parity import (
    DIFFERENCES,
    FIXTURE_DIR,
    build_reference_model,
    compare,
    revert,
    run_reference,
)


def _load(name):
    with np.load(FIXTURE_DIR / f"{name}.npz", allow_pickle=False) as f:
        return dict(f)


def _row(stage, entry):
    cells = []
    for i in range(2):
        fig = entry.get(f"image_{i}", {})
        if "max_rel" in fig:
            cells.append(f"{fig['max_rel']:.1e} (abs {fig['max_abs']:.1e}, {fig['worst']})")
        elif "matched" in fig:
            cells.append(
                f"{fig['matched']:.3f} matched ({fig.get('ours')} vs {fig.get('official')})"
            )
        elif "min_iou" in fig:
            cells.append(f"min IoU {fig['min_iou']:.4f} of {fig['compared']}, "
                         f"max prob diff {fig['max_prob_diff']:.1e}")  # fmt: skip
    status = "ok" if entry["ok"] else "FAIL"
    return f"  {stage:13s} {status:4s} tol {entry['tolerance']:<6g} | " + " | ".join(cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["vild", "vild_ensemble"])
    p.add_argument("--output", default="", help="JSON file for all figures")
    p.add_argument("--full", action="store_true", help="ablation through the heads too")
    args = p.parse_args(argv)
    common, report, ok = _load("common"), {}, True
    seed, size = int(common["seed"]), int(common["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            model, _ = build_reference_model(name, seed, size, tmp)
            result = compare(run_reference(model, common), _load(name), common)
            report[name] = result
            ok &= result["ok"]
            print(f"{name}: parity {'holds' if result['ok'] else 'FAILS'}")
            for stage, entry in result["stages"].items():
                print(_row(stage, entry))
        model, _ = build_reference_model("vild", seed, size, tmp)
        report["ablation"] = {}
        for difference in DIFFERENCES:
            with revert(difference):
                out = run_reference(model, common, heads=args.full)
                result = compare(out, _load("vild"), common)
            failed = {k: v for k, v in result["stages"].items() if not v["ok"]}
            report["ablation"][difference] = result
            ok &= bool(failed)
            print(f"reverted {difference}: {'breaks parity' if failed else 'NO EFFECT'}")
            for stage, entry in failed.items():
                print(_row(stage, entry))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
