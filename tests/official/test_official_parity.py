"""Parity with the official TensorFlow ViLD: seeded random official weights, converted by
vild_d2's converter into the official-architecture model of configs/LVIS-OVD/official/, run on
the fixture's two images; every stage is compared with the official outputs
(tests/fixtures/official_vild, FORMAT.md there). Then each official difference from
detectron2's Mask R-CNN is turned back on its own: parity must FAIL.

The measured figures (max |diff| / scale per stage and image, matched fractions) are printed
and written to ``<pytest tmp>/official_parity.json``.
"""

import vild_d2  # noqa: F401  (first: compat bridges)

import json

import numpy as np
import pytest

from reference.parity import (
    DIFFERENCES,
    FIXTURE_DIR,
    build_reference_model,
    compare,
    revert,
    run_reference,
)

CONFIGS = ("vild", "vild_ensemble")
STAGES = ("preprocessing", "backbone", "fpn", "anchors", "rpn", "proposals", "roi_features",
          "head", "detections", "masks")  # fmt: skip
REPORT = {}


def _load(name):
    path = FIXTURE_DIR / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not there yet (written by tools/official_reference.py)")
    with np.load(path, allow_pickle=False) as f:
        return dict(f)


@pytest.fixture(scope="module")
def common():
    return _load("common")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("official_parity")


@pytest.fixture(scope="module", params=CONFIGS)
def result(request, common, workdir):
    """The whole model run once per config on the fixture's two images."""
    name = request.param
    ref = _load(name)
    model, vocab = build_reference_model(name, int(common["seed"]), int(common["image_size"]),
                                         str(workdir))  # fmt: skip
    # The official rare mask is the vocabulary's novel mask (background first).
    assert np.array_equal(common["rare_mask"][1:] == 0, vocab.novel.numpy())
    out = compare(run_reference(model, common), ref, common)
    REPORT[name] = out
    (workdir / "official_parity.json").write_text(json.dumps(REPORT, indent=1))
    print(f"\n{name}: {json.dumps(out['stages'], indent=1)}\n(written to {workdir})")
    return name, out


@pytest.mark.parametrize("stage", STAGES)
def test_stage_matches_the_official_model(result, stage):
    name, out = result
    entry = out["stages"][stage]
    assert entry["ok"], f"{name} {stage}: {entry}"


@pytest.fixture(scope="module")
def vild_model(common, workdir):
    model, _ = build_reference_model("vild", int(common["seed"]), int(common["image_size"]),
                                     str(workdir))  # fmt: skip
    return model


def test_the_model_passes_before_ablation(vild_model, common):
    # The ablation's own baseline (stages up to the proposals): passes as it is.
    assert compare(run_reference(vild_model, common, heads=False), _load("vild"), common)["ok"]


@pytest.mark.parametrize("difference", DIFFERENCES)
def test_reverting_one_difference_breaks_parity(vild_model, common, workdir, difference):
    """Each difference (TF 'SAME' max-pool, P6 padding, delta order, "+1", legacy resize)
    matters: with it turned back to detectron2's / PyTorch's, some stage up to the proposals
    is out of tolerance."""
    with revert(difference):
        out = compare(run_reference(vild_model, common, heads=False), _load("vild"), common)
    failed = {k: v for k, v in out["stages"].items() if not v["ok"]}
    print(f"\nreverted {difference}: failing stages {json.dumps(failed, indent=1)}")
    REPORT.setdefault("ablation", {})[difference] = failed
    (workdir / "official_parity.json").write_text(json.dumps(REPORT, indent=1))
    assert failed, f"parity still holds with {difference} reverted: {out['stages']}"
