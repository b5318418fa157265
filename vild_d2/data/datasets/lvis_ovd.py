"""LVIS v1 open-vocabulary benchmark: train on the 866 base (frequent + common) classes, test on
all 1203, APr (the 337 rare classes) being the novel-class AP.

Files (detectron2's layout): ``lvis/lvis_v1_{train,val}.json`` and COCO 2017 images in
``coco/{train,val}2017/``. Category names, synonyms and frequencies come from detectron2's
``lvis_v1_categories.py``.
"""

import functools
import os
from typing import List

from detectron2.data.datasets.lvis import load_lvis_json

from ...text.categories import lvis_v1_categories
from .common import keep_categories, register_dataset, require_files

__all__ = ["LVIS_V1_LAYOUT", "lvis_v1_base_categories", "register_lvis_v1_ovd"]

LVIS_V1_LAYOUT = """
lvis/lvis_v1_train.json
lvis/lvis_v1_val.json
coco/train2017/*.jpg    (LVIS v1 images are COCO 2017's, from both folders: each
coco/val2017/*.jpg       image's coco_url names its folder)
"""
_LVIS_SOURCE = (
    "LVIS v1 annotations: https://www.lvisdataset.org/dataset ; images: COCO 2017 "
    "train/val from https://cocodataset.org/#download."
)


def _class_name(category: dict) -> str:
    # LVIS's "name", as ViLD's official code and builtin_vocabulary("lvis"). (detectron2's own
    # metadata takes the first synonym, which differs for one class: 162 "bull" / "horned_cow".)
    return category["name"]


def lvis_v1_base_categories() -> List[dict]:
    """The 866 base categories (frequency "f" or "c"), sorted by LVIS id."""
    return [c for c in lvis_v1_categories() if c["frequency"] != "r"]


def _load(json_file: str, image_root: str, root: str, name: str, keep=None):
    """LVIS dicts with 0-based category ids over all 1203 classes, or, with ``keep``
    ({LVIS id: contiguous id}), only the kept classes' annotations, remapped."""
    require_files(name, [json_file], root, LVIS_V1_LAYOUT, _LVIS_SOURCE)
    # No dataset_name: that would reset thing_classes to all 1203 for the base split.
    dicts = load_lvis_json(json_file, image_root)
    if keep is None:
        return dicts
    return keep_categories(dicts, {lvis_id - 1: k for lvis_id, k in keep.items()})


def register_lvis_v1_ovd(root: str, prefix: str = "vild_lvis_v1") -> List[str]:
    """
    Register, for the datasets root ``root`` (reads no file):

    * ``<prefix>_train_base``: LVIS v1 train with the rare classes' annotations removed;
      thing_classes = the 866 base classes in LVIS id order (contiguous ids remapped).
    * ``<prefix>_train``: all 1203 classes (the supervised reference; replaces detectron2's
      registration of the same files, adding the metadata below and the missing-file error).
    * ``<prefix>_val``: all 1203 classes; ``novel_classes`` = the 337 rare ones.

    Each has ``class_synonyms`` and ``evaluator_type`` "lvis" (APr = novel AP).
    Returns the registered names.
    """
    root = os.path.expanduser(root)
    image_root = os.path.join(root, "coco") + os.sep  # load_lvis_json appends "train2017/..."
    cats = lvis_v1_categories()
    base = lvis_v1_base_categories()
    novel = [_class_name(c) for c in cats if c["frequency"] == "r"]
    common = {"image_root": image_root, "evaluator_type": "lvis"}
    names = []
    for split, subset in (("train", base), ("train", cats), ("val", cats)):
        name = f"{prefix}_{split}" + ("_base" if subset is base else "")
        json_file = os.path.join(root, "lvis", f"lvis_v1_{split}.json")
        keep = {c["id"]: k for k, c in enumerate(subset)} if subset is base else None
        metadata = dict(
            common,
            json_file=json_file,
            thing_classes=[_class_name(c) for c in subset],
            class_synonyms=[list(c["synonyms"]) for c in subset],
            # Novel = never annotated in training.
            novel_classes=novel if split == "val" else [],
        )
        if keep is not None:
            # LVISEvaluator maps predictions back through it (instead of "+1").
            metadata["thing_dataset_id_to_contiguous_id"] = keep
        loader = functools.partial(_load, json_file, image_root, root, name, keep)
        register_dataset(name, loader, metadata)
        names.append(name)
    return names
