"""Transfer targets: a model trained on LVIS base evaluated, with its vocabulary swapped and
nothing else, on COCO (80 classes, box AP), PASCAL VOC 2007 test (20, AP50) and Objects365 v2
val (365, box AP). (LVIS val is :func:`.lvis_ovd.register_lvis_v1_ovd`'s.)

The text classifier reads a dataset's class names from its metadata ``vocabulary_names`` when
set, else ``thing_classes``: VOC keeps its file names as thing_classes (its evaluator looks them
up in the xml files) and gives readable names to the text encoder.
"""

import functools
import os
from typing import List

import numpy as np
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES
from detectron2.data.datasets.pascal_voc import load_voc_instances

from ...text.categories import builtin_vocabulary
from .coco_ovd import COCO_LAYOUT, COCO_SOURCE
from .common import register_dataset, require_files

__all__ = [
    "OBJECTS365_LAYOUT",
    "VOC_LAYOUT",
    "register_coco_2017_val",
    "register_objects365_v2_val",
    "register_transfer_datasets",
    "register_voc_2007_test",
]

VOC_LAYOUT = """
VOC2007/Annotations/<id>.xml
VOC2007/ImageSets/Main/test.txt
VOC2007/JPEGImages/<id>.jpg
"""
_VOC_SOURCE = (
    "PASCAL VOC 2007 test comes from http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ "
    "(VOCtest_06-Nov-2007.tar)."
)
OBJECTS365_LAYOUT = """
objects365/annotations/zhiyuan_objv2_val.json
objects365/val/images/v1/patch<k>/*.jpg   (the json's file_name, e.g. images/v1/patch0/...)
objects365/val/images/v2/patch<k>/*.jpg
"""
_OBJECTS365_SOURCE = (
    "Objects365 v2 comes from https://www.objects365.org (val annotations and images)."
)


def _load_coco_val(json_file: str, image_root: str, root: str, name: str) -> List[dict]:
    require_files(name, [json_file], root, COCO_LAYOUT, COCO_SOURCE)
    return load_coco_json(json_file, image_root, name)


def register_coco_2017_val(root: str, name: str = "vild_coco_2017_val") -> str:
    """COCO 2017 val, 80 classes, evaluator "coco": detectron2's registration (same files and
    metadata), plus the missing-file error."""
    root = os.path.expanduser(root)
    json_file = os.path.join(root, "coco", "annotations", "instances_val2017.json")
    image_root = os.path.join(root, "coco", "val2017")
    metadata = dict(
        _get_builtin_metadata("coco"),
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
    )
    register_dataset(
        name, functools.partial(_load_coco_val, json_file, image_root, root, name), metadata
    )
    return name


def _load_voc(dirname: str, split: str, root: str, name: str) -> List[dict]:
    needed = [os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")]
    needed.append(os.path.join(dirname, "Annotations"))
    require_files(name, needed, root, VOC_LAYOUT, _VOC_SOURCE)
    return load_voc_instances(dirname, split, VOC_CLASS_NAMES)


def register_voc_2007_test(root: str, name: str = "vild_voc_2007_test") -> str:
    """PASCAL VOC 2007 test (20 classes, AP50 with detectron2's PascalVOCDetectionEvaluator);
    ``vocabulary_names`` = readable names ("aeroplane" -> "airplane", ...)."""
    root = os.path.expanduser(root)
    dirname = os.path.join(root, "VOC2007")
    metadata = dict(
        thing_classes=list(VOC_CLASS_NAMES),
        vocabulary_names=builtin_vocabulary("voc").names,
        dirname=dirname,
        year=2007,
        split="test",
        evaluator_type="pascal_voc",
    )
    register_dataset(name, functools.partial(_load_voc, dirname, "test", root, name), metadata)
    return name


def _load_objects365(json_file: str, image_root: str, root: str, name: str) -> List[dict]:
    require_files(name, [json_file], root, OBJECTS365_LAYOUT, _OBJECTS365_SOURCE)
    dicts = load_coco_json(json_file, image_root)
    ids = np.array([obj["category_id"] for d in dicts for obj in d["annotations"]], dtype=int)
    if len(ids) and (ids.min() < 1 or ids.max() > 365):
        raise ValueError(
            f"{json_file}: category ids must be Objects365's 1..365, found {ids.min()}..{ids.max()}"
        )
    for d in dicts:
        for obj in d["annotations"]:
            obj["category_id"] -= 1
    return dicts


def register_objects365_v2_val(root: str, name: str = "vild_objects365_v2_val") -> str:
    """Objects365 v2 val (COCO-format json, 365 classes with ids 1..365, evaluator "coco");
    class names from the package's Objects365 names file. Its annotations are boxes only (no
    "segmentation"): ``evaluation_tasks`` = ("bbox",), so a mask model's masks are not scored
    against ground truth that has none (pycocotools would fail with KeyError 'segmentation')."""
    root = os.path.expanduser(root)
    json_file = os.path.join(root, "objects365", "annotations", "zhiyuan_objv2_val.json")
    image_root = os.path.join(root, "objects365", "val")
    names = builtin_vocabulary("objects365").names
    metadata = dict(
        thing_classes=list(names),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(names))},
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        evaluation_tasks=("bbox",),
    )
    register_dataset(
        name, functools.partial(_load_objects365, json_file, image_root, root, name), metadata
    )
    return name


def register_transfer_datasets(root: str) -> List[str]:
    """``vild_coco_2017_val``, ``vild_voc_2007_test`` and ``vild_objects365_v2_val`` under
    ``root``."""
    return [
        register_coco_2017_val(root),
        register_voc_2007_test(root),
        register_objects365_v2_val(root),
    ]
