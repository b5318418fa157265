"""Whose float32 is it? vild_d2's official training step run in float64 (model, inputs, targets,
every tensor it makes) against the committed fixture, beside the float32 run the
parity test makes (docs/OFFICIAL.md, "Experiment: whose float32"). For the variables the fixture
stores in full: ours32 vs TF, ours64 vs TF, ours32 vs ours64 (relative L2 and cosine).

Not a test (no test_ prefix): run by hand, ~4 min on 2 cores:

    OMP_NUM_THREADS=2 .venv/bin/python tests/official/official_training_float64.py vild_ensemble
"""

import sys
import tempfile
from pathlib import Path

import vild_d2  # noqa: F401  (first: compat bridges)

import numpy as np
import torch
from detectron2.structures import Boxes

_HERE = Path(__file__).resolve()
sys.path[:0] = [str(_HERE.parent), str(_HERE.parents[1]), str(_HERE.parents[2] / "tools")]

import official_training_harness as harness  # noqa: E402
from vild_d2.official.checkpoint.variables import official_variables  # noqa: E402


def _as_float64():
    """Patch the harness's builders so that the model and its inputs are float64."""
    build, inputs = harness.build, harness.inputs

    def build64(*args, **kwargs):
        model, cfg, tf_vars, variables = build(*args, **kwargs)
        return model.double(), cfg, tf_vars, variables

    def inputs64(model, images, common):
        canvas, targets, distill = inputs(model, images, common)
        canvas.tensor = canvas.tensor.double()
        for t in targets:
            t.gt_boxes = Boxes(t.gt_boxes.tensor.double())
            t.gt_mask_crops = t.gt_mask_crops.double()
        for d in distill:
            d.boxes = Boxes(d.boxes.tensor.double())
            d.embeddings = d.embeddings.double()
        return canvas, targets, distill

    harness.build, harness.inputs = build64, inputs64
    harness._xyxy = lambda a: torch.from_numpy(np.ascontiguousarray(a[..., [1, 0, 3, 2]])).double()
    torch.set_default_dtype(torch.float64)


def step(name, images, common, ref):
    """One step; returns ({TF name: float64 gradient}, {TF name: (rel L2, cosine) vs TF})."""
    with tempfile.TemporaryDirectory() as workdir:
        report = harness.run_step(name, images, common, ref, workdir, reverts=False)
    model = report["_state"][0]
    variables = official_variables(50, name == "vild_ensemble")
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    maps = harness.tf_layout_maps(variables, name == "vild_ensemble")
    # BN beta and gamma, kernels: "other" (the BN-fed conv biases are measured another way)
    figures = {n: (f[1], f[2]) for n, f in report["grads"]["figures"].items() if f[0] == "other"}
    return harness.to_tf(grads, maps, variables), figures, report["losses"]


def main(name: str) -> None:
    images, common, ref = (
        harness.load("common"),
        harness.load("train_common"),
        harness.load(f"train_{name}"),
    )
    full = {str(n) for n in ref["full_names"]}
    g32, f32, l32 = step(name, images, common, ref)
    _as_float64()
    g64, f64, l64 = step(name, images, common, ref)
    print(f"{name}: losses rel to TF, float32 / float64:")
    for k in l32:
        print(f"  {k}: {l32[k]['rel']:.2e} / {l64[k]['rel']:.2e}")
    rows = []
    for n in sorted(full & set(g32) & set(f32)):
        a, b = g32[n], g64[n]
        self_rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        rows.append((f32[n][0], n, f64[n][0], self_rel, f32[n][1], f64[n][1]))
    rows.sort(reverse=True)
    print("variable: ours32 vs TF rel (cos) | ours64 vs TF rel (cos) | ours32 vs ours64 rel")
    by64 = sorted(rows, key=lambda r: -r[2])
    named = ("fpn/p4-bn/beta", "rpn_head/rpn-l5-bn/beta")
    for title, shown in (("by ours32 vs TF", rows[:12]), ("by ours64 vs TF", by64[:6])):
        print(f" worst {title} (of {len(rows)}):")
        extra = [r for r in rows if r[1] in named and r not in shown]
        for r32, n, r64, self_rel, c32, c64 in shown + extra:
            print(f"  {n}: {r32:.2e} ({c32:.5f}) | {r64:.2e} ({c64:.5f}) | {self_rel:.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vild_ensemble")
