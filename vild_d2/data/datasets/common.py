"""Registration helpers: where dataset files are expected, what a missing one says, where
derived files go."""

import functools
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...fileio import cache_root

__all__ = ["dataset_cache_dir", "keep_categories", "register_dataset", "require_files"]


def dataset_cache_dir() -> Path:
    """Folder for files derived from datasets (e.g. the COCO 48/17 ground-truth jsons):
    ``$VILD_D2_CACHE/datasets``, default ``~/.cache/vild_d2/datasets``. Never the dataset root:
    the originals are left untouched."""
    return cache_root() / "datasets"


def require_files(
    dataset_name: str, paths: Sequence[str], root: str, layout: str, source: str
) -> None:
    """
    Raise FileNotFoundError naming the missing path(s), the expected layout under the datasets
    root and where the dataset comes from. Called when a dataset is loaded, not registered.

    Args:
        paths: files or folders that must exist.
        root: the datasets root the layout is relative to ($DETECTRON2_DATASETS).
        layout: the expected tree under ``root``, one entry per line.
        source: where to get the dataset (nothing is downloaded automatically).
    """
    missing = [str(p) for p in paths if not os.path.exists(p)]
    if not missing:
        return
    tree = "\n".join(f"    {line}" for line in layout.strip().splitlines())
    raise FileNotFoundError(
        f"dataset {dataset_name!r}: {', '.join(missing)} not found.\n"
        f"  Expected layout under the datasets root {os.path.abspath(root)} "
        f"($DETECTRON2_DATASETS):\n{tree}\n"
        f"  {source} Nothing is downloaded automatically."
    )


# Names this package registered: only these are ever replaced (a world re-registered at another
# root, say); a name registered by detectron2 or a user keeps its meaning.
_OURS = set()


def register_dataset(name: str, loader: Callable[[], list], metadata: Dict) -> None:
    """Register ``name`` (again, if this package registered it before, e.g. a shapes world at
    another root); a name that detectron2 or a user registered is an error, never replaced."""
    if name in DatasetCatalog.list():
        if name not in _OURS:
            raise ValueError(
                f"dataset {name!r} is already registered by someone else (detectron2 or your "
                "code); vild_d2 does not change what a registered name means: pick another name"
            )
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, functools.partial(_load, name, loader, metadata.get("json_file")))
    MetadataCatalog.get(name).set(**metadata)
    _OURS.add(name)


def _load(name: str, loader: Callable[[], list], json_file: Optional[str]) -> list:
    """``loader()``, with an unreadable annotation file named (json and pycocotools say only
    "Expecting ',' delimiter: line 1 column 5000" or "Unterminated string")."""
    try:
        return loader()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = json_file or "its annotation file"
        raise ValueError(
            f"dataset {name!r}: cannot parse {where} ({type(e).__name__}: {e}); the file is "
            "truncated or corrupt: download or generate it again"
        ) from e


def keep_categories(dicts: List[dict], id_map: Dict[int, int]) -> List[dict]:
    """Keep only the annotations whose ``category_id`` is in ``id_map`` ({category id in the
    dicts: contiguous id of the subset}), with their ids mapped; every image is kept (an image
    whose objects all belong to other classes is still a training image)."""
    for record in dicts:
        record["annotations"] = [
            {**obj, "category_id": id_map[obj["category_id"]]}
            for obj in record["annotations"]
            if obj["category_id"] in id_map
        ]
    return dicts
