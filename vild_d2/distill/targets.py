"""Distillation targets for training: joined from stores by image id, or computed online.

Shape shorthand: M = boxes of an image, D = CLIP embedding width.
"""

import logging
from typing import List, Optional, Sequence

import numpy as np
import torch

from .precompute import proposals_for, read_rgb
from .store import DistillStore, StoreError
from .teacher import CLIPTeacher, crop_settings

__all__ = ["DistillTargets", "clip_embed_dim"]

logger = logging.getLogger(__name__)

SOURCE_KEY = "distill_source"  # index of the dict's store, set by attach()
MISSING_POLICIES = ("error", "skip")

# Embedding widths of the clip.available_models() names (their text_projection widths).
_NAMED_WIDTHS = {
    "RN50": 1024,
    "RN101": 512,
    "RN50x4": 640,
    "RN50x16": 768,
    "RN50x64": 1024,
    "ViT-B/32": 512,
    "ViT-B/16": 512,
    "ViT-L/14": 768,
    "ViT-L/14@336px": 768,
}


def clip_embed_dim(spec: str) -> Optional[int]:
    """CLIP's embedding width D without loading the model (None if it cannot be told)."""
    if spec in _NAMED_WIDTHS:
        return _NAMED_WIDTHS[spec]
    try:
        state = torch.load(spec, map_location="cpu", mmap=True, weights_only=True)
        return int(state["text_projection"].shape[1])
    except Exception:  # a TorchScript archive or anything else: the header check covers it
        return None


class DistillTargets:
    """
    Fills a training dataset dict's ``distill_boxes`` (M, 4) and ``distill_embeddings``
    (M, D), before the mapper's transforms, from the store of its dataset; or, online, from
    the CLIP teacher on the original image and the store's boxes (same crops and the same
    float16-rounded numbers as tools/precompute_clip_embeddings.py would store).
    """

    def __init__(
        self,
        stores: Sequence[DistillStore],
        *,
        missing: str = "error",
        max_boxes: int = 300,
        teacher: Optional[CLIPTeacher] = None,
        embed_dim: Optional[int] = None,
    ):
        """
        Args:
            stores: one per training dataset (``dataset_dict["distill_source"]`` picks one;
                absent = the first).
            missing: an image absent from its store is an "error", or is trained without
                targets ("skip").
            max_boxes: use the first (highest-objectness) ``max_boxes`` boxes of each image.
            teacher: online mode: compute the embeddings (the stores then only give boxes).
            embed_dim: D given to images without targets in "skip" mode.
        """
        if missing not in MISSING_POLICIES:
            raise ValueError(
                f"MODEL.VILD.DISTILL.MISSING={missing!r}, expected one of {MISSING_POLICIES}"
            )
        self.stores = list(stores)
        self.missing = missing
        self.max_boxes = max_boxes
        self.teacher = teacher
        self.embed_dim = embed_dim

    @classmethod
    def from_config(cls, cfg) -> Optional["DistillTargets"]:
        """None when ``MODEL.VILD.DISTILL.STORES`` is empty (the dicts carry their own targets,
        or the variant needs none) or the model does not distil (ViLD-text, or another
        meta-architecture, e.g. the supervised baseline sharing a config base with ViLD)."""
        node = cfg.MODEL.VILD.DISTILL
        distils = cfg.MODEL.META_ARCHITECTURE == "ViLDRCNN" and cfg.MODEL.VILD.VARIANT != "text"
        if not distils:
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
        stores = [DistillStore(path) for path in node.STORES]
        teacher = None
        if node.ONLINE:
            teacher = CLIPTeacher(
                cfg.MODEL.VILD.CLIP_MODEL, scales=node.CROP_SCALES, device=node.ONLINE_DEVICE
            )
        embed_dim = clip_embed_dim(cfg.MODEL.VILD.CLIP_MODEL)
        for store, name in zip(stores, cfg.DATASETS.TRAIN):
            _check_store(store, name, cfg, embed_dim, online=node.ONLINE)
        if embed_dim is None and not node.ONLINE:
            embed_dim = stores[0].header.get("embed_dim")
        return cls(
            stores,
            missing=node.MISSING,
            max_boxes=node.MAX_BOXES,
            teacher=teacher,
            embed_dim=embed_dim,
        )

    def attach(self, dataset_names: Sequence[str], dicts_per_dataset: Sequence[List[dict]]):
        """
        Tag every dict with its store and check that the stores cover the datasets: missing
        images are an error naming the count and a few ids, or (``missing="skip"``) counted
        and logged.

        Returns:
            list[dict]: the dicts of all datasets, concatenated (shallow copies).
        """
        out = []
        for k, (name, dicts) in enumerate(zip(dataset_names, dicts_per_dataset)):
            store = self.stores[k]
            absent = [d["image_id"] for d in dicts if d["image_id"] not in store]
            if absent:
                msg = (
                    f"{len(absent)} of {len(dicts)} images of training dataset {name!r} are not "
                    f"in store {store.root} (e.g. image ids {absent[:5]}"
                    + (
                        ""
                        if store.is_complete
                        else f"; the store lacks chunks {store.missing_chunks()[:10]}, a shard may "
                        "not have run"
                    )
                    + ")"
                )
                if self.missing == "error":
                    raise StoreError(
                        msg + ". Set MODEL.VILD.DISTILL.MISSING skip to train "
                        "them without distillation targets."
                    )
                logger.warning(msg + "; they train without distillation targets.")
            else:
                logger.info(
                    "Distillation targets of %r: %s (%d images)", name, store.root, len(dicts)
                )
            out.extend(dict(d, **{SOURCE_KEY: k}) for d in dicts)
        return out

    def fill(self, dataset_dict: dict) -> None:
        """Set ``distill_boxes`` (M, 4) float32 and ``distill_embeddings`` (M, D) float32 of
        ``dataset_dict`` (in place; original image coordinates) and pop its store tag."""
        store = self.stores[dataset_dict.pop(SOURCE_KEY, 0)]
        image_id = dataset_dict["image_id"]
        if image_id not in store:
            if self.missing == "error":
                raise StoreError(
                    f"image {image_id!r} ({dataset_dict.get('file_name')}) is not in "
                    f"distillation store {store.root}"
                )
            dim = self.embed_dim or 0
            dataset_dict["distill_boxes"] = np.zeros((0, 4), np.float32)
            dataset_dict["distill_embeddings"] = np.zeros((0, dim), np.float32)
            return
        if self.teacher is None:
            record = store[image_id]
            boxes = record["boxes"][: self.max_boxes]
            embeddings = record["embeddings"][: self.max_boxes].astype(np.float32)
        else:
            boxes = proposals_for(store, image_id, self.max_boxes, dataset_dict["file_name"])
            emb = self.teacher(read_rgb(dataset_dict), torch.from_numpy(boxes))
            # float16 like the stored targets: online and offline give the same numbers.
            embeddings = emb.half().float().numpy()
        dataset_dict["distill_boxes"] = np.array(boxes, dtype=np.float32)
        dataset_dict["distill_embeddings"] = embeddings


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
    from ..text.encoder import clip_identity

    expected = {
        "clip": clip_identity(cfg.MODEL.VILD.CLIP_MODEL),
        "crops.scales": [float(s) for s in cfg.MODEL.VILD.DISTILL.CROP_SCALES],
        "crops.method": crop_settings((), 0)["method"],
    }
    if embed_dim is not None:
        expected["embed_dim"] = embed_dim
    store.check(expected, what)
