"""demo/own_data.py's "paper" style (issue 32's new data, docs/OWN_DATA.md): names the shapes
world does not have, its own base/novel split, exact masks of the declared colours on another
background; and the default style's output unchanged."""

import hashlib
import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog

from own_data import PAPER_CATEGORIES, PAPER_NOVEL, write_coco_dataset  # demo/
from vild_d2.data.datasets.register_ovd import register_dataset_files

# The shapes world's words (vild_d2/data/datasets/shapes_geometry.py), written out here.
WORLD_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
WORLD_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
# The paper style's colours as the data is meant to show them (RGB).
PAPER_RGB = {"pink": (240, 110, 185), "teal": (20, 150, 150), "brown": (125, 75, 30)}
# demo/own_data.py's default output (num_train=3, num_val=2, image_size=64, seed=5), hashed with
# _digest from the file as it was before the paper style was added.
DEFAULT_DIGEST = "44c4cc14dbb50f4f8698e3d8a5be256d8f7a77745b13bee3fedab3b9a4df3e3c"


def _digest(root) -> str:
    h = hashlib.sha256()
    for split in ("train", "val"):
        h.update((root / "annotations" / f"{split}.json").read_bytes())
        for p in sorted((root / "images" / split).glob("*.png")):
            h.update(cv2.imread(str(p)).tobytes())  # pixels, not PNG bytes (zlib may differ)
    h.update((root / "new_shapes.yaml").read_bytes())
    return h.hexdigest()


def test_default_style_unchanged(tmp_path):
    write_coco_dataset(tmp_path / "d", num_train=3, num_val=2, image_size=64, seed=5)
    assert _digest(tmp_path / "d") == DEFAULT_DIGEST


def test_paper_style(tmp_path):
    size = 96
    dataset_file = write_coco_dataset(
        tmp_path / "p",
        name="paper_style_test",
        num_train=6,
        num_val=4,
        image_size=size,
        style="paper",
    )
    entry = yaml.safe_load(dataset_file.read_text())
    assert entry["name"] == "paper_style_test" and entry["novel"] == list(PAPER_NOVEL)
    val = json.loads((tmp_path / "p" / "annotations" / "val.json").read_text())
    names = {c["id"]: c["name"] for c in val["categories"]}
    assert names == PAPER_CATEGORIES and len(names) == 8
    ids = sorted(names)
    assert ids != list(range(ids[0], ids[0] + len(ids)))  # ids with gaps, as a user's
    world = {f"{c} {s}" for c in WORLD_COLOURS for s in WORLD_SHAPES}
    for name in names.values():
        assert name not in world
        assert not set(name.split()) & set(WORLD_COLOURS + WORLD_SHAPES), name
    assert len(PAPER_NOVEL) == 2 and set(PAPER_NOVEL) <= set(names.values())

    # Registered from its dataset file: 6 base classes trained, the 2 novel ones held out.
    register_dataset_files([str(dataset_file)])
    meta = MetadataCatalog.get("paper_style_test_val")
    assert sorted(meta.novel_classes) == sorted(PAPER_NOVEL)
    train = DatasetCatalog.get("paper_style_test_train_base")
    seen = {
        MetadataCatalog.get("paper_style_test_train_base").thing_classes[a["category_id"]]
        for d in train
        for a in d["annotations"]
    }
    assert seen == set(names.values()) - set(PAPER_NOVEL)

    checked = 0
    for split in ("train", "val"):
        doc = json.loads((tmp_path / "p" / "annotations" / f"{split}.json").read_text())
        assert {a["category_id"] for a in doc["annotations"]} <= set(names)
        for image in doc["images"]:
            rgb = cv2.imread(str(tmp_path / "p" / "images" / split / image["file_name"]))[..., ::-1]
            anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
            masks = []
            for a in anns:
                rles = mask_util.frPyObjects(a["segmentation"], size, size)
                masks.append(mask_util.decode(mask_util.merge(rles)).astype(bool))
            union = np.any(masks, axis=0)
            for a, mask in zip(anns, masks):
                assert mask.sum() == a["area"]
                colour = PAPER_RGB[names[a["category_id"]].split()[0]]
                near = np.abs(rgb.astype(int) - colour).max(axis=2) <= 40
                # Every pixel of the mask shows the colour; just outside it (not another
                # object), none does: the mask is the drawn pixels.
                assert near[mask].mean() > 0.97, (split, image["file_name"], a["id"])
                ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                ring &= ~union
                assert near[ring].mean() < 0.03, (split, image["file_name"], a["id"])
                checked += 1
            # Light graph paper, not the world's grey: the free pixels are light, with a grid.
            free = rgb[~union].astype(float)
            assert free.mean() > 205 and (free.mean(axis=1) < free.mean() - 25).mean() > 0.05
    assert checked >= 20
