"""The shapes world's tiny CLIP teacher: its loss, its crops and captioned windows, and that its
checkpoint is a real CLIP checkpoint for ``clip.load`` and the text-classifier tool."""

import vild_d2  # noqa: F401  (compat bridges first)

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import clip
import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from clip.model import CLIP

from captions import caption, caption_pairs, scene_with_texture, visible_in_window
from tiny_clip import (
    TeacherSpec,
    _contrastive_loss,
    _follow_threads_file,
    _training_data,
    object_crops,
    probe_windows,
    train_tiny_clip,
    unique_captions,
)
from vild_d2.data.datasets.shapes import (
    WorldSpec,
    background_texture,
    draw_scene,
    generate_shapes_world,
)
from vild_d2.data.datasets.shapes_geometry import background
from vild_d2.text import Vocabulary

# Trains, evaluates or starts processes: minutes on a CPU (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_contrastive_loss_matches_a_float64_reference():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(torch.randn(4, 5, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 1])  # class 3 absent from the batch
    scale = 10.0
    # Written out: image -> caption softmax; each present caption -> its crops, equally.
    logits = (scale * image @ text.t()).numpy()
    i2t = np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels.numpy())])
    t2i = []
    for k in (0, 1, 2):
        col = logits[:, k]
        log_p = col - np.log(np.exp(col).sum())
        mine = labels.numpy() == k
        t2i.append(-log_p[mine].mean())
    expected = (i2t + np.mean(t2i)) / 2
    got = _contrastive_loss(image, text, labels, scale)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_object_crops_are_balanced_and_clip_shaped():
    world = WorldSpec(num_train=1, num_val=1, image_size=96)
    crops, labels = object_crops(world, per_class=3, size=32, seed=0)
    assert crops.shape[1:] == (3, 32, 32) and crops.dtype == torch.float16
    counts = torch.bincount(labels, minlength=len(world.classes))
    # Every category, each about per_class times (an object hidden by a later one is skipped).
    assert counts.min() >= 1 and counts.max() <= 3
    assert len(labels) >= 0.9 * 3 * len(world.classes)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "tiny_clip.pt"
    world = WorldSpec(num_train=1, num_val=1, image_size=96)
    spec = TeacherSpec(
        data="scenes", steps=3, batch_size=16, crops_per_class=2, heldout_per_class=1
    )
    summary = train_tiny_clip(world, str(out), spec, log=lambda m: None)
    return out, summary, world


def test_checkpoint_loads_with_clip_load(teacher):
    path, summary, world = teacher
    model, preprocess = clip.load(str(path), device="cpu", jit=False)
    assert isinstance(model, CLIP)
    assert model.visual.input_resolution == TeacherSpec.image_resolution
    assert model.context_length == TeacherSpec.context_length
    tokens = clip.tokenize(["a photo of a red star."], context_length=model.context_length)
    assert model.float().encode_text(tokens).shape == (1, TeacherSpec.embed_dim)
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["data"] == "scenes"
    for key in (
        "top_prob_background",
        "top_prob_parts",
        "top_prob_objects",
        "top1_parts",
        "accuracy_context_1_5",
    ):
        assert 0.0 <= summary[key] <= 1.0, key
    assert -1.0 <= summary["cosine_object_text"] <= 1.0
    assert -1.0 <= summary["cosine_caption"] <= 1.0
    assert summary["heldout_crops"] >= len(world.classes) - 2


def test_text_classifier_tool_reads_the_teacher(teacher, tmp_path):
    path, _, _ = teacher
    out = tmp_path / "vocab.pth"
    cmd = [
        sys.executable,
        "tools/build_text_classifier.py",
        "--clip",
        str(path),
        "--names",
        "red star,blue square",
        "--novel",
        "red star",
        "--cache-dir",
        "",
        "--output",
        str(out),
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    vocab = Vocabulary.load(str(out))
    assert vocab.names == ["red star", "blue square"]
    assert vocab.dim == TeacherSpec.embed_dim
    assert vocab.novel.tolist() == [True, False]
    # The tool's embedding is the 63-prompt ensemble of the loaded checkpoint.
    from vild_d2.text.prompts import fill_prompts, load_templates

    model, _ = clip.load(str(path), device="cpu", jit=False)
    model = model.float().eval()
    prompts = fill_prompts("red star", load_templates())
    tokens = clip.tokenize(prompts, context_length=model.context_length)
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.encode_text(tokens).double(), dim=1)
    expected = torch.nn.functional.normalize(e.mean(0), dim=0)
    torch.testing.assert_close(vocab.embeddings[0].double(), expected, atol=1e-5, rtol=0)


def test_train_tool_reports_a_missing_world(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "demo/tiny_clip.py",
            "--world",
            str(tmp_path),
            "--output",
            str(tmp_path / "t.pt"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "no shapes world at" in result.stderr and "world.json missing" in result.stderr
    assert not (tmp_path / "t.pt").exists()


def test_identical_captions_are_one_caption_class():
    # Worked by hand: images 0 and 2 are red stars with the same caption; image 1 is background.
    tokens = clip.tokenize(["a red star.", "a dark background.", "a red star."], context_length=8)
    text_tokens, labels = unique_captions(tokens)
    assert len(text_tokens) == 2 and labels[0] == labels[2] != labels[1]
    star, ground = torch.eye(2, dtype=torch.float64)
    text = torch.empty(2, 2, dtype=torch.float64)
    text[labels[0]], text[labels[1]] = star, ground
    image = torch.stack([star, ground, star])
    scale = math.log(3)  # exp(logit) = 3 for an image and its caption, 1 otherwise
    # image -> text: each image's caption against the one other caption: -log(3 / (3 + 1)).
    # text -> image: "a red star." over the images (3, 1, 3), its mass split between its two
    # images: -log(3 / 7) each; "a dark background." over (1, 3, 1): -log(3 / 5).
    expected = (math.log(4 / 3) + (math.log(7 / 3) + math.log(5 / 3)) / 2) / 2
    got = _contrastive_loss(image, text, labels, scale)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # CLIP's own loss (one caption row per image, the diagonal positive) makes image 2's caption
    # a negative of image 0 and back: a higher loss for the same, perfectly matched batch.
    plain = _contrastive_loss(image, image.clone(), torch.arange(3), scale)
    assert plain.item() == pytest.approx((2 * math.log(7 / 3) + math.log(5 / 3)) / 3, rel=1e-12)
    assert got < plain


def test_caption_pairs_are_deterministic_and_cover_every_category():
    world = WorldSpec(num_train=1, num_val=1, image_size=64)
    a = caption_pairs(world, 600, 32, seed=0, max_tokens=30)
    b = caption_pairs(world, 600, 32, seed=0, max_tokens=30)
    c = caption_pairs(world, 40, 32, seed=1, max_tokens=30)
    assert torch.equal(a.crops, b.crops) and a.captions == b.captions and a.kinds == b.kinds
    assert np.array_equal(a.windows, b.windows) and np.array_equal(a.scenes, b.scenes)
    assert a.captions[:40] != c.captions
    assert a.crops.shape == (600, 3, 32, 32) and a.crops.dtype == torch.float16
    assert set(a.kinds) == {"object", "part", "window", "background"}
    flat = [t for variants in a.captions for t in variants]
    clip.tokenize(flat, context_length=32)  # raises if a caption does not fit the context
    text = " ".join(flat)
    # Every category, base and novel, is named (as every LVIS category is somewhere on the web).
    assert all(name in text for name in world.classes)
    assert len(set(flat)) > len(flat) / 4  # free-form: many distinct captions


COLOURS = "red|orange|yellow|green|blue|purple"
SHAPES = "circle|square|triangle|star|cross|heart"
NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
# An object named in a caption, with what the words before it say of how much of it is there.
MENTION = re.compile(
    r"(?:(?P<cut>part of|a piece of|the edge of|a corner of|half of|half|most of) an? "
    rf"|(?P<num>{'|'.join(NUMBERS)}) )?(?P<name>(?:{COLOURS}) (?:{SHAPES}))(?:es|s)?\b"
)
# A colour without a shape: a sliver of an object, too small to say which.
SLIVER = re.compile(rf"(?:a bit of|something) (?P<colour>{COLOURS})\b")
# What the cut-off words promise, as shares of an object's visible pixels in the window.
# "whole" means >= 90%; "part of", "a piece of", "the edge of", "a corner of": anything less.
CUT_SHARE = {"half": (0.35, 0.6), "half of": (0.35, 0.6), "most of": (0.6, 0.9)}


def _check_caption(text, objects, window):
    """Check ``text`` against the annotated visible pixels ``objects`` [(name, mask)] of a
    window: named objects are there, as whole / cut off as the words say; counts are exact;
    with no "more shapes", nothing nameable (whole, or >= 25% of the window, the recipe's rule)
    is left out."""
    x0, y0, x1, y1 = window
    area = (x1 - x0) * (y1 - y0)
    whole, cut, colours = {}, [], set()
    for name, mask in objects:
        inside, total = int(mask[y0:y1, x0:x1].sum()), int(mask.sum())
        if inside < 8:
            continue  # not there: 8 pixels or more to count at all
        colours.add(name.split(" ")[0])
        if inside >= 0.9 * total:
            whole[name] = whole.get(name, 0) + 1
        elif inside >= 0.25 * area:
            cut.append((name, inside / total))
    for m in SLIVER.finditer(text):
        assert m["colour"] in colours, f"{text!r}: nothing {m['colour']} in window {window}"
    if "empty" in text or "nothing but" in text:
        assert not colours, f"{text!r}: window {window} shows {colours}"
    mentions = list(MENTION.finditer(text))
    said_whole, used = {}, set()
    # Cut-off mentions with a narrow meaning first, so that "part of" cannot take their object.
    for m in sorted(mentions, key=lambda m: m["cut"] not in CUT_SHARE):
        if m["cut"]:
            lo, hi = CUT_SHARE.get(m["cut"], (0.0, 0.9))
            fits = [i for i, (n, f) in enumerate(cut) if n == m["name"] and lo <= f < hi]
            fits = [i for i in fits if i not in used]
            assert fits, f"{text!r}: no {m['cut']} {m['name']} in window {window}"
            used.add(fits[0])
        else:
            said_whole[m["name"]] = said_whole.get(m["name"], 0) + NUMBERS.get(m["num"], 1)
    for name, n in said_whole.items():
        assert whole.get(name, 0) == n, f"{text!r}: {whole.get(name, 0)} whole {name} in {window}"
    if "more shapes" not in text:
        assert said_whole == whole, f"{text!r} leaves out whole objects {whole} of {window}"
        assert len(used) == len(cut), f"{text!r} leaves out cut-off objects {cut} of {window}"
    count = re.match(r"(\w+) shapes: ", text)
    if count:
        assert NUMBERS[count[1]] == sum(whole.values()) and not cut, text
    return bool(mentions)


@pytest.fixture(scope="module")
def annotated_scenes(tmp_path_factory):
    """The val scenes of a tiny world (every category annotated there), as (image, objects):
    objects = (name, mask of its visible pixels), read back from the LVIS json."""
    root = tmp_path_factory.mktemp("captions") / "shapes"
    spec = WorldSpec(num_train=4, num_val=8, image_size=64)
    generate_shapes_world(root, spec)
    doc = json.loads((root / "annotations" / "val.json").read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    scenes = []
    for img in doc["images"]:
        objects = []
        for ann in (a for a in doc["annotations"] if a["image_id"] == img["id"]):
            rles = mask_util.frPyObjects(ann["segmentation"], spec.image_size, spec.image_size)
            objects.append((names[ann["category_id"]], mask_util.decode(mask_util.merge(rles)) > 0))
        image = cv2.imread(str(root / "images" / img["file_name"]))[:, :, ::-1]
        scenes.append((image, objects))
    return scenes


def test_captions_name_only_what_the_window_shows(annotated_scenes):
    rng = np.random.default_rng(0)
    named = background = 0
    for image, objects in annotated_scenes:
        size = image.shape[0]
        windows = [(0, 0, size, size)]
        for _, mask in objects:  # around each object, and on a quarter of it
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            windows += [
                (max(0, x0 - 3), max(0, y0 - 3), x1 + 3, y1 + 3),
                (x0, y0, (x0 + x1 + 1) // 2, (y0 + y1 + 1) // 2),
            ]
        for _ in range(20):
            side = int(rng.integers(6, size + 1))
            x0, y0 = rng.integers(0, size - side + 1, size=2)
            windows.append((int(x0), int(y0), int(x0) + side, int(y0) + side))
        covered = np.any([m for _, m in objects], axis=0)
        for window in windows:
            x0, y0, x1, y1 = window
            seen = visible_in_window(objects, window)
            share = 1 - covered[y0:y1, x0:x1].mean()
            for _ in range(8):
                text = caption(rng, seen, "grey noisy striped", share)
                if _check_caption(text, objects, window):
                    named += 1
                    # The background is named beside objects only when it is much of the view.
                    assert "background" not in text or share >= 0.3, (text, window)
                else:
                    background += 1
    assert named > 500 and background > 20


def test_background_texture_is_the_worlds_background():
    kinds = set()
    for seed in range(16):
        image, texture = background_texture(np.random.default_rng(seed), 48)
        np.testing.assert_array_equal(image, background(np.random.default_rng(seed), 48))
        kinds.add(texture["kind"])
    assert kinds == {"plain", "gradient", "stripes", "checker"}
    # The world's pictures are those of before the texture was reported (a seed-0 scene).
    picture, _ = draw_scene(np.random.default_rng([0, 100]), WorldSpec())
    assert hashlib.sha256(picture.tobytes()).hexdigest()[:16] == "9d371fb49b1860d0"
    # A scene with its texture is the scene draw_scene draws.
    world = WorldSpec(image_size=64)
    names = ["red star", "blue square", "green heart"]
    image, objects, texture = scene_with_texture(np.random.default_rng(3), world, names)
    again, objects_again = draw_scene(np.random.default_rng(3), world, names)
    np.testing.assert_array_equal(image, again)
    assert [n for n, _, _ in objects] == [n for n, _, _ in objects_again]


def test_probe_windows():
    world = WorldSpec(num_train=1, num_val=1, image_size=64)
    background, parts, labels = probe_windows(world, 5, 32, seed=0)
    assert background.shape == parts.shape == (5, 3, 32, 32)
    assert labels.shape == (5,) and 0 <= labels.min() and labels.max() < len(world.classes)


def test_the_crops_recipe_is_kept():
    # The old recipe's data (the training loop and report are the scenes fixture's): object
    # crops, and per step one prompt template for all categories, the crop's class its caption.
    world = WorldSpec(num_train=1, num_val=1, image_size=64)
    spec = TeacherSpec(data="crops", crops_per_class=1)
    images, captions, every_token = _training_data(world, spec)
    assert images.shape[1:] == (3, spec.image_resolution, spec.image_resolution)
    idx = torch.arange(min(8, len(images)))
    tokens, labels = captions(idx, torch.Generator().manual_seed(0))
    assert tokens.shape == (len(world.classes), spec.context_length)
    assert set(tokens.unique().tolist()) <= set(every_token.unique().tolist())
    assert labels.shape == idx.shape and labels.max() < len(world.classes)
    with pytest.raises(ValueError, match="'scenes' or 'crops'"):
        TeacherSpec(data="web")


@pytest.mark.parametrize("data", ["scenes", "crops"])
def test_compact_token_table_trains_the_same_model(tmp_path, data):
    """Training only the token rows the captions use (the default, for speed) must give the
    model that training CLIP's whole 49408-row table gives: the other rows get no gradient
    and no weight decay, so AdamW never moves them."""
    world = WorldSpec(num_train=1, num_val=1, image_size=96)
    spec = TeacherSpec(data=data, steps=4, batch_size=16, crops_per_class=2, heldout_per_class=1)
    states = {}
    for compact in (True, False):
        path = tmp_path / f"{compact}.pt"
        train_tiny_clip(world, str(path), spec, log=lambda m: None, compact_vocabulary=compact)
        states[compact] = torch.load(path)
    assert states[True].keys() == states[False].keys()
    for name, full in states[False].items():
        torch.testing.assert_close(states[True][name], full, rtol=1e-5, atol=1e-6, msg=name)
    # And the table did train: rows of caption tokens moved from the seed's initial values.
    torch.manual_seed(spec.seed)
    initial = spec.build().token_embedding.weight
    moved = (states[True]["token_embedding.weight"] - initial).abs().amax(1) > 0
    _, _, tokens = _training_data(world, spec)
    used = torch.zeros(len(moved), dtype=torch.bool)
    used[torch.unique(tokens)] = True
    assert moved[used].any() and not moved[~used].any()


def test_teacher_takes_the_cores_the_pipeline_hands_it(tmp_path):
    """$VILD_D2_THREADS_FILE: the teacher follows the thread count written there; a missing or
    half-written file keeps the current count."""
    threads = torch.get_num_threads()
    share, seen = tmp_path / "teacher.threads", []
    try:
        torch.set_num_threads(1)
        _follow_threads_file(str(share), seen.append)  # not written yet
        share.write_text("")
        _follow_threads_file(str(share), seen.append)  # being replaced
        assert torch.get_num_threads() == 1 and seen == []
        share.write_text("2")
        _follow_threads_file(str(share), seen.append)
        assert torch.get_num_threads() == 2 and "now 2 thread(s)" in seen[0]
    finally:
        torch.set_num_threads(threads)
