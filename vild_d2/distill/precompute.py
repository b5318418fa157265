"""The two precompute jobs of ViLD-image (RPN proposals, CLIP targets), chunked and sharded.

Both jobs run over a dataset in its catalog order: the store's chunk c holds images
[c * K, (c + 1) * K); shard i of N computes its chunks (c % N == i) that are not on disk yet and
writes each one atomically when it is complete. Batches never span two chunks, so an image's
result does not depend on the sharding or on where a previous run stopped.
"""

import logging
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.images import read_rgb
from .loader import as_list, iterate_loader, make_loader
from .store import DistillStore, StoreWriter, check_dataset, chunks_of_shard, proposals_for
from .teacher import autocast_fp16

__all__ = [
    "log_store_summary",
    "proposals_header",
    "embeddings_header",
    "run_precompute",
    "iter_proposals",
    "iter_embeddings",
    "export_detectron2_proposals",
]

logger = logging.getLogger(__name__)

Record = Tuple[object, Dict[str, np.ndarray]]


def log_store_summary(log: logging.Logger, path: str, num_images: int) -> DistillStore:
    """Log how much of the store at ``path`` is done (and which chunks are missing)."""
    store = DistillStore(path)
    log.info(
        "%s: %d of %d images done%s",
        path,
        len(store),
        num_images,
        "" if store.is_complete else f"; chunks {store.missing_chunks()[:10]} missing",
    )
    return store


def proposals_header(
    dataset: str, num_images: int, *, chunk_size: int, max_proposals: int, model: dict
) -> dict:
    """Header of a proposals store: boxes (M, 4) float32 + objectness logits (M,) float32."""
    return {
        "kind": "proposals",
        "dataset": dataset,
        "num_images": num_images,
        "chunk_size": chunk_size,
        "fields": {"boxes": ["float32", 4], "objectness_logits": ["float32", 0]},
        "max_proposals": max_proposals,
        "model": model,
    }


def embeddings_header(
    dataset: str,
    num_images: int,
    *,
    chunk_size: int,
    max_proposals: int,
    teacher_settings: dict,
    proposals: DistillStore,
) -> dict:
    """Header of a CLIP-targets store: boxes (M, 4) float32 + embeddings (M, D) float16."""
    return {
        "kind": "embeddings",
        "dataset": dataset,
        "num_images": num_images,
        "chunk_size": chunk_size,
        "fields": {
            "boxes": ["float32", 4],
            "embeddings": ["float16", teacher_settings["embed_dim"]],
        },
        "max_proposals": max_proposals,
        **teacher_settings,  # clip, crops, embed_dim (+ the tool's batch_size, fp16)
        "proposals": proposals.digest,  # the store they come from
    }


def check_dataset_dicts(dataset_dicts: Sequence[dict], name: str) -> None:
    seen = set()
    for d in dataset_dicts:
        if "image_id" not in d:
            raise ValueError(f"dataset {name!r}: {d.get('file_name')} has no 'image_id'")
        if d["image_id"] in seen:
            raise ValueError(f"dataset {name!r}: image_id {d['image_id']!r} appears twice")
        seen.add(d["image_id"])


def run_precompute(
    writer: StoreWriter,
    dataset_dicts: Sequence[dict],
    compute: Callable[[List[List[dict]]], Iterator[Record]],
    *,
    shard: int = 0,
    num_shards: int = 1,
    desc: str = "images",
    on_image: Optional[Callable[[int], None]] = None,
    progress: bool = True,
) -> dict:
    """
    Compute and write the chunks of one shard that are not on disk yet. A chunk on disk is
    read whole and checked first (a damaged one is computed again), and must have been made
    from the dataset's image files (else :class:`StoreError`: another copy of the dataset).

    Args:
        writer: the store.
        dataset_dicts: the whole dataset, in catalog order (len = header num_images).
        compute: given the chunks to do (lists of dataset dicts), yields (image_id, fields)
            for their images, in order; it may batch within a chunk, never across chunks.
        on_image: called with the count of images computed so far in this run (a hook for
            tests and logging; raising from it stops the run like a crash would).

    Returns:
        dict with "done_before", "computed", "shard_images" and "seconds".
    """
    if len(dataset_dicts) != writer.header["num_images"]:
        raise ValueError(
            f"the dataset has {len(dataset_dicts)} images, the header of store {writer.root} "
            f"says {writer.header['num_images']}"
        )
    chunk_ids = chunks_of_shard(len(dataset_dicts), writer.header["chunk_size"], shard, num_shards)
    todo, done_before, shard_images = [], 0, 0
    for c in chunk_ids:
        dicts = writer.chunk_images(c, dataset_dicts)
        shard_images += len(dicts)
        ids, files = [d["image_id"] for d in dicts], [d["file_name"] for d in dicts]
        if writer.is_done(c, ids, files):
            done_before += len(dicts)
        else:
            todo.append((c, list(dicts)))
    logger.info(
        "%s shard %d/%d: %d chunks, %d images; %d images already done, %d to compute",
        writer.root,
        shard,
        num_shards,
        len(chunk_ids),
        shard_images,
        done_before,
        shard_images - done_before,
    )
    start = time.perf_counter()
    computed = 0
    bar = _progress(shard_images, done_before, desc, progress)
    try:
        results = compute([dicts for _, dicts in todo])
        for c, dicts in todo:
            records = []
            for d in dicts:
                image_id, fields = next(results)
                if image_id != d["image_id"]:
                    raise RuntimeError(
                        f"compute returned image {image_id}, expected {d['image_id']}"
                    )
                records.append((image_id, fields))
                computed += 1
                bar.update(1)
                if on_image is not None:
                    on_image(computed)
            writer.write_chunk(c, records, [d["file_name"] for d in dicts])
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    logger.info(
        "%s shard %d/%d: computed %d images in %.1f s (%.2f images/s)",
        writer.root,
        shard,
        num_shards,
        computed,
        seconds,
        computed / max(seconds, 1e-9),
    )
    return {
        "done_before": done_before,
        "computed": computed,
        "shard_images": shard_images,
        "seconds": seconds,
    }


def _progress(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the stack
        return _LogProgress(total, initial, desc, enabled)
    # tqdm shows images/s and the ETA of this shard.
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="img",
        disable=not enabled,
        smoothing=0.05,
        mininterval=1.0,
    )


class _LogProgress:
    """Progress through the logger, when tqdm is absent."""

    def __init__(self, total, initial, desc, enabled):
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self.start, self.first, self.last = time.perf_counter(), initial, 0.0

    def update(self, k):
        self.n += k
        now = time.perf_counter() - self.start
        if self.enabled and (now - self.last > 10 or self.n == self.total):
            rate = (self.n - self.first) / max(now, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            logger.info(
                "%s: %d/%d, %.2f img/s, ETA %.0f s", self.desc, self.n, self.total, rate, eta
            )
            self.last = now

    def close(self):
        pass


# --- the two compute functions ----------------------------------------------------------------


class _Mapped(Dataset):
    def __init__(self, items, fn):
        self.items, self.fn = items, fn

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.fn(self.items[i])


def _per_chunk_batches(chunks: List[List[dict]], batch_size: int) -> List[List[int]]:
    batches, pos = [], 0
    for dicts in chunks:
        for s in range(0, len(dicts), batch_size):
            batches.append(list(range(pos + s, pos + min(s + batch_size, len(dicts)))))
        pos += len(dicts)
    return batches


def iter_proposals(
    model,
    chunks: List[List[dict]],
    mapper: Callable[[dict], dict],
    *,
    max_proposals: int,
    batch_size: int = 1,
    num_workers: int = 0,
    fp16: bool = True,
) -> Iterator[Record]:
    """
    Class-agnostic RPN proposals (after the RPN's NMS) of every image, in original image
    coordinates, sorted by objectness.

    Args:
        model: a detectron2 meta-architecture with ``backbone`` and ``proposal_generator``
            (GeneralizedRCNN, ViLDRCNN, ProposalNetwork), in eval mode.
        mapper: detectron2 test-time mapper (reads and resizes the image).
        max_proposals: M, the top proposals kept per image.

    Yields:
        (image_id, {"boxes": (M', 4) float32 XYXY_ABS, "objectness_logits": (M',) float32}),
        M' <= M.
    """
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import ImageList

    items = [d for dicts in chunks for d in dicts]
    loader = make_loader(
        _Mapped(items, mapper),
        batch_sampler=_per_chunk_batches(chunks, batch_size),
        collate_fn=as_list,
        num_workers=num_workers,
    )
    device = model.pixel_mean.device
    for batch in iterate_loader(loader):  # a dead worker: WorkerError naming why, not a hang
        with torch.no_grad(), autocast_fp16(device, fp16):
            images = [(x["image"].to(device) - model.pixel_mean) / model.pixel_std for x in batch]
            images = ImageList.from_tensors(images, model.backbone.size_divisibility)
            features = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, features, None)
        for x, p in zip(batch, proposals):
            height = x.get("height", p.image_size[0])
            width = x.get("width", p.image_size[1])
            # Scales to the original size, clips, drops empty boxes; keeps the score order.
            p = detector_postprocess(p, height, width)[:max_proposals]
            yield (
                x["image_id"],
                {
                    "boxes": p.proposal_boxes.tensor.float().cpu().numpy(),
                    "objectness_logits": p.objectness_logits.float().cpu().numpy(),
                },
            )


class _ImageAndBoxes:
    def __init__(self, proposals: DistillStore, max_boxes: int):
        self.proposals, self.max_boxes = proposals, max_boxes

    def __call__(self, d):
        boxes = proposals_for(self.proposals, d["image_id"], self.max_boxes, d["file_name"])
        return d["image_id"], read_rgb(d), torch.from_numpy(boxes)


def iter_embeddings(
    teacher,
    chunks: List[List[dict]],
    proposals: DistillStore,
    *,
    max_boxes: int,
    num_workers: int = 0,
) -> Iterator[Record]:
    """
    CLIP targets of every image's top ``max_boxes`` proposals (see :class:`CLIPTeacher`).

    Yields:
        (image_id, {"boxes": (M, 4) float32, "embeddings": (M, D) float16})

    Raises:
        StoreError: ``proposals`` were made from other image files than the chunks' (checked
            before any image is computed).
    """
    items = [d for dicts in chunks for d in dicts]
    # Crops of another copy's boxes would be silently wrong targets: the proposals must have
    # been made from these very image files.
    check_dataset(proposals, items)
    loader = make_loader(
        _Mapped(items, _ImageAndBoxes(proposals, max_boxes)),
        batch_size=None,
        num_workers=num_workers,
    )
    for image_id, image, boxes in iterate_loader(loader):  # a dead worker: WorkerError
        emb = teacher(image, boxes)
        yield image_id, {"boxes": boxes.numpy(), "embeddings": emb.half().numpy()}


def export_detectron2_proposals(store: DistillStore, dataset_dicts: Sequence[dict], path: str):
    """
    Write a complete proposals store as detectron2's proposal file (what
    ``DATASETS.PROPOSAL_FILES_*`` read): a pickle of ids, boxes (XYXY_ABS), objectness_logits.
    """
    import pickle

    from detectron2.structures import BoxMode

    if not store.is_complete:
        raise ValueError(
            f"{store.root} is incomplete (chunks {store.missing_chunks()[:10]} missing): run "
            "every shard before exporting"
        )
    check_dataset(store, dataset_dicts, complete=True)
    ids, boxes, logits = [], [], []
    for d in dataset_dicts:
        record = store[d["image_id"]]
        ids.append(d["image_id"])
        boxes.append(np.array(record["boxes"]))
        logits.append(np.array(record["objectness_logits"]))
    with open(path, "wb") as f:
        pickle.dump(
            {
                "ids": ids,
                "boxes": boxes,
                "objectness_logits": logits,
                "bbox_mode": BoxMode.XYXY_ABS,
            },
            f,
        )
    logger.info("Wrote detectron2 proposal file %s (%d images)", path, len(ids))
