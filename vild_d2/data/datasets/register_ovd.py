"""Your own COCO- or LVIS-format dataset as an open-vocabulary benchmark: one call
(:func:`register_ovd_dataset`) or a dataset YAML file (:func:`register_dataset_files`, which
``vild_d2.config.load_config`` calls for ``MODEL.VILD.DATASET_FILES``, so every tool reads it).

``<name>_train_base``: the training json without the novel classes' annotations (as the
benchmarks); ``<name>_val``: every class, ``novel_classes`` set, the evaluator of the format
(COCO: box AP50 and AP on novel / base / all; LVIS: APr = novel, APc, APf).
See docs/OWN_DATA.md.
"""

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from ...fileio import atomic_write
from .common import dataset_cache_dir, register_dataset
from .ovd_json import OVDJsonError, check_categories, check_novel, load_ovd_json, read_json

__all__ = ["FORMATS", "register_dataset_files", "register_ovd_dataset"]

logger = logging.getLogger(__name__)

FORMATS = ("coco", "lvis")
_FILE_KEYS = {"name", "format", "novel", "train", "val"}
_SPLIT_KEYS = {"json", "images"}


def register_ovd_dataset(
    name: str,
    *,
    train_json: str,
    train_images: str,
    val_json: str,
    val_images: str,
    novel: Optional[Sequence[str]] = None,
    format: str = "coco",
) -> List[str]:
    """
    Register ``<name>_train_base`` and ``<name>_val`` for a COCO- or LVIS-format dataset.

    Reads the val json now (its categories are the class names, ``thing_classes`` in category
    id order; ids need not be contiguous); the train json and every image are read and checked
    when a dataset is first loaded. Errors name the file and the item (docs/OWN_DATA.md).

    Args:
        name: prefix of the two names.
        train_json, train_images, val_json, val_images: the annotation files and the folders
            their images' ``file_name`` are relative to (LVIS: ``coco_url``'s last two parts
            when there is no ``file_name``).
        novel: class names held out of training (category names of the jsons). LVIS format:
            None = the categories whose ``frequency`` is "r".
        format: "coco" or "lvis".

    Returns:
        [``<name>_train_base``, ``<name>_val``].
    """
    if format not in FORMATS:
        raise ValueError(f"dataset {name!r}: format {format!r} is not one of {FORMATS}")
    paths = (train_json, train_images, val_json, val_images)
    train_json, train_images, val_json, val_images = [
        os.path.abspath(os.path.expanduser(str(p))) for p in paths
    ]
    for root, role in ((train_images, "train_images"), (val_images, "val_images")):
        if os.path.exists(root) and not os.path.isdir(root):
            raise OVDJsonError(f"dataset {name!r}: {role} {root} is a file, not a folder")
    val = _read_cached(val_json, f"val json of dataset {name!r}")
    categories = check_categories(val, val_json)
    if novel is None:
        if format != "lvis":
            raise ValueError(f"dataset {name!r}: name its novel classes (novel=[...])")
        novel = [c["name"] for c in categories if c.get("frequency") == "r"]
    novel = list(novel)
    if not novel:
        raise ValueError(f"dataset {name!r}: no novel class (novel=[...] is empty)")
    check_novel(novel, categories, val_json)
    if len(set(novel)) != len(novel):
        raise ValueError(f"dataset {name!r}: novel classes repeat: {novel}")
    novel_set = set(novel)
    all_ids = [c["id"] for c in categories]
    base_ids = [c["id"] for c in categories if c["name"] not in novel_set]
    if not base_ids:
        raise ValueError(f"dataset {name!r}: every class is novel; training needs base classes")
    names_by_id = {c["id"]: c["name"] for c in categories}
    synonyms = {c["id"]: c.get("synonyms") for c in categories}
    if not all(isinstance(s, list) and s for s in synonyms.values()):
        synonyms = None  # (LVIS) synonyms for MODEL.VILD.USE_SYNONYMS: only if every class has some

    train_name, val_name = f"{name}_train_base", f"{name}_val"
    base_map = {cat_id: k for k, cat_id in enumerate(base_ids)}
    register_dataset(
        train_name,
        functools.partial(
            _load_train, train_name, train_json, train_images, format, categories, base_map, novel
        ),
        {
            **_synonyms(synonyms, base_ids),
            "dataset_format": format,
            "thing_classes": [names_by_id[i] for i in base_ids],
            "thing_dataset_id_to_contiguous_id": base_map,
            "novel_classes": [],
            "image_root": train_images,
            # No json_file: detectron2's COCOEvaluator converts the dicts (base classes only).
            "evaluator_type": "coco",
        },
    )
    all_map = {cat_id: k for k, cat_id in enumerate(all_ids)}
    has_masks = any("segmentation" in a for a in val.get("annotations", []))
    metadata = {
        **_synonyms(synonyms, all_ids),
        "dataset_format": format,
        "thing_classes": [names_by_id[i] for i in all_ids],
        "thing_dataset_id_to_contiguous_id": all_map,
        "novel_classes": novel,
        "image_root": val_images,
        "source_json": val_json,
    }
    if not has_masks:  # a mask model's masks cannot be scored against boxes
        metadata["evaluation_tasks"] = ("bbox",)
    if format == "coco":
        metadata.update(json_file=val_json, evaluator_type="coco_ovd")
    else:
        # LVIS's evaluator reads APr from the json's frequency field: a copy where the novel
        # classes, and only they, are "r" (and LVIS's per-image fields have defaults).
        metadata.update(json_file=_lvis_eval_json(val_name, val_json, val, novel_set))
        metadata["evaluator_type"] = "lvis"
    register_dataset(
        val_name,
        functools.partial(_load_val, val_name, val_json, val_images, format, all_map),
        metadata,
    )
    return [train_name, val_name]


def _synonyms(synonyms: Optional[Dict[int, list]], ids: Sequence[int]) -> dict:
    return {} if synonyms is None else {"class_synonyms": [synonyms[i] for i in ids]}


# (path, size, mtime_ns) -> parsed json: load_config registers again in every call.
_CACHE: Dict[tuple, dict] = {}


def _read_cached(path: str, what: str) -> dict:
    try:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
    except OSError:
        return read_json(path, what)  # its error: not found, a folder...
    if key not in _CACHE:
        _CACHE.clear()  # one file kept: a val json may be large
        _CACHE[key] = read_json(path, what)
    return _CACHE[key]


def _load_val(name, json_file, image_root, fmt, id_map) -> List[dict]:
    data = _read_cached(json_file, f"val json of dataset {name!r}")
    return load_ovd_json(data, json_file, image_root, fmt, id_map, require_area=True)[0]


def _load_train(name, json_file, image_root, fmt, val_categories, base_map, novel) -> List[dict]:
    data = read_json(json_file, f"train json of dataset {name!r}")
    categories = check_categories(data, json_file)
    ours = [(c["id"], c["name"]) for c in categories]
    theirs = [(c["id"], c["name"]) for c in val_categories]
    if ours != theirs:
        diff = sorted(set(ours) ^ set(theirs))[:5]
        raise OVDJsonError(
            f"dataset {name!r}: the train json {json_file} and the val json have different "
            f"categories (id, name); first differences: {diff}. Both must list the same ones."
        )
    dicts, counts = load_ovd_json(data, json_file, image_root, fmt, base_map, require_area=False)
    empty = [
        f"{c['name']!r} (id {c['id']})"
        for c in categories
        if c["id"] in base_map and not counts[c["id"]]
    ]
    if empty:
        raise OVDJsonError(
            f"dataset {name!r}: base categories without a single (non-crowd) annotation in "
            f"{json_file}: {', '.join(empty)}. A base class trains the classifier; one never "
            f"seen would only be learned as background: add it to the novel classes "
            f"(now {novel}), or annotate it."
        )
    return dicts


def _lvis_eval_json(name: str, source: str, data: dict, novel: set) -> str:
    """The ground truth LVISEvaluator reads: ``source`` with frequency "r" for the novel classes
    only (a base class marked "r" becomes "c", one without a frequency "f"), and per image,
    when missing, ``neg_category_ids`` = every category not annotated there (the image taken as
    exhaustively annotated, as COCO does) and ``not_exhaustive_category_ids`` = []. Written to
    the dataset cache when ``source`` or the novel classes change; returns its path."""
    key = hashlib.sha1(f"{source}|{sorted(novel)}".encode()).hexdigest()[:10]
    target = dataset_cache_dir() / "ovd" / f"{name}_{key}.json"
    st = os.stat(source)
    stamp = {"source": source, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp_file = target.with_name(target.name + ".source.json")
    if target.is_file() and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
                return str(target)
        except ValueError:
            pass  # unreadable stamp: derive again
    categories = []
    for c in data["categories"]:
        freq = c.get("frequency")
        freq = "r" if c["name"] in novel else ("c" if freq == "r" else freq if freq else "f")
        categories.append({**c, "frequency": freq})
    present: Dict[object, set] = {}
    for a in data.get("annotations", []):
        present.setdefault(a.get("image_id"), set()).add(a.get("category_id"))
    all_ids = {c["id"] for c in data["categories"]}
    images = [
        {
            "neg_category_ids": sorted(all_ids - present.get(img.get("id"), set())),
            "not_exhaustive_category_ids": [],
            **img,
        }
        for img in data.get("images", [])
    ]
    derived = {**data, "categories": categories, "images": images}
    atomic_write(target, [json.dumps(derived).encode("utf-8")])
    atomic_write(stamp_file, [json.dumps(stamp).encode("utf-8")])
    logger.info(f"{name}: wrote the LVIS evaluation ground truth {target}")
    return str(target)


def register_dataset_files(paths: Sequence[str]) -> List[str]:
    """Register the datasets of each YAML dataset file (docs/OWN_DATA.md); returns the names.

    A file holds one dataset, or a list of them under ``datasets:``::

        name: my_parts
        format: coco              # or lvis
        novel: [gear, spring]     # LVIS: may be left out (= the "r" categories)
        train: {json: annotations/train.json, images: images/train}
        val: {json: annotations/val.json, images: images/val}

    Relative paths are relative to the file's folder.
    """
    names = []
    for path in paths:
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file {path} not found (MODEL.VILD.DATASET_FILES)")
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise OVDJsonError(f"dataset file {path}: not YAML ({e})") from e
        entries = doc.get("datasets") if isinstance(doc, dict) and "datasets" in doc else [doc]
        if not isinstance(entries, list) or not entries:
            raise OVDJsonError(f"dataset file {path}: 'datasets' must be a non-empty list")
        for i, entry in enumerate(entries):
            where = f"dataset file {path}" + (f", datasets[{i}]" if len(entries) > 1 else "")
            names += register_ovd_dataset(**_parse_entry(entry, where, os.path.dirname(path)))
    return names


def _parse_entry(entry, where: str, folder: str) -> dict:
    if not isinstance(entry, dict):
        raise OVDJsonError(f"{where}: a dataset is a mapping with keys {sorted(_FILE_KEYS)}")
    unknown = sorted(set(entry) - _FILE_KEYS)
    missing = sorted({"name", "train", "val"} - set(entry))
    if unknown or missing:
        raise OVDJsonError(
            f"{where}: "
            + (f"unknown keys {unknown}; " if unknown else "")
            + (f"missing keys {missing}; " if missing else "")
            + f"the keys are {sorted(_FILE_KEYS)}"
        )
    novel = entry.get("novel")
    if isinstance(novel, str):
        novel = [novel]
    if novel is not None and not (
        isinstance(novel, list) and all(isinstance(n, str) for n in novel)
    ):
        raise OVDJsonError(f"{where}: 'novel' must be a list of class names, got {novel!r}")
    out = {"name": str(entry["name"]), "novel": novel, "format": entry.get("format", "coco")}
    for split in ("train", "val"):
        s = entry[split]
        if not isinstance(s, dict) or set(s) != _SPLIT_KEYS:
            raise OVDJsonError(f"{where}: '{split}' must have exactly the keys json and images")
        for key in ("json", "images"):
            value = os.path.expanduser(str(s[key]))
            out[f"{split}_{key}"] = os.path.join(folder, value)
    return out
