"""The shapes world's tiny CLIP teacher: its loss, its crops, and that its checkpoint is a real
CLIP checkpoint for ``clip.load`` and the text-classifier tool."""

import vild_d2  # noqa: F401  (compat bridges first)

import subprocess
import sys
from pathlib import Path

import clip
import numpy as np
import pytest
import torch
from clip.model import CLIP

from tiny_clip import TeacherSpec, _contrastive_loss, object_crops, train_tiny_clip
from vild_d2.data.datasets.shapes import WorldSpec
from vild_d2.text import Vocabulary

REPO = Path(__file__).resolve().parent.parent


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
    spec = TeacherSpec(steps=3, batch_size=16, crops_per_class=2, heldout_per_class=1)
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
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["heldout_crops"] >= len(world.classes) - 2


def test_text_classifier_tool_reads_the_teacher(teacher, tmp_path):
    path, _, _ = teacher
    out = tmp_path / "vocab.pth"
    cmd = [sys.executable, "tools/build_text_classifier.py", "--clip", str(path),
           "--names", "red star,blue square", "--novel", "red star", "--cache-dir", "",
           "--output", str(out)]  # fmt: skip
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
        [sys.executable, "demo/tiny_clip.py", "--world", str(tmp_path), "--output",
         str(tmp_path / "t.pt")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no shapes world at" in result.stderr and "world.json missing" in result.stderr
    assert not (tmp_path / "t.pt").exists()
