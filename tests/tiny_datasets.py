"""Tiny datasets written in the real on-disk formats (LVIS v1 json, COCO json, VOC xml +
ImageSets), for tests/data/test_datasets.py and tests/evaluation/test_evaluation.py."""

import json
from pathlib import Path

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from vild_d2.text.categories import coco_ov_split, lvis_v1_categories


def lvis_categories_json():
    """All 1203 LVIS v1 categories as an LVIS json lists them."""
    return [
        {
            "id": c["id"],
            "name": c["name"],
            "synonyms": c["synonyms"],
            "frequency": c["frequency"],
            "synset": c["synset"],
            "def": c["def"],
            "image_count": 1,
            "instance_count": 1,
        }
        for c in lvis_v1_categories()
    ]


def lvis_picks():
    """LVIS ids of two rare, one common and two frequent categories."""
    cats = lvis_v1_categories()
    by_freq = {f: [c["id"] for c in cats if c["frequency"] == f] for f in "rcf"}
    return {
        "R1": by_freq["r"][0],
        "R2": by_freq["r"][1],
        "C1": by_freq["c"][0],
        "F1": by_freq["f"][0],
        "F2": by_freq["f"][1],
    }


def xywh_polygon(box):
    x, y, w, h = box
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def write_lvis_json(path, split_folder, images):
    """images: [(image_id, [(lvis category id, xywh box)], neg ids, not-exhaustive ids)]."""
    image_entries, annotations = [], []
    for image_id, objects, neg, not_exhaustive in images:
        image_entries.append(
            {
                "id": image_id,
                "coco_url": f"http://images.cocodataset.org/{split_folder}/{image_id:012d}.jpg",
                "height": 100,
                "width": 100,
                "neg_category_ids": list(neg),
                "not_exhaustive_category_ids": list(not_exhaustive),
            }
        )
        annotations += [
            annotation(len(annotations) + i, image_id, *o) for i, o in enumerate(objects)
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"images": image_entries, "annotations": annotations}
    data.update(categories=lvis_categories_json(), licenses=[], info={})
    path.write_text(json.dumps(data))


def annotation(index, image_id, category_id, box):
    """A json annotation (id = index + 1) of an xywh box, with its rectangle as polygon."""
    return {
        "id": index + 1,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": list(box),
        "area": box[2] * box[3],
        "segmentation": xywh_polygon(box),
    }


def coco_picks():
    split = coco_ov_split()
    in_split = {c["id"] for c in split["base"] + split["novel"]}
    excluded = [c["id"] for c in COCO_CATEGORIES if c["isthing"] and c["id"] not in in_split]
    return {
        "N1": split["novel"][0]["id"],
        "N2": split["novel"][1]["id"],
        "B1": split["base"][0]["id"],
        "B2": split["base"][1]["id"],
        "X": excluded[0],  # one of the 15 COCO classes outside the 65
    }


def write_coco_json(path, images, categories=None):
    """images: [(image_id, [(category id, xywh box)])]; categories default to COCO's 80."""
    if categories is None:
        categories = [
            {"id": c["id"], "name": c["name"], "supercategory": "thing"}
            for c in COCO_CATEGORIES
            if c["isthing"]
        ]
    image_entries, annotations = [], []
    for image_id, objects in images:
        image_entries.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 100, "width": 100}
        )
        annotations += [
            dict(annotation(len(annotations) + i, image_id, *o), iscrowd=0)
            for i, o in enumerate(objects)
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"images": image_entries, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))


def write_voc(root, images):
    """images: {file id: [(class name, (xmin, ymin, xmax, ymax) 1-based, difficult)]}."""
    voc = Path(root) / "VOC2007"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for fileid, objects in images.items():
        objs = "".join(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for name, b, difficult in objects
        )
        (voc / "Annotations" / f"{fileid}.xml").write_text(
            f"<annotation><filename>{fileid}.jpg</filename><size><width>500</width>"
            f"<height>500</height><depth>3</depth></size>{objs}</annotation>"
        )
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(images) + "\n")
