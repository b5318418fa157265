"""Class names of the benchmark and transfer vocabularies, from detectron2's own category
tables and the package's data files (no dataset needed).

``builtin_vocabulary("lvis" | "coco" | "coco_ov" | "voc" | "objects365")`` gives the names in
the order of the datasets' contiguous class ids, the novel names where the benchmark has a
split, and synonyms where the source has them.
"""

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES

__all__ = [
    "BUILTIN_VOCABULARIES",
    "BuiltinVocabulary",
    "builtin_vocabulary",
    "coco_ov_split",
    "lvis_v1_categories",
    "VOC_READABLE_NAMES",
]

_ASSETS = Path(__file__).resolve().parents[1] / "assets"
COCO_OV_SPLIT_PATH = _ASSETS / "coco_ov_48_17_split.json"
OBJECTS365_NAMES_PATH = _ASSETS / "objects365_v2_names.csv"

# PASCAL VOC's file names are not English; the text classifier gets these instead.
VOC_READABLE_NAMES = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "motorbike": "motorbike",
}


@dataclass(frozen=True)
class BuiltinVocabulary:
    """names: K class names (contiguous id order); novel: the novel ones (None = no split);
    synonyms: K lists (None = none known)."""

    names: List[str]
    novel: Optional[List[str]] = None
    synonyms: Optional[List[List[str]]] = None


def lvis_v1_categories() -> List[dict]:
    """detectron2's 1203 LVIS v1 categories (id, name, synonyms, frequency), sorted by id."""
    return sorted(LVIS_CATEGORIES, key=lambda c: c["id"])


@lru_cache(maxsize=None)
def coco_ov_split() -> dict:
    """The COCO 48/17 split: {"base": [{"id", "name"}...], "novel": [...]} (COCO category ids)."""
    with open(COCO_OV_SPLIT_PATH, encoding="utf-8") as f:
        split = json.load(f)
    assert len(split["base"]) == 48 and len(split["novel"]) == 17, COCO_OV_SPLIT_PATH
    return split


def _coco_things() -> List[dict]:
    return [c for c in COCO_CATEGORIES if c["isthing"]]


def _objects365_names() -> List[str]:
    with open(OBJECTS365_NAMES_PATH, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    # id, name, readable name; ids are 1..365 in file order.
    assert [int(r[0]) for r in rows] == list(range(1, 366)), OBJECTS365_NAMES_PATH
    return [r[2].strip() for r in rows]


@lru_cache(maxsize=None)
def _builtin(name: str) -> BuiltinVocabulary:
    if name == "lvis":
        cats = lvis_v1_categories()
        return BuiltinVocabulary(
            [c["name"] for c in cats],
            [c["name"] for c in cats if c["frequency"] == "r"],
            [list(c["synonyms"]) for c in cats],
        )
    if name == "coco":
        return BuiltinVocabulary([c["name"] for c in _coco_things()])
    if name == "coco_ov":
        split = coco_ov_split()
        ids = {c["id"] for c in split["base"] + split["novel"]}
        novel_ids = {c["id"] for c in split["novel"]}
        cats = [c for c in _coco_things() if c["id"] in ids]
        return BuiltinVocabulary(
            [c["name"] for c in cats], [c["name"] for c in cats if c["id"] in novel_ids]
        )
    if name == "voc":
        return BuiltinVocabulary([VOC_READABLE_NAMES.get(n, n) for n in VOC_CLASS_NAMES])
    if name == "objects365":
        return BuiltinVocabulary(_objects365_names())
    raise KeyError(name)


BUILTIN_VOCABULARIES = ("lvis", "coco", "coco_ov", "voc", "objects365")


def builtin_vocabulary(name: str) -> BuiltinVocabulary:
    """The class names of a built-in vocabulary (one of :data:`BUILTIN_VOCABULARIES`)."""
    if name not in BUILTIN_VOCABULARIES:
        raise ValueError(
            f"unknown built-in vocabulary {name!r}; choose one of {', '.join(BUILTIN_VOCABULARIES)}"
            " or give a list of names, a saved vocabulary file or a registered dataset"
        )
    return _builtin(name)
