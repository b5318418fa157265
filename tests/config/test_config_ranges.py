"""Every cfg.MODEL.VILD value is range-checked when a config is loaded: an out-of-range value
is an error naming the key, its value and what it may be, before anything runs."""

import vild_d2  # noqa: F401  (first: compat bridges)

import re
from pathlib import Path

import pytest

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from vild_d2.config import RULES, add_vild_config, check_vild_config, load_config

CONFIG = "configs/Shapes/vild_ensemble.yaml"


def _leaf_keys(node: CN, prefix=""):
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_key_has_a_rule_and_every_rule_a_key():
    cfg = get_cfg()
    add_vild_config(cfg)
    assert set(_leaf_keys(cfg.MODEL.VILD)) == set(RULES)


def test_defaults_and_shipped_configs_are_in_range():
    cfg = get_cfg()
    add_vild_config(cfg)
    check_vild_config(cfg)
    load_config(CONFIG)


# The values a hostile user tried (first four), then new variants of the same classes.
BAD = [
    ("TEMPERATURE", "-0.01", "(0, 1]"),
    ("TEMPERATURE", "0.0", "(0, 1]"),
    ("DISTILL_WEIGHT", "-1.0", ">= 0"),
    ("ENSEMBLE_LAMBDA", "-2.0", "[0, 1]"),
    ("ENSEMBLE_LAMBDA", "1.5", "[0, 1]"),
    ("DISTILL.MAX_BOXES", "0", ">= 1"),
    ("TEMPERATURE", "1e9", "(0, 1]"),
    ("OBJECTNESS_WEIGHT", "-0.5", ">= 0"),
    ("DISTILL.MAX_BOXES", "-3", ">= 1"),
    ("DISTILL.CROP_SCALES", "(1.0, -1.5)", "numbers > 0"),
    ("DISTILL.CROP_SCALES", "()", "numbers > 0"),
    ("DISTILL.MISSING", "'ignore'", "'error' or 'skip'"),
    ("DISTILL.ONLINE_DEVICE", "'gpu'", "'cpu', 'cuda' or 'cuda:N'"),
    ("VARIANT", "'vild-text'", "one of text, image, vild, ensemble"),
    ("CLIP_ON_CROPS.NUM_PROPOSALS", "0", ">= 1"),
    ("LSJ.MIN_SCALE", "0.0", "> 0"),
    ("CLIP_MODEL", "'  '", "a CLIP name or checkpoint path"),
    ("OFFICIAL.BN_MOMENTUM", "1.5", "[0, 1]"),
    ("OFFICIAL.NUM_MASK_SAMPLES", "0", ">= 1"),
    ("OFFICIAL.MASK_CROP_SIZE", "1", ">= 2"),
]


@pytest.mark.parametrize("key,value,allowed", BAD)
def test_out_of_range_values_are_named(key, value, allowed):
    with pytest.raises(ValueError) as e:
        load_config(CONFIG, [f"MODEL.VILD.{key}", value])
    message = str(e.value)
    assert f"MODEL.VILD.{key} = " in message and allowed in message, message


def test_every_problem_is_named_at_once():
    opts = ["MODEL.VILD.TEMPERATURE", "-0.01", "MODEL.VILD.ENSEMBLE_LAMBDA", "1.5"]
    with pytest.raises(ValueError) as e:
        load_config(CONFIG, opts)
    assert re.search(r"TEMPERATURE = -0\.01.*\n.*ENSEMBLE_LAMBDA = 1\.5", str(e.value)), e.value


def test_lsj_scales_are_checked_together():
    opts = ["MODEL.VILD.LSJ.MIN_SCALE", "2.0", "MODEL.VILD.LSJ.MAX_SCALE", "0.5"]
    with pytest.raises(ValueError, match=r"LSJ\.MAX_SCALE = 0\.5: must be >= LSJ\.MIN_SCALE"):
        load_config(CONFIG, opts)


def test_edges_of_the_ranges_are_accepted():
    opts = ["MODEL.VILD.TEMPERATURE", "1.0", "MODEL.VILD.ENSEMBLE_LAMBDA", "0.0"]
    opts += ["MODEL.VILD.DISTILL_WEIGHT", "0.0", "MODEL.VILD.DISTILL.ONLINE_DEVICE", "'cuda:1'"]
    cfg = load_config(CONFIG, opts)
    assert cfg.MODEL.VILD.TEMPERATURE == 1.0 and cfg.MODEL.VILD.ENSEMBLE_LAMBDA == 0.0


def test_non_finite_values_from_a_yaml_file_are_named(tmp_path):
    # yacs parses only literals on the command line; a YAML file can say .nan or .inf.
    config = tmp_path / "nan.yaml"
    config.write_text(
        f"_BASE_: {Path(CONFIG).resolve()}\nMODEL:\n  VILD:\n    TEMPERATURE: .nan\n"
        "    DISTILL_WEIGHT: .inf\n"
    )
    with pytest.raises(ValueError) as e:
        load_config(str(config))
    assert "TEMPERATURE = nan: must be a number in (0, 1]" in str(e.value), e.value
    assert "DISTILL_WEIGHT = inf: must be a number >= 0" in str(e.value), e.value


# --- issue 27: detectron2's keys that vild_d2 reads; yacs's "Type mismatch" -------------------
D2_BAD = [
    ("INPUT.MIN_SIZE_TEST", "-1", "an integer >= 0"),
    ("INPUT.MAX_SIZE_TEST", "0", "an integer >= 1"),
    ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "0", "an integer >= 1"),
    ("TEST.DETECTIONS_PER_IMAGE", "0", "an integer >= 1"),
    ("TEST.DETECTIONS_PER_IMAGE", "-1", "an integer >= 1"),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", "0", "an integer >= 1"),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", "-5", "an integer >= 1"),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", "0", "an integer >= 1"),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "0", "an integer >= 1"),
    ("MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]", "numbers > 0"),
    ("MODEL.PIXEL_STD", "[57.0, 0.0, 57.0]", "numbers > 0"),
    ("MODEL.PIXEL_STD", "[1.0, 1.0]", "one number per channel"),
    ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "nan", "a number <= 1"),
    ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.5", "a number <= 1"),
    ("MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.5", "[0, 1]"),
]


@pytest.mark.parametrize("key,value,allowed", D2_BAD)
def test_detectron2_keys_vild_d2_reads_are_range_checked(key, value, allowed):
    with pytest.raises(ValueError) as e:
        load_config(CONFIG, [key, value])
    message = str(e.value)
    assert f"{key} = " in message and allowed in message, message


def test_a_number_of_another_type_gets_the_range_message_not_type_mismatch():
    # yacs refused both for their type ("Type mismatch (float vs int)", "(float vs str)").
    opts = ["MODEL.VILD.TEMPERATURE", "-1", "MODEL.VILD.ENSEMBLE_LAMBDA", "nan"]
    with pytest.raises(ValueError) as e:
        load_config(CONFIG, opts)
    message = str(e.value)
    assert "Type mismatch" not in message
    assert "MODEL.VILD.TEMPERATURE = -1.0: must be a number in (0, 1]" in message, message
    assert "MODEL.VILD.ENSEMBLE_LAMBDA = nan: must be a number in [0, 1]" in message, message
    # An integer in range is the float it spells; "inf" is named too.
    assert load_config(CONFIG, ["MODEL.VILD.TEMPERATURE", "1"]).MODEL.VILD.TEMPERATURE == 1.0
    with pytest.raises(ValueError, match=r"DISTILL_WEIGHT = inf: must be a number >= 0"):
        load_config(CONFIG, ["MODEL.VILD.DISTILL_WEIGHT", "inf"])
    # A key without a range keeps yacs's refusal of a NaN (it is never let through).
    with pytest.raises(ValueError, match="Type mismatch"):
        load_config(CONFIG, ["SOLVER.BASE_LR", "nan"])


def test_zero_pixel_std_from_a_yaml_file_is_named(tmp_path):
    config = tmp_path / "std.yaml"
    config.write_text(f"_BASE_: {Path(CONFIG).resolve()}\nMODEL:\n  PIXEL_STD: [0, 0, 0]\n")
    with pytest.raises(ValueError, match=r"MODEL\.PIXEL_STD = \[0, 0, 0\]: must be numbers > 0"):
        load_config(str(config))


def test_min_size_test_zero_means_no_resize_and_is_accepted():
    assert load_config(CONFIG, ["INPUT.MIN_SIZE_TEST", "0"]).INPUT.MIN_SIZE_TEST == 0
