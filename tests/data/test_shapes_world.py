"""The shapes world generator and its detectron2 registration."""

import vild_d2  # noqa: F401  (compat bridges first)

import filecmp
import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from vild_d2.data.datasets.shapes import (
    DEFAULT_NOVEL,
    SHAPES_CLASSES,
    WorldSpec,
    draw_scene,
    generate_shapes_world,
    register_shapes_world,
)

SMALL = dict(num_train=12, num_val=6, image_size=96)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    spec = WorldSpec(seed=3, **SMALL)
    generate_shapes_world(root / "shapes", spec)
    return root, spec


def _json(root, split):
    return json.loads((root / "shapes" / "annotations" / f"{split}.json").read_text())


def test_deterministic_for_a_seed(world, tmp_path):
    root, spec = world
    generate_shapes_world(tmp_path / "again", spec)
    generate_shapes_world(tmp_path / "other", WorldSpec(seed=4, **SMALL))
    for rel in ["annotations/train.json", "annotations/val.json", "images/train/000005.png"]:
        assert filecmp.cmp(root / "shapes" / rel, tmp_path / "again" / rel, shallow=False), rel
    assert not filecmp.cmp(
        root / "shapes" / "images/train/000005.png",
        tmp_path / "other" / "images/train/000005.png",
        shallow=False,
    )


def _redraw(spec, split):
    """The scenes of a split, re-drawn with the generator's own random stream."""
    rng = np.random.default_rng([spec.seed, 100 + (split == "val")])
    count = spec.num_train if split == "train" else spec.num_val
    return [draw_scene(rng, spec) for _ in range(count)]


def test_novel_objects_are_in_training_images_but_never_annotated(world):
    root, spec = world
    train = _json(root, "train")
    novel_ids = {c["id"] for c in train["categories"] if c["name"] in spec.novel}
    assert len(novel_ids) == len(DEFAULT_NOVEL)
    assert not [a for a in train["annotations"] if a["category_id"] in novel_ids]
    assert {c["frequency"] for c in train["categories"] if c["id"] in novel_ids} == {"r"}
    drawn_novel = 0
    for k, (image, objects) in enumerate(_redraw(spec, "train")):
        written = cv2.imread(str(root / "shapes" / "images" / "train" / f"{k:06d}.png"))
        np.testing.assert_array_equal(written[:, :, ::-1], image)  # the scenes written
        novel_here = {SHAPES_CLASSES.index(n) + 1 for n, _, _ in objects if n in spec.novel}
        drawn_novel += len(novel_here)
        annotated = [a for a in train["annotations"] if a["image_id"] == k + 1]
        assert len(annotated) == sum(name not in spec.novel for name, _, _ in objects)
        # A novel object in the picture is unannotated, not a verified negative.
        assert not novel_here & set(train["images"][k]["neg_category_ids"])
    assert drawn_novel > 0


def test_annotations_are_the_drawn_pixels(world):
    root, spec = world
    size = spec.image_size
    ious = []
    for split in ("train", "val"):
        doc = _json(root, split)
        scenes = _redraw(spec, split)
        for img, (_, objects) in zip(doc["images"], scenes):
            anns = [a for a in doc["annotations"] if a["image_id"] == img["id"]]
            drawn = [m for n, _, m in objects if split == "val" or n not in spec.novel]
            assert len(anns) == len(drawn)
            for ann, visible in zip(anns, drawn):
                rles = mask_util.frPyObjects(ann["segmentation"], size, size)
                mask = mask_util.decode(mask_util.merge(rles)).astype(bool)
                ious.append((mask & visible).sum() / (mask | visible).sum())
                # The box is the extent of the visible pixels, in pixel-edge coordinates.
                ys, xs = np.nonzero(visible)
                box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert ann["bbox"] == [float(v) for v in box]
                assert ann["area"] == visible.sum()
    # Unoccluded objects are exact; outlines of partly hidden ones lose at most slivers.
    assert np.mean(ious) > 0.99 and np.median(ious) == 1.0 and min(ious) > 0.6
    val = _json(root, "val")
    all_ids = {c["id"] for c in val["categories"]}
    for img in val["images"]:
        present = {a["category_id"] for a in val["annotations"] if a["image_id"] == img["id"]}
        # Exhaustive annotation: every absent category is a negative, so the LVIS evaluator
        # counts every false positive.
        assert set(img["neg_category_ids"]) == all_ids - present


def test_registration(world):
    root, spec = world
    names = register_shapes_world(str(root), prefix="shapes_t", folder="shapes")
    assert names == [
        "shapes_t_train_base",
        "shapes_t_train",
        "shapes_t_val",
        "shapes_t_train_full",  # loads only a world made with --full-train
    ]
    base = [c for c in SHAPES_CLASSES if c not in spec.novel]
    assert MetadataCatalog.get("shapes_t_train_base").thing_classes == base
    assert MetadataCatalog.get("shapes_t_val").thing_classes == SHAPES_CLASSES
    assert MetadataCatalog.get("shapes_t_val").novel_classes == list(spec.novel)
    dicts = DatasetCatalog.get("shapes_t_train_base")
    full = DatasetCatalog.get("shapes_t_train")
    assert len(dicts) == spec.num_train
    for d, f in zip(dicts, full):
        # Same objects; base dicts carry contiguous ids over the base classes only.
        got = [base[a["category_id"]] for a in d["annotations"]]
        assert got == [SHAPES_CLASSES[a["category_id"]] for a in f["annotations"]]
    val = DatasetCatalog.get("shapes_t_val")
    val_names = {SHAPES_CLASSES[a["category_id"]] for d in val for a in d["annotations"]}
    assert val_names & set(spec.novel)


def test_bad_input_is_named(tmp_path, caplog):
    with pytest.raises(ValueError, match="'pink star'.*not shapes-world categories"):
        WorldSpec(novel=("pink star",))
    with pytest.raises(ValueError, match="novel categories repeat"):
        WorldSpec(novel=("red star", "red star"))
    register_shapes_world(str(tmp_path), prefix="shapes_missing")
    with pytest.raises(
        FileNotFoundError,
        match="(?s)shapes_missing_val.*world.json.*shapes_missing/annotations/val.json.*make_shapes",
    ):
        DatasetCatalog.get("shapes_missing_val")
    (tmp_path / "shapes_bad").mkdir()
    (tmp_path / "shapes_bad" / "world.json").write_text("{not json")
    with pytest.raises(ValueError, match="world.json: not a shapes-world spec"):
        register_shapes_world(str(tmp_path), prefix="shapes_bad")
    # Not strict (what `import vild_d2` does): a warning, the default categories, and loading
    # the data is the error.
    register_shapes_world(str(tmp_path), prefix="shapes_bad", strict=False)
    assert "not a shapes-world spec" in caplog.text
    assert MetadataCatalog.get("shapes_bad_val").thing_classes == SHAPES_CLASSES
    (tmp_path / "shapes_bad" / "annotations").mkdir()
    (tmp_path / "shapes_bad" / "annotations" / "val.json").write_text("{}")
    with pytest.raises(ValueError, match="world.json: not a shapes-world spec"):
        DatasetCatalog.get("shapes_bad_val")
