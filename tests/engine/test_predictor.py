"""ViLDPredictor: DefaultPredictor habits, run-time vocabularies, the embedding cache, the
images it refuses (those it would misread) and its lazily pasted masks."""

import vild_d2  # noqa: F401  (first: compat bridges)

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

import clip
from vild_d2 import TextEncoder, ViLDCheckpointer, ViLDPredictor
from vild_d2.config import load_config
from cli.vocabulary import vocabulary_from_cli  # tools/cli (pytest.ini pythonpath)
from vild_d2.text import load_templates, vocabulary_from_names
from vild_d2.clip_models import load_clip
from vild_d2.text.prompts import fill_prompts

from tiny_world import TRAIN_NAMES, counting_text_encodes, make_random_model  # tests/ helper

NAMES_A = ["person", "flag", "helmet"]
NAMES_B = ["rocket", "space suit"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp("toy_predictor")
    config_file, opts = make_random_model(root, tiny_clip_path)
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    return root, config_file, opts


@pytest.fixture(scope="module")
def photo():
    return np.ascontiguousarray(skdata.astronaut()[:, :, ::-1])  # RGB -> BGR, as cv2 reads


def _same(a, b):
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    assert torch.equal(a.pred_classes, b.pred_classes)


def test_vocabulary_switch_changes_names_and_scores(toy, photo, tmp_path):
    root, config_file, opts = toy
    predictor = ViLDPredictor(load_config(config_file, opts))
    assert predictor.metadata.thing_classes == predictor.vocabulary.names == TRAIN_NAMES

    predictor.set_vocabulary(NAMES_A)
    out_a = predictor(photo)["instances"]
    predictor.set_vocabulary(NAMES_B)
    out_b = predictor(photo)["instances"]
    assert predictor.metadata.thing_classes == NAMES_B == predictor.model.vocabulary.names
    assert out_a.image_size == out_b.image_size == photo.shape[:2]
    assert int(out_a.pred_classes.max()) < len(NAMES_A) and int(out_b.pred_classes.max()) < 2
    assert not torch.allclose(out_a.scores[:5], out_b.scores[:5])
    # The classifier is still a registered buffer, now (2, D).
    buffers = dict(predictor.model.named_buffers())
    assert buffers["roi_heads.box_predictor.cls_score.test_embeddings"].shape[0] == len(NAMES_B)

    # Switching at run time == a predictor configured with that vocabulary from the start.
    b_file = tmp_path / "b.pth"
    predictor.vocabulary.save(str(b_file))
    cfg = load_config(config_file, opts + ["MODEL.VILD.TEST_VOCABULARY", str(b_file)])
    fresh = ViLDPredictor(cfg)
    assert fresh.metadata.thing_classes == NAMES_B  # the config's, not the checkpoint's
    _same(fresh(photo)["instances"], out_b)
    # A checkpoint saved after the switch brings NAMES_B back with its weights.
    ViLDCheckpointer(predictor.model, str(tmp_path)).save("switched")
    weights = ["MODEL.WEIGHTS", str(tmp_path / "switched.pth")]
    reloaded = ViLDPredictor(load_config(config_file, opts + weights))
    assert reloaded.metadata.thing_classes == NAMES_B
    _same(reloaded(photo)["instances"], out_b)
    # And switching back gives the first result again (LRU hit).
    predictor.set_vocabulary(NAMES_A)
    _same(predictor(photo)["instances"], out_a)


def test_embeddings_match_an_independent_prompt_ensemble(toy, tiny_clip_path):
    root, config_file, opts = toy
    predictor = ViLDPredictor(load_config(config_file, opts))
    vocab = predictor.set_vocabulary(NAMES_B)
    # Reference: every prompt through CLIP, normalised, averaged, normalised (float64).
    model, _ = load_clip(tiny_clip_path)
    templates = load_templates()
    ref = []
    with torch.no_grad():
        for name in NAMES_B:
            emb = model.encode_text(clip.tokenize(fill_prompts(name, templates))).double()
            ref.append(F.normalize(F.normalize(emb, dim=1).mean(0), dim=0))
    ref = torch.stack(ref)
    torch.testing.assert_close(vocab.embeddings.double(), ref, rtol=0, atol=1e-5)
    buffer = predictor.model.roi_heads.box_predictor.cls_score.test_embeddings
    torch.testing.assert_close(buffer.double(), ref, rtol=0, atol=1e-5)


def test_names_and_saved_file_give_identical_outputs(toy, photo, tmp_path, tiny_clip_path):
    root, config_file, opts = toy
    predictor = ViLDPredictor(load_config(config_file, opts))
    # The file is built apart from the predictor (another cache dir), like build_text_classifier.
    path = tmp_path / "names.pth"
    encoder = TextEncoder(tiny_clip_path, cache_dir=str(tmp_path / "other_cache"))
    vocabulary_from_names(NAMES_A, encoder).save(str(path))
    predictor.set_vocabulary(str(path))
    from_file = predictor(photo)["instances"]
    assert predictor.metadata.thing_classes == NAMES_A
    predictor.set_vocabulary(list(NAMES_A))
    _same(predictor(photo)["instances"], from_file)


def test_second_build_reads_the_cache_not_clip(toy, tmp_path):
    root, config_file, opts = toy
    cfg = load_config(config_file, opts + ["MODEL.VILD.EMBEDDING_CACHE_DIR", str(tmp_path)])
    predictor = ViLDPredictor(cfg)
    clip_model = predictor.model.text_encoder.model  # the real CLIP, loaded
    with counting_text_encodes(clip_model) as calls:
        names = ["zebra", "giraffe"]
        predictor.set_vocabulary(names)
        assert sum(calls) == 2 * len(load_templates())  # cold: every prompt encoded once
        calls.clear()
        predictor._vocabularies.clear()  # no in-memory hit: the disk cache must serve it
        predictor.set_vocabulary(names)
        other = ViLDPredictor(cfg)  # a new predictor: same cache dir
        other.set_vocabulary(names)
        assert calls == []
        assert list(tmp_path.glob("text/*.pt"))


def test_bad_vocabularies_are_refused_clearly(toy):
    root, config_file, opts = toy
    predictor = ViLDPredictor(load_config(config_file, opts))
    with pytest.raises(ValueError, match="empty vocabulary"):
        predictor.set_vocabulary([])
    with pytest.raises(ValueError, match="built-in vocabulary"):
        predictor.set_vocabulary("lvis_typo")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        predictor.set_vocabulary("missing.pth")
    with pytest.raises(ValueError, match="custom-vocabulary"):
        vocabulary_from_cli("custom", " , ")
    assert vocabulary_from_cli("custom", "red star, blue cross") == ["red star", "blue cross"]
    assert vocabulary_from_cli("lvis") == "lvis" and vocabulary_from_cli() is None
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        predictor(np.zeros((10, 10), np.uint8))


def test_min_size_test_0_leaves_the_image_to_the_model(toy, photo):
    """INPUT.MIN_SIZE_TEST 0 (detectron2: no test resize; the official configs resize inside
    the model): the predictor passes the image at its own size."""
    root, config_file, opts = toy
    predictor = ViLDPredictor(load_config(config_file, [*opts, "INPUT.MIN_SIZE_TEST", "0"]))
    small = photo[:96, :128]
    inputs = predictor.preprocess(small)
    assert tuple(inputs["image"].shape) == (3, 96, 128)
    assert predictor(small)["instances"].image_size == (96, 128)


# --- the predictor refuses what it would misread -------------------------------------------------
@pytest.fixture(scope="module")
def predictor(toy):
    root, config_file, opts = toy
    return ViLDPredictor(load_config(config_file, opts))


def test_predictor_accepts_bgr_uint8_images(predictor):
    bgr = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = predictor(bgr)["instances"]
    assert out.image_size == (48, 64)
    view = predictor(np.ascontiguousarray(bgr[:, :, ::-1])[:, :, ::-1])["instances"]  # a view
    assert torch.equal(view.pred_boxes.tensor, out.pred_boxes.tensor)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda: np.full((32, 32, 3), 0.5, np.float32),
            ValueError,
            r"expected a BGR uint8 \(H, W, 3\).*got float32.*\(img \* 255\)\.clip\(0, 255\)",
        ),
        (lambda: np.full((32, 32, 3), 300, np.uint16), ValueError, r"got uint16"),
        (lambda: np.zeros((32, 32), np.uint8), ValueError, r"\(H, W, 3\).*grayscale.*cvtColor"),
        (lambda: np.zeros((32, 32, 1), np.uint8), ValueError, r"grayscale.*COLOR_GRAY2BGR"),
        (lambda: np.zeros((32, 32, 4), np.uint8), ValueError, r"4 channels.*COLOR_BGRA2BGR"),
        (lambda: np.zeros((2, 32, 32, 3), np.uint8), ValueError, r"one image per call"),
        (lambda: np.zeros((3, 32, 32), np.uint8), ValueError, r"transpose\(1, 2, 0\)"),
        (lambda: np.zeros((0, 32, 3), np.uint8), ValueError, r"empty image"),
        (lambda: [np.zeros((32, 32, 3), np.uint8)], TypeError, r"got list.*one image per call"),
        (lambda: torch.zeros((32, 32, 3), dtype=torch.uint8), TypeError, r"got Tensor.*numpy"),
        (lambda: np.zeros((3, 4000, 3), np.uint8), ValueError, r"3x4000.*too elongated"),
    ],
)
def test_predictor_refuses_what_it_would_misread(predictor, make, error, message):
    with pytest.raises(error, match=message):
        predictor(make())
    with pytest.raises(error, match=message):  # the export tool's entry point checks too
        predictor.preprocess(make())


def test_lazy_masks_are_the_pasted_masks(predictor):
    """Masks kept at the mask head's size and pasted one at a time give the JSON (and so the
    pixels) of detectron2's full-size masks."""
    from vild_d2.engine.detections import detections_to_json

    bgr = np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    names = predictor.metadata.thing_classes
    full = predictor(bgr)["instances"]
    lazy = predictor(bgr, paste_masks=False)["instances"]
    assert len(full) > 0 and tuple(lazy.pred_masks.tensor.shape[1:]) == (28, 28)
    assert detections_to_json(lazy, names) == detections_to_json(full, names)
