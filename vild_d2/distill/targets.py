"""Distillation targets joined to the training dataset dicts at load time, as detectron2 joins
precomputed proposals (``load_proposals_into_dataset``).

Each dict of a training dataset gets the two fields :class:`vild_d2.data.ViLDDatasetMapper`
transforms with the image: ``distill_boxes`` (M, 4) and ``distill_embeddings`` (M, D). From a
store they are :class:`vild_d2.data.LazyTarget` references (:class:`StoreField`,
:class:`OnlineEmbeddings`): a few bytes in the dict, read (or, online, computed) only when the
mapper calls their ``load()``, so a dataset of 100k images holds no targets in memory.

Shape shorthand: M = boxes of an image, D = CLIP embedding width.
"""

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ..clip_models import clip_embed_dim, clip_identity
from ..config import needs_distillation
from ..data import LazyTarget
from ..data.images import read_rgb
from .store import DistillStore, StoreError, check_dataset, proposals_for
from .teacher import CLIPTeacher, crop_settings

__all__ = [
    "OnlineEmbeddings",
    "StoreField",
    "distill_stores_from_config",
    "load_distill_targets_into_dataset",
    "open_store",
]

logger = logging.getLogger(__name__)

MISSING_POLICIES = ("error", "skip")


def open_store(root: str) -> DistillStore:
    """The store at ``root``, opened once per process and state of its folder (its chunk
    indices are read on open; a chunk written since changes the folder's mtime)."""
    return _open_store(root, os.stat(os.path.expanduser(root)).st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _open_store(root: str, mtime_ns: int) -> DistillStore:
    return DistillStore(root)


@functools.lru_cache(maxsize=4)
def _online_teacher(clip_model: str, scales: Tuple[float, ...], device: str) -> CLIPTeacher:
    return CLIPTeacher(clip_model, scales=scales, device=device)


@dataclass(frozen=True)
class StoreField(LazyTarget):
    """One image's ``field`` ("boxes" or "embeddings") in the store at ``root``, its first
    ``max_boxes`` rows, read by :meth:`load`: (M, 4) or (M, D) float32."""

    root: str
    image_id: Any
    field: str
    max_boxes: int

    def load(self) -> np.ndarray:
        rows = open_store(self.root)[self.image_id][self.field][: self.max_boxes]
        return np.asarray(rows, dtype=np.float32)


@dataclass(frozen=True)
class OnlineEmbeddings(LazyTarget):
    """One image's (M, D) float32 targets computed by :meth:`load`, by the CLIP teacher
    on the original image and the store's boxes: the same crops, and the same float16-rounded
    numbers, as tools/precompute_clip_embeddings.py would store."""

    root: str
    image_id: Any
    max_boxes: int
    file_name: str
    height: Optional[int]
    width: Optional[int]
    clip_model: str
    scales: Tuple[float, ...]
    device: str

    def load(self) -> np.ndarray:
        boxes = proposals_for(open_store(self.root), self.image_id, self.max_boxes, self.file_name)
        size = {"height": self.height, "width": self.width}
        image = read_rgb({"file_name": self.file_name, **{k: v for k, v in size.items() if v}})
        teacher = _online_teacher(self.clip_model, self.scales, self.device)
        embeddings = teacher(image, torch.from_numpy(boxes)).half().float().numpy()
        return np.asarray(embeddings, dtype=np.float32)


def distill_stores_from_config(cfg) -> Optional[List[str]]:
    """
    The store of each ``DATASETS.TRAIN`` entry (``MODEL.VILD.DISTILL.STORES``), checked against
    the config; None when the model does not distil (ViLD-text, another meta-architecture) or
    names no store (the dataset dicts then carry their own targets).
    """
    node = cfg.MODEL.VILD.DISTILL
    if node.MISSING not in MISSING_POLICIES:
        raise ValueError(
            f"MODEL.VILD.DISTILL.MISSING={node.MISSING!r}, expected one of {MISSING_POLICIES}"
        )
    if not needs_distillation(cfg):
        return None
    if not node.STORES:
        if node.ONLINE:
            raise ValueError(
                "MODEL.VILD.DISTILL.ONLINE needs MODEL.VILD.DISTILL.STORES "
                "(proposal stores, one per training dataset)"
            )
        return None
    if len(node.STORES) != len(cfg.DATASETS.TRAIN):
        raise ValueError(
            f"MODEL.VILD.DISTILL.STORES has {len(node.STORES)} stores for "
            f"{len(cfg.DATASETS.TRAIN)} DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: "
            "give one per training dataset, in order"
        )
    embed_dim = clip_embed_dim(cfg.MODEL.VILD.CLIP_MODEL)
    for root, name in zip(node.STORES, cfg.DATASETS.TRAIN):
        _check_store(open_store(root), name, cfg, embed_dim, online=node.ONLINE)
    return list(node.STORES)


def load_distill_targets_into_dataset(
    dataset_dicts: List[dict], root: str, cfg, dataset_name: str = ""
) -> List[dict]:
    """
    Add ``distill_boxes`` and ``distill_embeddings`` (lazy references into the store at
    ``root``) to every dict of one training dataset, in place. Images absent from the store are
    an error naming the count and a few ids, or (``MODEL.VILD.DISTILL.MISSING skip``) counted,
    logged, and given no targets (empty arrays).

    Returns:
        ``dataset_dicts``.
    """
    node = cfg.MODEL.VILD.DISTILL
    store = open_store(root)
    # Same name and ids are not the same pictures: targets of another copy of the dataset
    # would be crops of boxes from other images (each file is hashed once per process).
    check_dataset(store, dataset_dicts, dataset_name)
    absent = [d["image_id"] for d in dataset_dicts if d["image_id"] not in store]
    if absent:
        msg = (
            f"{len(absent)} of {len(dataset_dicts)} images of training dataset {dataset_name!r} "
            f"are not in store {store.root} (e.g. image ids {absent[:5]}"
            + (
                ""
                if store.is_complete
                else f"; the store lacks chunks {store.missing_chunks()[:10]}, a shard may "
                "not have run"
            )
            + ")"
        )
        if node.MISSING == "error":
            raise StoreError(
                msg + ". Set MODEL.VILD.DISTILL.MISSING skip to train them without "
                "distillation targets."
            )
        logger.warning(msg + "; they train without distillation targets.")
    else:
        logger.info(
            "Distillation targets of %r: %s (%d images)", dataset_name, root, len(dataset_dicts)
        )
    dim = store.header.get("embed_dim") or clip_embed_dim(cfg.MODEL.VILD.CLIP_MODEL) or 0
    scales = tuple(float(s) for s in node.CROP_SCALES)
    absent = set(absent)
    for d in dataset_dicts:
        image_id = d["image_id"]
        if image_id in absent:
            d["distill_boxes"] = np.zeros((0, 4), np.float32)
            d["distill_embeddings"] = np.zeros((0, dim), np.float32)
            continue
        d["distill_boxes"] = StoreField(root, image_id, "boxes", node.MAX_BOXES)
        if node.ONLINE:
            d["distill_embeddings"] = OnlineEmbeddings(
                root,
                image_id,
                node.MAX_BOXES,
                d["file_name"],
                d.get("height"),
                d.get("width"),
                cfg.MODEL.VILD.CLIP_MODEL,
                scales,
                node.ONLINE_DEVICE,
            )
        else:
            d["distill_embeddings"] = StoreField(root, image_id, "embeddings", node.MAX_BOXES)
    return dataset_dicts


def _check_store(store: DistillStore, dataset: str, cfg, embed_dim, online: bool):
    what = f"the config (DATASETS.TRAIN {dataset!r})"
    if online:
        if store.header["kind"] not in ("proposals", "embeddings"):
            raise StoreError(f"{store.root}: kind {store.header['kind']!r} holds no boxes")
        return
    if store.header["kind"] != "embeddings":
        raise StoreError(
            f"{store.root} is a {store.header['kind']!r} store; MODEL.VILD.DISTILL.STORES needs "
            "CLIP-target stores (tools/precompute_clip_embeddings.py), or set "
            "MODEL.VILD.DISTILL.ONLINE True to compute targets from proposals during training"
        )
    expected = {
        "clip": clip_identity(cfg.MODEL.VILD.CLIP_MODEL),
        "crops.scales": [float(s) for s in cfg.MODEL.VILD.DISTILL.CROP_SCALES],
        "crops.method": crop_settings((), 0)["method"],
    }
    if embed_dim is not None:
        expected["embed_dim"] = embed_dim
    try:
        store.check(expected, what)
    except StoreError as e:
        raise StoreError(
            f"{e} (CLIPs are compared by the sha256 of their bytes; the config's "
            f"MODEL.VILD.CLIP_MODEL is {cfg.MODEL.VILD.CLIP_MODEL})"
        ) from None
