"""Tests for vild_d2.text: prompts, CLIP prompt ensembles, the cache, vocabularies and the CLI."""

import dataclasses
import hashlib
import vild_d2  # noqa: F401  (first: applies compat bridges before detectron2 imports)

import logging
import subprocess
import sys
import uuid
from pathlib import Path

import clip
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from vild_d2.text import (
    DEFAULT_TEMPLATES_PATH,
    TextEncoder,
    Vocabulary,
    article,
    check_same_width,
    fill_prompts,
    load_clip,
    load_templates,
    process_name,
    resolve_vocabulary,
    vocabulary_from_names,
)
from tiny_world import save_random_clip  # tests/ helper

REPO = Path(__file__).resolve().parents[2]

# A few templates whose filled prompts are written out by hand below.
TEMPLATES = ["a photo of {article} {}.", "There is the {} in the scene.", "{}"]
PROMPTS = {
    "traffic_light": [
        "This is a photo of a traffic light.",
        "There is the traffic light in the scene.",
        "traffic light",
    ],
    "apple": ["This is a photo of an apple.", "There is the apple in the scene.", "This is apple"],
    "stoplight": [
        "This is a photo of a stoplight.",
        "There is the stoplight in the scene.",
        "stoplight",
    ],
}


def reference_embedding(model, prompt_lists):
    """Independent float64 ensemble: one (D,) vector from the prompts of a class's names."""
    prompts = [p for ps in prompt_lists for p in ps]
    with torch.no_grad():
        e = model.encode_text(clip.tokenize(prompts)).double()
    e = e / e.norm(dim=-1, keepdim=True)
    m = e.mean(dim=0)
    return m / m.norm()


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_path):
    model, _ = clip.load(tiny_clip_path, device="cpu", jit=False)
    return model.float().eval()


# ---------------------------------------------------------------- prompts


def test_process_name_and_article():
    assert process_name("traffic_light") == "traffic light"
    assert process_name("a/b.") == "a or b"
    assert process_name("  Pool_Cue. ") == "pool cue"
    assert process_name("salad_plate/side_plate") == "salad plate or side plate"
    assert article("apple") == "an"
    assert article("Egg") == "an"
    assert article("_umbrella") == "an"  # processed to "umbrella"
    assert article("banana") == "a"
    assert article("traffic_light") == "a"


def test_fill_prompts_this_is_rule():
    templates = [
        "There is {article} {} in the scene.",
        "a photo of the {}.",
        "{article} {}.",  # article first: "a ..." / "an ..." -> prefixed
        "the {} is big",
        "art of the {}.",  # naive startswith("a") also matches "art"
        "A photo of {}",  # case-sensitive: not prefixed
        "itap of {article} {}.",
    ]
    assert fill_prompts("traffic_light", templates) == [
        "There is a traffic light in the scene.",
        "This is a photo of the traffic light.",
        "This is a traffic light.",
        "This is the traffic light is big",
        "This is art of the traffic light.",
        "A photo of traffic light",
        "itap of a traffic light.",
    ]
    assert fill_prompts("Apple.", ["{article} {}.", "{} in the scene"]) == [
        "This is an apple.",
        "This is apple in the scene",  # the name itself starts with "a"
    ]
    for name, prompts in PROMPTS.items():
        assert fill_prompts(name, TEMPLATES) == prompts


def test_default_templates():
    templates = load_templates()
    assert templates == load_templates("") == load_templates(str(DEFAULT_TEMPLATES_PATH))
    assert len(templates) == 63
    assert all("{}" in t and t == t.strip() for t in templates)
    assert "There is {article} {} in the scene." in templates


def test_template_file_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("  a photo of {}. \n\n{article} {}\n")
    assert load_templates(str(good)) == ["a photo of {}.", "{article} {}"]

    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {}.\n\na photo of a thing.\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3"):
        load_templates(str(bad))

    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_templates(str(missing))


# ---------------------------------------------------------------- CLIP and encoder


def test_tiny_clip_round_trip(tiny_clip_path, tiny_clip):
    assert type(tiny_clip.visual).__name__ == "VisionTransformer"
    assert tiny_clip.text_projection.shape[1] == 32
    model, identity = load_clip(tiny_clip_path)
    assert not model.training and model.text_projection.dtype == torch.float32
    assert (
        identity == f"sha256:{hashlib.sha256(Path(tiny_clip_path).read_bytes()).hexdigest()[:16]}"
    )
    with pytest.raises(ValueError, match="64"):
        save_random_clip(str(Path(tiny_clip_path).with_name("bad.pt")), transformer_width=32)


def test_unknown_clip_spec():
    with pytest.raises(FileNotFoundError, match="neither") as e:
        load_clip("/no/such/clip.pt")
    assert "ViT-B/32" in str(e.value)
    with pytest.raises(FileNotFoundError):
        TextEncoder("not-a-clip", cache_dir=None).identity
    assert TextEncoder("ViT-B/32", cache_dir=None).identity == "ViT-B/32"


def test_ensemble_matches_float64_reference(tiny_clip_path, tiny_clip):
    # batch_size=2 makes batches straddle class boundaries.
    enc = TextEncoder(tiny_clip_path, templates=TEMPLATES, cache_dir=None, batch_size=2)
    assert not enc.is_loaded
    names = ["traffic_light", "apple", "stoplight"]
    emb = enc.encode(names)
    assert enc.is_loaded
    assert emb.dtype == torch.float32 and emb.device.type == "cpu" and emb.shape == (3, 32)
    ref = torch.stack([reference_embedding(tiny_clip, [PROMPTS[n]]) for n in names])
    torch.testing.assert_close(emb.double(), ref, atol=1e-5, rtol=0)


def test_synonyms_are_averaged(tiny_clip_path, tiny_clip):
    enc = TextEncoder(tiny_clip_path, templates=TEMPLATES, cache_dir=None)
    # The repeated "traffic_light" synonym must not be counted twice.
    emb = enc.encode(["traffic_light", "apple"], synonyms=[["stoplight", "traffic_light"], []])
    plain = enc.encode(["traffic_light", "apple"])
    ref = reference_embedding(tiny_clip, [PROMPTS["traffic_light"], PROMPTS["stoplight"]])
    torch.testing.assert_close(emb[0].double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb[1], plain[1])
    assert (emb[0] - plain[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="synonym"):
        enc.encode(["a", "b"], synonyms=[["c"]])


def test_width_is_read_from_model(tmp_path):
    path = save_random_clip(str(tmp_path / "clip16.pt"), embed_dim=16, seed=1)
    emb = TextEncoder(path, templates=TEMPLATES, cache_dir=None).encode(["cat", "dog"])
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_default_templates_and_empty_names(tiny_clip_path):
    enc = TextEncoder(tiny_clip_path, cache_dir=None)
    assert len(enc.templates) == 63
    emb = enc.encode(["cat", "dog"])
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="no class names"):
        enc.encode([])


def test_cache_hit_does_not_load_clip(tiny_clip_path, tmp_path, monkeypatch):
    names = ["traffic_light", "apple"]
    first = TextEncoder(tiny_clip_path, templates=TEMPLATES, cache_dir=str(tmp_path))
    e1 = first.encode(names)
    assert [p.parent for p in tmp_path.rglob("*.pt")] == [tmp_path / "text"]
    assert not list(tmp_path.rglob("*.tmp"))

    def no_load(*args, **kwargs):
        raise AssertionError("CLIP must not be loaded on a cache hit")

    monkeypatch.setattr(clip, "load", no_load)
    second = TextEncoder(tiny_clip_path, templates=TEMPLATES, cache_dir=str(tmp_path))
    e2 = second.encode(names)
    assert not second.is_loaded
    assert torch.equal(e1, e2)

    # Anything that changes the embeddings changes the key.
    other = TextEncoder(tiny_clip_path, templates=TEMPLATES[:2], cache_dir=str(tmp_path))
    keys = {
        first.cache_path(names),
        other.cache_path(names),
        first.cache_path(names[::-1]),
        first.cache_path(names, synonyms=[["stoplight"], []]),
    }
    assert len(keys) == 4
    assert all(k.parent == tmp_path / "text" for k in keys)
    with pytest.raises(AssertionError, match="must not be loaded"):
        other.encode(names)


def test_corrupt_cache_is_recomputed(tiny_clip_path, tmp_path, caplog):
    names = ["traffic_light", "apple"]
    enc = TextEncoder(tiny_clip_path, templates=TEMPLATES, cache_dir=str(tmp_path))
    expected = enc.encode(names)
    path = enc.cache_path(names)
    path.write_bytes(path.read_bytes()[:100])  # truncated

    fresh = TextEncoder(tiny_clip_path, templates=TEMPLATES, cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="vild_d2.text.encoder"):
        got = fresh.encode(names)
    assert fresh.is_loaded
    assert any(str(path) in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(got, expected)
    # ... and the rewritten cache is valid again.
    assert torch.equal(torch.load(path, weights_only=True), got)


# ---------------------------------------------------------------- Vocabulary


def test_vocabulary_validation():
    with pytest.raises(ValueError, match="empty vocabulary"):
        Vocabulary([], torch.zeros(0, 4))
    with pytest.raises(ValueError, match="duplicate") as e:
        Vocabulary(["cat", "dog", "cat"], torch.zeros(3, 4))
    assert "'cat'" in str(e.value) and "'dog'" not in str(e.value)
    with pytest.raises(ValueError, match=r"K = 2.*\(3, 4\)"):
        Vocabulary(["cat", "dog"], torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        Vocabulary(["cat", "dog"], torch.zeros(2))
    with pytest.raises(ValueError, match="novel"):
        Vocabulary(["cat", "dog"], torch.zeros(2, 4), novel=torch.tensor([True]))
    v = Vocabulary(("cat", "dog"), torch.zeros(2, 4, dtype=torch.float64))
    assert len(v) == 2 and v.dim == 4 and v.names == ["cat", "dog"]
    assert v.embeddings.dtype == torch.float32


def test_vocabulary_is_base():
    emb = torch.arange(12.0).view(3, 4)
    v = Vocabulary(["cat", "dog", "zebra"], emb, novel=[False, False, True], clip_model="x")
    assert v.is_base_for(["cat", "dog", "zebra"]).tolist() == [True, True, False]
    unknown = Vocabulary(["cat", "dog", "zebra"], emb)
    assert unknown.is_base_for(["dog"]).tolist() == [False, True, False]


def test_vocabulary_save_load(tmp_path):
    emb = torch.randn(3, 5)
    v = Vocabulary(["cat", "dog", "zebra"], emb, novel=torch.tensor([0, 0, 1]), clip_model="c|1|2")
    path = tmp_path / "deep" / "dir" / "vocab.pth"
    v.save(str(path))
    w = Vocabulary.load(str(path))
    assert w.names == v.names and w.clip_model == "c|1|2"
    assert torch.equal(w.embeddings, emb) and w.novel.tolist() == [False, False, True]
    assert [p.name for p in path.parent.iterdir()] == ["vocab.pth"]  # no temp file left

    plain = Vocabulary(["a"], torch.ones(1, 2))
    plain.save(str(tmp_path / "plain.pt"))
    assert Vocabulary.load(str(tmp_path / "plain.pt")).novel is None


def test_vocabulary_load_errors(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Vocabulary.load(str(missing))

    good = tmp_path / "good.pth"
    Vocabulary(["cat", "dog"], torch.randn(2, 8)).save(str(good))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file\n" * 10)
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match="cannot read vocabulary") as e:
            Vocabulary.load(str(path))
        assert str(path) in str(e.value)

    other = tmp_path / "other.pth"
    torch.save({"model": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a vocabulary") as e:
        Vocabulary.load(str(other))
    assert str(other) in str(e.value)

    bad_shape = tmp_path / "bad_shape.pth"
    d = Vocabulary(["cat", "dog"], torch.randn(2, 8)).state_dict()
    d["embeddings"] = torch.randn(3, 8)
    torch.save(d, bad_shape)
    with pytest.raises(ValueError, match="K = 2") as e:
        Vocabulary.load(str(bad_shape))
    assert str(bad_shape) in str(e.value)


def test_check_same_width():
    v = Vocabulary(["cat"], torch.ones(1, 768), clip_model="ViT-L/14")
    check_same_width(v, 768, "lvis")
    with pytest.raises(ValueError) as e:
        check_same_width(v, 512, "lvis", clip_model="ViT-B/32")
    msg = str(e.value)
    assert all(s in msg for s in ("lvis", "768-d", "512-d", "ViT-L/14", "ViT-B/32"))
    # Where it came from, when known (a file), so the user knows what to rebuild.
    with pytest.raises(ValueError, match=r"test vocabulary \(file /x/v.pth\) has 768-d"):
        check_same_width(dataclasses.replace(v, source="file /x/v.pth"), 512, "test vocabulary")


# ---------------------------------------------------------------- resolve_vocabulary


@pytest.fixture
def encoder(tiny_clip_path, tmp_path):
    return TextEncoder(tiny_clip_path, templates=TEMPLATES, cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def dataset_name():
    name = f"vild_d2_test_text_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: [])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_resolve_from_names_and_file(encoder, tmp_path):
    names = ["cat", "dog", "zebra"]
    v = resolve_vocabulary(names, encoder)
    assert v.names == names and v.dim == 32 and v.novel is None
    assert v.clip_model == encoder.identity
    assert torch.equal(v.embeddings, encoder.encode(names))
    assert resolve_vocabulary(v, encoder) is v

    path = tmp_path / "v.pth"
    vocabulary_from_names(names, encoder, novel=["zebra"]).save(str(path))
    w = resolve_vocabulary(str(path), encoder)
    assert w.names == names and w.novel.tolist() == [False, False, True]
    assert torch.equal(w.embeddings, v.embeddings)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_vocabulary(str(tmp_path / "nope.pth"), encoder)
    with pytest.raises(ValueError, match="neither a file, a registered dataset nor a built-in"):
        resolve_vocabulary(f"no_such_dataset_{uuid.uuid4().hex}", encoder)
    with pytest.raises(ValueError, match="novel classes not among"):
        vocabulary_from_names(names, encoder, novel=["unicorn"])


def test_resolve_from_dataset(encoder, dataset_name):
    MetadataCatalog.get(dataset_name).set(
        thing_classes=["traffic_light", "apple", "zebra"],
        novel_classes=["zebra"],
        class_synonyms=[["stoplight"], ["apple"], ["zebra"]],
    )
    v = resolve_vocabulary(dataset_name, encoder)
    assert v.names == ["traffic_light", "apple", "zebra"]
    assert v.novel.tolist() == [False, False, True]
    assert v.is_base_for([]).tolist() == [True, True, False]
    assert torch.equal(v.embeddings, encoder.encode(v.names))

    s = resolve_vocabulary(dataset_name, encoder, use_synonyms=True)
    syn = encoder.encode(v.names, synonyms=[["stoplight"], ["apple"], ["zebra"]])
    assert torch.equal(s.embeddings, syn)
    assert not torch.allclose(s.embeddings[0], v.embeddings[0])
    torch.testing.assert_close(s.embeddings[1:], v.embeddings[1:])


def test_builtin_vocabularies():
    from vild_d2.text.categories import builtin_vocabulary

    # Sizes and splits are the benchmarks' published ones (LVIS v1: 337 rare of 1203).
    sizes = {"lvis": (1203, 337), "coco": (80, None), "coco_ov": (65, 17), "voc": (20, None)}
    sizes["objects365"] = (365, None)
    for name, (k, n_novel) in sizes.items():
        v = builtin_vocabulary(name)
        assert len(v.names) == len(set(v.names)) == k, name
        assert (None if v.novel is None else len(v.novel)) == n_novel, name
    voc = builtin_vocabulary("voc").names
    assert voc[0] == "airplane" and "dining table" in voc and "tv monitor" in voc
    assert "motorbike" in voc and "aeroplane" not in voc
    coco_ov = builtin_vocabulary("coco_ov")
    assert {"bus", "cat", "dog", "umbrella", "scissors"} <= set(coco_ov.novel)
    assert "person" in coco_ov.names and "person" not in coco_ov.novel
    # COCO 80 minus the 15 classes without OV labels in the 48/17 benchmark.
    assert "hair drier" in builtin_vocabulary("coco").names and "hair drier" not in coco_ov.names
    lvis = builtin_vocabulary("lvis")
    assert lvis.synonyms[lvis.names.index("aerosol_can")] == ["aerosol_can", "spray_can"]
    with pytest.raises(ValueError, match="unknown built-in vocabulary 'klingon'"):
        builtin_vocabulary("klingon")


def test_resolve_builtin_vocabulary(encoder):
    v = resolve_vocabulary("voc", encoder)
    assert len(v.names) == 20 and v.novel is None
    assert torch.equal(v.embeddings, encoder.encode(v.names))


def test_dataset_without_thing_classes(encoder, dataset_name):
    with pytest.raises(ValueError, match="no thing_classes"):
        resolve_vocabulary(dataset_name, encoder)


# ---------------------------------------------------------------- CLI


@pytest.mark.slow
def test_build_text_classifier_cli(tiny_clip_path, tmp_path):
    out = tmp_path / "out" / "animals.pth"
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n")
    cmd = [
        sys.executable,
        str(REPO / "tools" / "build_text_classifier.py"),
        "--clip",
        tiny_clip_path,
        "--names",
        "traffic_light, apple,stoplight",
        "--novel",
        "stoplight",
        "--templates",
        str(templates),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "K=3" in res.stdout and "D=32" in res.stdout and str(out) in res.stdout

    v = Vocabulary.load(str(out))
    assert v.names == ["traffic_light", "apple", "stoplight"]
    assert v.novel.tolist() == [False, False, True]
    enc = TextEncoder(tiny_clip_path, templates=TEMPLATES, cache_dir=None)
    assert v.clip_model == enc.identity
    torch.testing.assert_close(v.embeddings, enc.encode(v.names))
