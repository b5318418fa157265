"""COCO open-vocabulary benchmark (48 base / 17 novel classes, the split of OVR-CNN and ViLD).

Built from the standard ``coco/annotations/instances_{train,val}2017.json``. The validation
ground truth restricted to the 65 classes, which the evaluator needs as a json, is derived into
:func:`~.common.dataset_cache_dir` (never next to the originals) the first time it is needed and
again whenever the original changes.
"""

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.coco import load_coco_json

from ...fileio import atomic_write
from ...text.categories import coco_ov_split
from .common import dataset_cache_dir, keep_categories, register_dataset, require_files

__all__ = [
    "COCO_LAYOUT",
    "COCO_SOURCE",
    "load_coco_subset",
    "prepare_coco_ovd_json",
    "register_coco_ovd",
]

logger = logging.getLogger(__name__)

COCO_LAYOUT = """
coco/annotations/instances_train2017.json
coco/annotations/instances_val2017.json
coco/train2017/*.jpg
coco/val2017/*.jpg
"""
COCO_SOURCE = (
    "COCO 2017 comes from https://cocodataset.org/#download (2017 Train/Val images, "
    "2017 Train/Val annotations)."
)


def load_coco_subset(
    json_file: str, image_root: str, id_map: Dict[int, int], dataset_name: str, root: str
) -> List[dict]:
    """
    A COCO-format json's dicts with only the annotations of the categories in ``id_map``
    ({dataset category id: contiguous id}), category ids mapped; every image is kept.
    """
    require_files(dataset_name, [json_file], root, COCO_LAYOUT, COCO_SOURCE)
    # No dataset_name: the metadata (thing_classes, id map) is ours, not the json's full list.
    return keep_categories(load_coco_json(json_file, image_root), id_map)


def _derived_json_path(source: str, num_classes: int) -> Path:
    # Keyed by the original's absolute path, so two dataset roots never share a derived file.
    key = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:10]
    stem = Path(source).stem
    return dataset_cache_dir() / "coco_ovd" / f"{stem}_{num_classes}classes_{key}.json"


def prepare_coco_ovd_json(dataset_name: str) -> str:
    """
    Write (if missing, or made from another version of the original: its size, mtime and the
    class subset are recorded beside it) the ground-truth json of ``dataset_name``
    restricted to its classes: metadata ``json_file`` <- ``source_json_file`` with only the
    categories in ``thing_dataset_id_to_contiguous_id`` and their annotations. Returns its path.
    """
    meta = MetadataCatalog.get(dataset_name)
    source, target = meta.source_json_file, Path(meta.json_file)
    require_files(dataset_name, [source], meta.dataset_root, COCO_LAYOUT, COCO_SOURCE)
    keep = set(meta.thing_dataset_id_to_contiguous_id)
    # What the derived file was made from: any change of the original (newer OR older, e.g. a
    # copy restored with its old mtime) or of the class subset makes it stale.
    st = os.stat(source)
    stamp = {
        "source": os.path.abspath(source),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "category_ids": sorted(keep),
    }
    stamp_file = target.with_name(f"{target.name}.source.json")
    if target.is_file() and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
                return str(target)
        except ValueError:
            pass  # unreadable stamp: derive again
    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    missing = keep - {c["id"] for c in data["categories"]}
    if missing:
        raise ValueError(f"{source}: categories {sorted(missing)} of {dataset_name!r} not found")
    data["categories"] = [c for c in data["categories"] if c["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
    # The stamp last: a crash in between leaves a derived file without a matching stamp.
    atomic_write(target, [json.dumps(data).encode("utf-8")])
    atomic_write(stamp_file, [json.dumps(stamp).encode("utf-8")])
    logger.info(f"{dataset_name}: wrote {len(data['categories'])}-class ground truth {target}")
    return str(target)


def register_coco_ovd(root: str, prefix: str = "vild_coco_2017_ov") -> List[str]:
    """
    Register, for the datasets root ``root`` (reads no file):

    * ``<prefix>_train_base``: COCO 2017 train with only the 48 base classes' annotations;
      thing_classes = those 48, in COCO id order.
    * ``<prefix>_val``: COCO 2017 val with the 65 classes' annotations, ``novel_classes`` = the
      17 novel ones, ``evaluator_type`` "coco_ovd" (box AP50 on novel, base and all).

    Returns the registered names.
    """
    root = os.path.expanduser(root)
    split = coco_ov_split()
    names_by_id = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}
    base_ids = sorted(c["id"] for c in split["base"])
    all_ids = sorted(base_ids + [c["id"] for c in split["novel"]])
    novel = [names_by_id[c["id"]] for c in sorted(split["novel"], key=lambda c: c["id"])]
    registered = []
    for split_name, ids in (("train", base_ids), ("val", all_ids)):
        name = f"{prefix}_{split_name}" + ("_base" if split_name == "train" else "")
        source = os.path.join(root, "coco", "annotations", f"instances_{split_name}2017.json")
        image_root = os.path.join(root, "coco", f"{split_name}2017")
        id_map = {cat_id: k for k, cat_id in enumerate(ids)}
        metadata = dict(
            thing_classes=[names_by_id[i] for i in ids],
            thing_dataset_id_to_contiguous_id=id_map,
            novel_classes=novel if split_name == "val" else [],
            image_root=image_root,
            source_json_file=source,
            dataset_root=root,
        )
        if split_name == "val":
            metadata.update(
                json_file=str(_derived_json_path(source, len(ids))), evaluator_type="coco_ovd"
            )
        else:
            # No json_file: detectron2's COCOEvaluator would convert the dicts itself.
            metadata.update(evaluator_type="coco")
        loader = functools.partial(load_coco_subset, source, image_root, id_map, name, root)
        register_dataset(name, loader, metadata)
        registered.append(name)
    return registered
