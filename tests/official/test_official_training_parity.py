"""Training parity with the official TensorFlow ViLD (issue 28): one training step of the
official graph (tests/fixtures/official_vild/train_*.npz, written by
tools/official_reference.py --mode train) replayed on vild_d2's official training path
(MODEL.VILD.OFFICIAL.TRAINING) with the recorded anchor and RoI permutations; losses, sampled
anchors/RoIs/masks, head-output and variable gradients, BN statistics and one SGD step compared
with the tolerances of docs/OFFICIAL.md. Then each official rule turned back to detectron2's
(the box-loss reduction, the RPN normaliser, the rare masking, the distillation normalisation,
weight decay on biases) must break a loss figure.

The figures are printed and written to ``<pytest tmp>/official_training_parity.json``.
"""

import vild_d2  # noqa: F401  (first: compat bridges)

import json

import numpy as np
import pytest

import official_training_harness as harness

pytestmark = pytest.mark.slow  # R50 at 256 px with 812 RoIs per image: ~1 min per config


def _fixture(name):
    paths = harness.fixture_paths(name)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"{missing} not there yet (tools/official_reference.py --mode train)")
    return harness.load("common"), harness.load("train_common"), harness.load(f"train_{name}")


@pytest.fixture(scope="module", params=["vild", "vild_ensemble"])
def report(request, tmp_path_factory):
    name = request.param
    images, common, ref = _fixture(name)
    workdir = tmp_path_factory.mktemp("official_training")
    out = harness.run_step(name, images, common, ref, str(workdir), reverts=name == "vild")
    out.pop("_state")
    for group in out["grads"], out["updates"]:
        group.pop("figures")
    out["within_issue_tolerances"] = harness.verdicts(out, harness.TOL)
    out["within_test_limits"] = harness.verdicts(out, harness.limits_for(out["bn_moments"]))
    text = json.dumps(out, indent=1, default=str)
    (workdir / "official_training_parity.json").write_text(text)
    print(f"\n{name}: {text}")
    return name, out


def test_sampled_anchors_rois_and_masks_are_the_recorded_ones(report):
    name, out = report
    assert out["anchors_identical"] and out["rois_identical"] and out["masks_identical"], out


def test_losses_match(report):
    name, out = report
    assert out["within_test_limits"]["losses"], f"{name}: {out['losses']}"


def test_head_output_gradients_match(report):
    name, out = report
    assert out["within_test_limits"]["head_grads"], f"{name}: {out['head_grads']}"


def test_variable_gradients_match(report):
    name, out = report
    assert out["within_test_limits"]["grads"], f"{name}: {out['grads']}"


def test_bn_batch_statistics_match(report):
    name, out = report
    assert out["within_test_limits"]["bn"], f"{name}: {out['bn_worst']}"


def test_one_sgd_step_matches(report):
    name, out = report
    lr, official_lr = out["lr"]
    assert np.isclose(lr, official_lr, rtol=1e-6)
    assert out["own_update_rule_maxdev"] <= 1e-5 and out["official_update_rule_maxdev"] <= 1e-5
    assert out["within_test_limits"]["updates"], f"{name}: {out['updates']}"
    assert out["classifier_unchanged"]


def test_parity_fails_with_detectron2_rules(report):
    name, out = report
    if "reverts" not in out:
        pytest.skip("the reverts run on the ViLD config only")
    limits = harness.limits_for(out["bn_moments"])
    for revert, (key, rel) in out["reverts"].items():
        limit = limits.get(key, limits["loss"])
        assert rel > limit, f"{revert}: parity still holds ({key} {rel:.2e})"


def test_committed_fixture_meets_every_issue_tolerance(report):
    name, out = report
    # The committed fixtures come from --exact-layers (docs/OFFICIAL.md, changes 4 and 5): the
    # issue's tolerances hold there for every figure, with the L1's kink ties replayed (a few
    # elements, each within 1e-5 of the kink).
    assert out["bn_moments"] == "float64_layers", out["bn_moments"]
    limits = harness.limits_for("float64_layers")
    assert {k: limits[k] for k in harness.TOL} == harness.TOL
    assert all(harness.verdicts(out, limits).values()), out["within_test_limits"]
    assert 0 < out["distill_ties_pinned"] <= limits["l1_pins_max"], out["distill_ties_pinned"]
    assert out["distill_ties_pinned_max_gap"] < limits["l1_pin_gap"]


def test_another_seed_is_a_clear_error(tmp_path):
    images, common, ref = _fixture("vild")
    variables = harness.official_variables(50, False)
    other = harness.random_official_weights(variables, int(ref["seed"]) + 1)
    with pytest.raises(harness.FixtureError, match="weight_sums differ"):
        harness.check_fixture(common, ref, other, variables)
    bad = dict(ref, roi_perm=ref["roi_perm"][:, :1000])
    weights = harness.random_official_weights(variables, int(ref["seed"]))
    with pytest.raises(harness.FixtureError, match="roi_perm: shape"):
        harness.check_fixture(common, bad, weights, variables)
    with pytest.raises(harness.FixtureError, match="bn_moments 'float16'"):
        harness.check_fixture(common, dict(ref, bn_moments="float16"), weights, variables)
