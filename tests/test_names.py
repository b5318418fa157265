"""Class names CLIP cannot tell apart are refused at every entry point (one rule: the text
encoder's), naming both; names whose prompts CLIP truncates are reported."""

import vild_d2  # noqa: F401  (first: compat bridges)

import logging
import subprocess
import sys

import numpy as np
import pytest

import clip
from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.serve import BadInput, DetectionService
from vild_d2.text import TextEncoder, builtin_vocabulary, load_templates, vocabulary_from_names
from vild_d2.text.prompts import fill_prompts
from vild_d2.text.tokens import check_distinguishable

from tiny_world import make_random_model  # tests/ helper

TEMPLATES = load_templates()
LONG = " ".join(f"w{i}" for i in range(40))  # 80 tokens: longer than CLIP's 77 alone


def _clip_tokens(text: str) -> int:
    """Token count of ``text`` by CLIP's own tokenize (start and end tokens included)."""
    ids = clip.tokenize([text], context_length=1000)[0]
    return int((ids != 0).sum())


@pytest.mark.parametrize(
    "a,b",
    [
        ("red star", "Red Star"),  # case
        ("Dog", "dog"),
        ("traffic_light", "traffic light"),  # "_" is a space
        ("dog.", "dog"),  # a trailing dot
        (LONG + " red", LONG + " blue"),  # differ only after the 77th token
    ],
)
def test_names_that_encode_identically_are_refused_naming_both(a, b):
    with pytest.raises(ValueError) as e:
        check_distinguishable(["cat", a, b], TEMPLATES)
    message = str(e.value)
    assert "(item 2)" in message and "(item 3)" in message and "identically" in message
    assert a[:40] in message and b[:40] in message


def test_long_names_that_differ_early_are_kept_and_reported(caplog):
    a, b = "red " + LONG, "blue " + LONG
    assert _clip_tokens(a) > 77  # (checked with CLIP's own tokenizer)
    with caplog.at_level(logging.WARNING, logger="vild_d2.text.tokens"):
        assert check_distinguishable([a, b, "cat"], TEMPLATES) == [a, b]
    assert "2 class name(s) are too long for CLIP's 77 tokens" in caplog.text


def test_the_limit_is_exactly_clips_77_tokens():
    # The longest ViLD prompt around a one-token name, counted by CLIP's own tokenize: a name
    # of n one-token words makes that prompt (longest - 1 + n) tokens long.
    assert _clip_tokens("dog dog") == 4  # "dog" is one token (plus start and end)
    longest = max(_clip_tokens(p) for p in fill_prompts("x", TEMPLATES))
    fits = " ".join(["dog"] * (77 - (longest - 1)))
    assert check_distinguishable([fits], TEMPLATES) == []
    assert check_distinguishable([fits + " dog"], TEMPLATES) == [fits + " dog"]


@pytest.mark.parametrize("vocabulary", ["lvis", "coco", "coco_ov", "voc", "objects365"])
def test_builtin_vocabularies_are_distinguishable(vocabulary):
    assert check_distinguishable(builtin_vocabulary(vocabulary).names, TEMPLATES) == []


def test_the_same_names_with_other_synonyms_are_distinct():
    check_distinguishable(["bat", "Bat"], TEMPLATES, synonyms=[["club"], ["flying mammal"]])


def test_encoder_refuses_before_computing(tiny_clip_path, tmp_path):
    encoder = TextEncoder(tiny_clip_path, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'red star' .* and 'Red Star'"):
        vocabulary_from_names(["red star", "Red Star"], encoder)
    assert not encoder.is_loaded  # refused before CLIP was loaded


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, tiny_clip_path):
    config_file, opts = make_random_model(tmp_path_factory.mktemp("names"), tiny_clip_path)
    return ViLDPredictor(load_config(config_file, opts))


def test_predictor_and_server_refuse_the_pair(predictor):
    with pytest.raises(ValueError, match="identically"):
        predictor.set_vocabulary(["red star", "Red Star"])
    service = DetectionService(predictor)
    with pytest.raises(BadInput, match="'red star' .* and 'Red Star'") as e:
        service.vocabulary("red star,Red Star")
    assert e.value.status == 400
    image = np.zeros((32, 32, 3), np.uint8)
    assert predictor(image)["instances"] is not None  # the model is unchanged and works


@pytest.mark.slow
def test_text_classifier_tool_refuses_the_pair(tiny_clip_path, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("Dog\ndog\n")
    result = subprocess.run(
        [
            sys.executable,
            "tools/build_text_classifier.py",
            "--clip",
            tiny_clip_path,
            "--names-file",
            str(names),
            "--output",
            str(tmp_path / "v.pth"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "'Dog' (item 1) and 'dog' (item 2)" in result.stderr
    assert not (tmp_path / "v.pth").exists()


def test_one_parser_for_typed_names():
    from vild_d2.engine.predictor import vocabulary_from_cli
    from vild_d2.serve.service import parse_names_text
    from vild_d2.text import parse_names

    assert parse_names(" red star, blue cross\ngreen heart ") == [
        "red star",
        "blue cross",
        "green heart",
    ]
    assert parse_names(" , \n") == []
    for text in ("a,,b", "a,b,", ",a"):
        with pytest.raises(ValueError, match="empty class name"):
            parse_names(text)
        with pytest.raises(ValueError, match="empty class name"):
            vocabulary_from_cli("custom", text)  # the demo's --custom-vocabulary
        with pytest.raises(BadInput, match="empty class name"):
            parse_names_text(text)  # the server
