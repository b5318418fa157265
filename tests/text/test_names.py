"""Class names CLIP cannot tell apart are refused at every entry point (one rule: the text
encoder's), naming both; names whose prompts CLIP truncates are reported."""

import vild_d2  # noqa: F401  (first: compat bridges)

import functools
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

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
    from cli.vocabulary import vocabulary_from_cli  # tools/cli
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


# --- issue 27: names that are the same to CLIP are the same name ------------------------------
CAFE_NFC, CAFE_NFD = "caf\u00e9", "cafe\u0301"  # composed / decomposed é
ALIKE = [
    ("red star", "red  star"),  # two spaces
    (CAFE_NFC, CAFE_NFD),
    ("cat", "\uff43\uff41\uff54"),  # fullwidth ｃａｔ
    ("fish", "\ufb01sh"),  # the ligature ﬁ
    ("Apple pie", "\uff21pple pie"),  # fullwidth Ａ: a vowel, so "an" as for "Apple pie"
    ("dog!", "dog !"),  # CLIP splits punctuation from words either way
]


@functools.lru_cache(maxsize=1)
def _runtime_tokenizer():
    from vild_d2_runtime import Tokenizer

    return Tokenizer()  # the runtime's own (no clip package), found beside clip's BPE file


def _runtime_check(names):
    from vild_d2_runtime.names import check_distinguishable as runtime_check

    return runtime_check(names, TEMPLATES, _runtime_tokenizer().encode)


@pytest.mark.parametrize("a,b", ALIKE)
def test_names_clip_reads_alike_are_one_name_on_both_sides(a, b):
    from vild_d2_runtime.names import name_key

    assert a != b
    # CLIP's own tokenizer reads them alike: every prompt has the same tokens.
    prompts_a, prompts_b = fill_prompts(a, TEMPLATES), fill_prompts(b, TEMPLATES)
    assert clip.tokenize(prompts_a).equal(clip.tokenize(prompts_b))
    assert name_key(a) == name_key(b)
    for check in (lambda n: check_distinguishable(n, TEMPLATES), _runtime_check):
        with pytest.raises(
            ValueError, match=r"\(item 2\) and .* \(item 3\) would encode identically"
        ):
            check(["cat" if a != "cat" else "dog", a, b])
        assert check([a, "blue cross"]) == [] and check([b, "blue cross"]) == []


def test_the_normalised_forms():
    from vild_d2_runtime.contract import process_name

    # By hand: what CLIP's ftfy + whitespace + lower-case clean-up gives, then ViLD's rules.
    assert process_name("Red  Star") == "red star"
    assert process_name(CAFE_NFD) == CAFE_NFC == "caf\u00e9"
    assert process_name("\uff43\uff41\uff54") == "cat"
    assert process_name("\ufb01sh") == "fish"
    assert process_name(" traffic__light\t/ sign. ") == "traffic light or sign"
    assert fill_prompts("\uff21pple", ["a photo of {article} {}."]) == [
        "This is a photo of an apple."
    ]


@pytest.mark.parametrize("name", ["red\x00star", "red star\x1b", "cat\x7f", "do\x85g"])
def test_control_characters_are_refused_naming_the_name(name, tiny_clip_path, tmp_path):
    from vild_d2_runtime.contract import parse_names as runtime_parse

    code = f"U+{ord(next(c for c in name if c not in 'red star cat dog')):04X}"
    for check in (lambda n: check_distinguishable(n, TEMPLATES), _runtime_check):
        with pytest.raises(ValueError) as e:
            check(["blue cross", name])
        assert repr(name) in str(e.value) and code in str(e.value)
        assert "control character" in str(e.value) and "\n" not in str(e.value)
    assert runtime_parse(f"blue cross,{name}")[1] == name  # parsed, then refused by the check
    encoder = TextEncoder(tiny_clip_path, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="control character"):
        vocabulary_from_names(["blue cross", name], encoder)
    assert not encoder.is_loaded  # refused before CLIP was loaded
    # A tab is a space to CLIP: the same name as with a space, not refused.
    assert check_distinguishable(["red\tstar", "blue cross"], TEMPLATES) == []


def test_encoder_predictor_and_server_refuse_names_clip_reads_alike(predictor, tiny_clip_path):
    encoder = TextEncoder(tiny_clip_path, cache_dir=None)
    with pytest.raises(ValueError, match="identically"):
        vocabulary_from_names(["red star", "red  star"], encoder)
    with pytest.raises(ValueError, match="identically"):
        predictor.set_vocabulary(["cat", "\uff43\uff41\uff54"])
    with pytest.raises(BadInput, match="control character") as e:
        DetectionService(predictor).vocabulary("blue cross,red\x00star")
    assert e.value.status == 400


def test_a_saved_vocabulary_with_names_clip_reads_alike_is_refused(tmp_path):
    from vild_d2.text import Vocabulary

    emb = torch.nn.functional.normalize(
        torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1
    )
    same = torch.stack([emb[0], emb[1], emb[1]])
    Vocabulary(["cat", "red star", "blue cross"], emb).save(str(tmp_path / "ok.pth"))
    Vocabulary(["cat", "red star", "blue cross"], same).save(str(tmp_path / "ok2.pth"))
    bad = Vocabulary(["cat", "red star", "blue cross"], same).state_dict()
    bad["names"] = ["cat", "red star", "red  star"]  # as a file made before the rule
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(
        ValueError, match=r"bad.pth: .*'red star' \(item 2\) and 'red  star' \(item 3\)"
    ):
        Vocabulary.load(str(tmp_path / "bad.pth"))
    # The same name with another embedding (other synonyms): a distinct class, kept.
    assert Vocabulary(["bat", "Bat"], emb[:2]).names == ["bat", "Bat"]
    bad["names"] = ["cat", "red star", "blue\x00cross"]
    torch.save(bad, tmp_path / "control.pth")
    with pytest.raises(ValueError, match=r"control.pth: .*control character \(U\+0000"):
        Vocabulary.load(str(tmp_path / "control.pth"))


def test_nan_in_a_checkpoints_stored_vocabulary_is_refused(predictor, tmp_path):
    from vild_d2.checkpoint import IncompatibleCheckpointError, ViLDCheckpointer

    weights = predictor.cfg.MODEL.WEIGHTS
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    assert checkpoint["vocabulary"]["embeddings"].isfinite().all()
    checkpoint["vocabulary"]["embeddings"][1, 3] = float("nan")
    path = tmp_path / "nan_vocabulary.pth"
    torch.save(checkpoint, path)
    names = checkpoint["vocabulary"]["names"]
    before = predictor.model.vocabulary
    with pytest.raises(IncompatibleCheckpointError) as e:
        ViLDCheckpointer(predictor.model).load(str(path))
    message = str(e.value)
    assert str(path) in message and "NaN or infinite" in message and repr(names[1]) in message
    assert predictor.model.vocabulary is before  # the model's vocabulary is unchanged
