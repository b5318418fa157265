"""The unseen-concept shapes world (issue 31): whole shapes are novel in every colour. They are
drawn in the training images but never annotated there, and no base category has their shape;
val annotates everything; train_full.json (the supervised upper reference) annotates them too."""

import vild_d2  # noqa: F401  (compat bridges first)

import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from vild_d2.data.datasets.shapes import (
    WorldSpec,
    generate_shapes_world,
    novel_for_shapes,
    register_shapes_world,
)

# Written out by hand, not taken from the module: the world's colours (RGB) and shapes.
COLOURS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (235, 215, 45),
    "green": (45, 165, 60),
    "blue": (40, 90, 225),
    "purple": (145, 60, 190),
}
NOVEL_SHAPES = ("star", "heart")
NOVEL = {f"{c} {s}" for c in COLOURS for s in NOVEL_SHAPES}  # 12 categories
TINY = dict(seed=5, num_train=10, num_val=6, image_size=64, objects_per_image=(3, 5))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("unseen")
    spec = WorldSpec(novel=novel_for_shapes(NOVEL_SHAPES), **TINY)
    generate_shapes_world(root / "shapes", spec, full_train=True)
    docs = {
        split: json.loads((root / "shapes" / "annotations" / f"{split}.json").read_text())
        for split in ("train", "train_full", "val")
    }
    return root, spec, docs


def _names(doc):
    return {c["id"]: c["name"] for c in doc["categories"]}


def test_novel_categories_are_whole_shapes(world):
    _, spec, docs = world
    assert set(spec.novel) == NOVEL and len(spec.novel) == 12
    for doc in docs.values():
        rare = {c["name"] for c in doc["categories"] if c["frequency"] == "r"}
        assert rare == NOVEL  # APr is the novel shapes
    base = {c["name"] for c in docs["train"]["categories"] if c["frequency"] != "r"}
    assert len(base) == 24
    assert not {b.split(" ")[1] for b in base} & set(NOVEL_SHAPES)  # no base star or heart
    assert {b.split(" ")[0] for b in base} == set(COLOURS)  # colours stay shared


def test_novel_objects_in_training_images_unannotated(world):
    root, _, docs = world
    train, full = docs["train"], docs["train_full"]
    names = _names(train)
    assert not [a for a in train["annotations"] if names[a["category_id"]] in NOVEL]
    assert full["images"] == train["images"]
    novel = [a for a in full["annotations"] if names[a["category_id"]] in NOVEL]
    assert len(novel) >= 5 and {names[a["category_id"]].split(" ")[1] for a in novel} == set(
        NOVEL_SHAPES
    )
    # The extra file only adds the novel objects: the base annotations are train.json's.
    strip = [{k: v for k, v in a.items() if k != "id"} for a in full["annotations"]]
    assert [s for s in strip if names[s["category_id"]] not in NOVEL] == [
        {k: v for k, v in a.items() if k != "id"} for a in train["annotations"]
    ]
    # Each novel object is in the picture: its mask's pixels have its colour (nearest of six).
    files = {im["id"]: im["file_name"] for im in train["images"]}
    for a in novel:
        image = cv2.imread(str(root / "shapes" / "images" / files[a["image_id"]]))[:, :, ::-1]
        rle = mask_util.frPyObjects(a["segmentation"], 64, 64)
        mask = mask_util.decode(mask_util.merge(rle)).astype(bool)
        assert mask.sum() == a["area"]
        mean = image[mask].astype(np.float64).mean(0)
        nearest = min(COLOURS, key=lambda c: np.sum((mean - np.array(COLOURS[c])) ** 2))
        assert nearest == names[a["category_id"]].split(" ")[0], a


def test_val_is_annotated_fully(world):
    _, _, docs = world
    val = docs["val"]
    names = _names(val)
    assert {names[a["category_id"]].split(" ")[1] for a in val["annotations"]} >= set(NOVEL_SHAPES)
    all_ids = set(names)
    for doc in (val, docs["train_full"]):
        for img in doc["images"]:
            present = {a["category_id"] for a in doc["annotations"] if a["image_id"] == img["id"]}
            # Every category drawn (not a negative) is annotated, novel ones included.
            assert set(img["neg_category_ids"]) == all_ids - present


def test_registered_datasets(world, tmp_path):
    root, spec, _ = world
    names = register_shapes_world(str(root), prefix="unseen_t", folder="shapes")
    assert names[-1] == "unseen_t_train_full"
    base = MetadataCatalog.get("unseen_t_train_base").thing_classes
    assert len(base) == 24 and not [b for b in base if b in NOVEL]
    full = DatasetCatalog.get("unseen_t_train_full")
    classes = MetadataCatalog.get("unseen_t_train_full").thing_classes
    found = {classes[a["category_id"]] for d in full for a in d["annotations"]}
    assert found & NOVEL
    # A world made without --full-train: the dataset's error names the flag that writes it.
    generate_shapes_world(tmp_path / "shapes", WorldSpec(**{**TINY, "num_train": 2}))
    register_shapes_world(str(tmp_path), prefix="unseen_nofull", folder="shapes")
    with pytest.raises(FileNotFoundError, match="(?s)train_full.json.*--full-train"):
        DatasetCatalog.get("unseen_nofull_train_full")


def test_full_train_leaves_the_world_unchanged(tmp_path):
    """The default world's files are the same bytes with or without the extra file."""
    spec = WorldSpec(**{**TINY, "num_train": 4, "num_val": 2})
    generate_shapes_world(tmp_path / "a", spec)
    generate_shapes_world(tmp_path / "b", spec, full_train=True)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 4 + 2 + 3
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "b" / "annotations" / "train_full.json").is_file()
    assert not (tmp_path / "a" / "annotations" / "train_full.json").exists()


@pytest.mark.parametrize(
    "shapes, message",
    [(["blob"], "'blob'.*not shapes"), (["star", "star"], "distinct"), ([], "1 to 5")],
)
def test_bad_novel_shapes_are_named(shapes, message):
    with pytest.raises(ValueError, match=message):
        novel_for_shapes(shapes)
    with pytest.raises(ValueError, match="1 to 5"):
        novel_for_shapes(["circle", "square", "triangle", "star", "cross", "heart"])
