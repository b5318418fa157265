"""Loading what a run needs, and the errors that name what and where: checkpoints that would
leave parameters untrained, files that are not checkpoints, an offline named CLIP, truncated
annotation files, a vocabulary of another width, the cache variable, vocabulary memory."""

import vild_d2  # noqa: F401  (first: compat bridges)

import urllib.error
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from tiny_model import TEST_NAMES, random_vocab, tiny_cfg  # tests/ helper
from tiny_world import make_world, save_random_clip
from vild_d2.checkpoint import IncompatibleCheckpointError, ViLDCheckpointer
from vild_d2.data.datasets.common import register_dataset
from vild_d2.text import TextEncoder, load_clip
from vild_d2.text.encoder import _prompt_batches

DIM = 16


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    files = {}
    for dim in (DIM, 2 * DIM):
        for key, names, seed in (("train", TEST_NAMES[:3], 0), ("test", TEST_NAMES, 1)):
            files[f"{key}{dim}"] = str(root / f"{key}{dim}.pth")
            random_vocab(names, seed, dim=dim).save(files[f"{key}{dim}"])
    return files


def _cfg(vocab_files, dim=DIM, variant="vild", **overrides):
    files = {"train": vocab_files[f"train{dim}"], "test": vocab_files[f"test{dim}"]}
    return tiny_cfg(variant, files, **overrides)


def _equal(a, b, prefix=""):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


# ------------------------------------------------------------------ class 2: skipped weights
def test_vild_checkpoint_of_another_clip_width_is_an_error(vocab_files, tmp_path):
    torch.manual_seed(0)
    ViLDCheckpointer(build_model(_cfg(vocab_files)), str(tmp_path)).save("d16")
    path = str(tmp_path / "d16.pth")
    wide = build_model(_cfg(vocab_files, dim=2 * DIM))
    for complete in (True, False):  # evaluation, and training from these weights
        with pytest.raises(IncompatibleCheckpointError) as e:
            ViLDCheckpointer(wide, complete=complete).resume_or_load(path, resume=False)
        msg = str(e.value)
        assert path in msg and "trained with ViLD" in msg
        # The mismatched tensors, with both shapes (projection: (D, fc) here vs the model's).
        assert "roi_heads.box_predictor.cls_score.projection.weight" in msg
        assert f"({DIM}, " in msg and f"({2 * DIM}, " in msg
        assert "roi_heads.box_predictor.cls_score.background" in msg


def test_backbone_of_another_depth_is_an_error_even_for_training(vocab_files, tmp_path):
    torch.manual_seed(0)
    r18 = build_model(_cfg(vocab_files))
    # Backbone + RPN only, as an ImageNet/RPN initialisation would be: not a ViLD checkpoint.
    state = {k: v for k, v in r18.state_dict().items() if not k.startswith("roi_heads.")}
    torch.save({"model": state}, tmp_path / "r18_backbone.pth")
    r34 = build_model(_cfg(vocab_files, **{"MODEL.RESNETS.DEPTH": 34}))
    with pytest.raises(IncompatibleCheckpointError, match="backbone") as e:
        ViLDCheckpointer(r34).resume_or_load(str(tmp_path / "r18_backbone.pth"), resume=False)
    # R34 has 4 res3 blocks where R18 has 2: the third is named as missing.
    assert "backbone.bottom_up.res3.2." in str(e.value)


def test_new_heads_from_a_supervised_detector_are_expected_when_training(vocab_files, tmp_path):
    """Fine-tuning from a detectron2 detector (another head, other class counts) keeps working:
    the backbone loads, the text classifier starts new; evaluating such weights does not."""
    torch.manual_seed(0)
    supervised = build_model(
        _cfg(
            vocab_files,
            **{
                "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
                "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
            },
        )
    )
    assert "roi_heads.box_predictor.cls_score.weight" in supervised.state_dict()  # linear
    torch.save({"model": supervised.state_dict()}, tmp_path / "supervised.pth")
    torch.manual_seed(1)
    vild = build_model(_cfg(vocab_files))
    ViLDCheckpointer(vild).resume_or_load(str(tmp_path / "supervised.pth"), resume=False)
    assert _equal(vild, supervised, "backbone.") and _equal(vild, supervised, "proposal_generator.")
    with pytest.raises(IncompatibleCheckpointError, match="evaluation needs every parameter"):
        ViLDCheckpointer(vild, complete=True).load(str(tmp_path / "supervised.pth"))


def test_weights_the_model_does_not_have_are_an_error(vocab_files, tmp_path):
    """Extra tensors (another, deeper backbone; a head this model lacks) are refused for
    evaluation and from a ViLD checkpoint; a deeper backbone even when training."""
    torch.manual_seed(0)
    r34 = build_model(_cfg(vocab_files, **{"MODEL.RESNETS.DEPTH": 34}))
    ViLDCheckpointer(r34, str(tmp_path)).save("r34")  # a ViLD checkpoint of another depth
    r18 = build_model(_cfg(vocab_files))
    for complete in (True, False):
        with pytest.raises(IncompatibleCheckpointError) as e:
            ViLDCheckpointer(r18, complete=complete).load(str(tmp_path / "r34.pth"))
        assert "backbone.bottom_up.res3.2.conv1.weight: in the checkpoint, not in the model" in (
            str(e.value)
        )
    # Backbone-only weights of a deeper network: training refuses them too (another depth).
    state = {k: v for k, v in r34.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": state}, tmp_path / "r34_backbone.pth")
    with pytest.raises(IncompatibleCheckpointError, match=r"res3\.2\..*another backbone"):
        ViLDCheckpointer(r18).load(str(tmp_path / "r34_backbone.pth"))
    # One stray tensor in an otherwise complete checkpoint: named for evaluation.
    state = dict(r18.state_dict(), **{"roi_heads.extra_head.weight": torch.zeros(3)})
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(IncompatibleCheckpointError, match="roi_heads.extra_head.weight: in the"):
        ViLDCheckpointer(r18, complete=True).load(str(tmp_path / "extra.pth"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_an_error_in_every_mode(vocab_files, tmp_path, bad):
    torch.manual_seed(0)
    model = build_model(_cfg(vocab_files))
    state = dict(model.state_dict())
    name = "roi_heads.box_head.fc1.weight"
    state[name] = state[name].clone()
    state[name][0, :3] = bad
    torch.save({"model": state}, tmp_path / "bad.pth")
    for kwargs in ({"complete": True}, {}, {"partial": True}):
        with pytest.raises(IncompatibleCheckpointError) as e:
            ViLDCheckpointer(model, **kwargs).load(str(tmp_path / "bad.pth"))
        assert f"{name}: 3 of {state[name].numel()} not finite" in str(e.value), kwargs


def test_partial_load_is_explicit_and_logged(vocab_files, tmp_path, caplog):
    """MODEL.VILD.ALLOW_PARTIAL_WEIGHTS: a ViLD checkpoint of another CLIP width fine-tunes
    from its backbone; the tensors that do not fit stay as initialised and are logged."""
    torch.manual_seed(0)
    narrow = build_model(_cfg(vocab_files))
    ViLDCheckpointer(narrow, str(tmp_path)).save("d16")
    torch.manual_seed(1)
    wide = build_model(_cfg(vocab_files, dim=2 * DIM))
    projection = wide.roi_heads.box_predictor.cls_score.projection.weight.detach().clone()
    with caplog.at_level("WARNING", logger="vild_d2.checkpoint"):
        # (weights only, as the trainer loads MODEL.WEIGHTS: the vocabulary is the config's)
        ViLDCheckpointer(wide, partial=True).resume_or_load(str(tmp_path / "d16.pth"), resume=False)
    assert _equal(wide, narrow, "backbone.")
    assert torch.equal(wide.roi_heads.box_predictor.cls_score.projection.weight, projection)
    assert "partial load" in caplog.text and "cls_score.projection.weight" in caplog.text
    with pytest.raises(ValueError, match="either complete"):
        ViLDCheckpointer(wide, partial=True, complete=True)


def test_eval_only_refuses_untrained_heads_through_train_net(vocab_files, tmp_path):
    """The reported case: ``train_net --eval-only`` with weights of another CLIP width printed
    AP tables of an untrained head and exited 0."""
    import subprocess
    import sys

    torch.manual_seed(0)
    ViLDCheckpointer(build_model(_cfg(vocab_files)), str(tmp_path)).save("d16")
    cfg = _cfg(vocab_files, dim=2 * DIM, **{"DATASETS.TRAIN": "()", "DATASETS.TEST": "()"})
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    result = subprocess.run(
        [
            sys.executable,
            "tools/train_net.py",
            "--config-file",
            str(tmp_path / "cfg.yaml"),
            "--eval-only",
            "MODEL.WEIGHTS",
            str(tmp_path / "d16.pth"),
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode != 0
    assert "IncompatibleCheckpointError" in result.stderr and "d16.pth" in result.stderr


def test_a_file_that_is_not_a_checkpoint_names_itself(vocab_files, tmp_path, tiny_clip_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n" * 20)
    model = build_model(_cfg(vocab_files))
    with pytest.raises(IncompatibleCheckpointError, match="notes.txt is not a checkpoint"):
        ViLDCheckpointer(model).load(str(text))
    with pytest.raises(ValueError, match="notes.txt is not a CLIP checkpoint"):
        load_clip(str(text))


# ------------------------------------------------------------------ class 7: actionable errors
def test_named_clip_offline_says_how_to_pass_a_file(monkeypatch):
    import clip.clip

    def offline(url, root):  # what urllib raises with no route to openaipublic
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(clip.clip, "_download", offline)
    with pytest.raises(RuntimeError) as e:
        load_clip("ViT-B/32")
    msg = str(e.value)
    assert (
        "could not be downloaded" in msg and "ViT-B-32.pt" in msg and "MODEL.VILD.CLIP_MODEL" in msg
    )


def test_truncated_annotation_file_is_named(tmp_path):
    world = make_world(tmp_path, prefix="vild_test_truncated")
    val = world["root"] / "annotations" / "val.json"
    val.write_text(val.read_text()[:500])
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get(world["val"])
    assert str(val) in str(e.value) and "truncated or corrupt" in str(e.value)


def test_a_name_registered_by_someone_else_is_never_replaced():
    DatasetCatalog.register("user_dataset_for_vild_test", lambda: [{"mine": 1}])
    try:
        with pytest.raises(ValueError, match="already registered by someone else"):
            register_dataset("user_dataset_for_vild_test", lambda: [], {})
        assert DatasetCatalog.get("user_dataset_for_vild_test") == [{"mine": 1}]
    finally:
        DatasetCatalog.remove("user_dataset_for_vild_test")


def test_width_error_names_the_vocabulary_file(vocab_files):
    model = build_model(_cfg(vocab_files))
    with pytest.raises(ValueError) as e:
        model.set_vocabulary(vocab_files[f"test{2 * DIM}"])
    msg = str(e.value)
    assert vocab_files[f"test{2 * DIM}"] in msg and "new test" not in msg
    assert f"{2 * DIM}-d" in msg and "--clip" in msg


# ------------------------------------------------------------------ cache and vocabulary memory
def test_vild_d2_cache_moves_the_text_embeddings_too(tmp_path, monkeypatch, tiny_clip_path):
    monkeypatch.setenv("VILD_D2_CACHE", str(tmp_path / "cache"))
    encoder = TextEncoder(tiny_clip_path, templates=["a {}."])
    encoder.encode(["cat"])
    assert list((tmp_path / "cache" / "text").glob("*.pt"))


def test_prompts_are_made_a_batch_at_a_time():
    """Memory is bounded by the batch: the prompts of a 100,000-name vocabulary (6.3 million
    with the 63 templates) are never all made; every prompt comes once, in order."""
    templates = [f"t{i} {{}}" for i in range(63)]
    batches = _prompt_batches([[f"n{k}"] for k in range(100_000)], templates, batch_size=1000)
    owner, prompts = next(batches)
    assert len(prompts) == 1000 and owner.tolist() == [k // 63 for k in range(1000)]
    assert prompts[:2] == ["t0 n0", "t1 n0"] and prompts[63] == "t0 n1"
    small = list(_prompt_batches([["a", "b"], ["c"]], ["x {}", "y {}"], batch_size=4))
    assert [p for _, ps in small for p in ps] == ["x a", "y a", "x b", "y b", "x c", "y c"]
    assert [len(ps) for _, ps in small] == [4, 2]
    assert torch.cat([o for o, _ in small]).tolist() == [0, 0, 0, 0, 1, 1]


def test_training_names_an_unreadable_image(tmp_path):
    """PIL says only "image file is truncated"; training must say which file and what to do."""
    import numpy as np
    import cv2
    from vild_d2.data.mapper import ViLDDatasetMapper

    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    image.write_bytes(image.read_bytes()[:300])  # truncated mid-stream
    mapper = ViLDDatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    record = {
        "file_name": str(image),
        "height": 64,
        "width": 64,
        "image_id": 1,
        "annotations": [],
        "distill_boxes": np.zeros((0, 4), np.float32),
        "distill_embeddings": np.zeros((0, 8), np.float32),
    }
    with pytest.raises(OSError) as e:
        mapper(record)
    assert str(image) in str(e.value) and "training stops" in str(e.value)


def test_clip_identity_follows_the_content(tiny_clip_path, tmp_path):
    """A byte-identical copy of a CLIP (teacher) is the same CLIP wherever it lies, so stores
    and vocabularies made with one accept the other; other bytes are another CLIP."""
    import shutil

    from vild_d2.clip_models import clip_identity

    copy = tmp_path / "elsewhere" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(tiny_clip_path, copy)
    assert clip_identity(str(copy)) == clip_identity(tiny_clip_path)
    other = tmp_path / "other.pt"
    save_random_clip(str(other), embed_dim=32, seed=1)
    assert clip_identity(str(other)) != clip_identity(tiny_clip_path)
    # Rewritten in place (same path, new bytes): another identity.
    save_random_clip(str(copy), embed_dim=32, seed=2)
    assert clip_identity(str(copy)) != clip_identity(tiny_clip_path)
