"""Which image files a store was made from: each chunk records, per image, ``[size in bytes,
first 16 hex digits of the file's sha256]``. The path is not part of it: a dataset moved to
another root (same bytes) is the same dataset; a re-encoded or edited picture is not."""

import logging
import os
import time
from typing import TYPE_CHECKING, Optional, Sequence

from ...fileio import file_sha256
from .format import StoreError

if TYPE_CHECKING:  # the reader uses nothing of this module; only the annotation needs it
    from .reader import DistillStore

__all__ = ["check_dataset", "file_identity", "not_made_from"]

logger = logging.getLogger(__name__)


def file_identity(file_name: str) -> list:
    """``[size, first 16 hex digits of sha256]`` of a file's bytes (what a chunk records)."""
    return [os.stat(file_name).st_size, file_sha256(file_name)[:16]]


def describe_identity(identity) -> str:
    return f"{identity[0]} bytes, sha256 {identity[1]}..."


def not_made_from(root, dataset, file_name, image_id, have, recorded) -> StoreError:
    return StoreError(
        f"store {root} was not made from dataset {dataset!r} as it is now: image {image_id!r} "
        f"is {file_name} ({describe_identity(have)}), the store was made from a file of "
        f"{describe_identity(recorded)} (another copy of the dataset, or a changed image). Use the "
        f"dataset the store was made from, or make the store again from this one (another "
        f"--output, or delete {root})"
    )


def check_dataset(
    store: "DistillStore",
    dataset_dicts: Sequence[dict],
    dataset: str = "",
    *,
    complete: bool = False,
    sample: Optional[int] = None,
) -> int:
    """
    Refuse a store made from other image files than ``dataset_dicts``' (another copy of the
    dataset with the same names and ids, changed pictures). Each image of the dicts that the
    store holds is compared, by its file's size and sha256 (not its path: a moved dataset is
    accepted), with the file the store recorded for it.

    Args:
        dataset: the dataset's name, for messages (default: the one in the store's header).
        complete: ``dataset_dicts`` is the whole dataset the store is of (precompute): the image
            counts must also agree. Training dicts, which may drop images, are not.
        sample: hash only this many images, spread over the dataset, and compare only the size
            of the others (a stat): for a large dataset on slow storage.

    Returns:
        The number of image files hashed and compared.

    Raises:
        StoreError: naming the store folder, the dataset and the first image that differs.
    """
    dataset = dataset or store.header.get("dataset", "")
    if complete and store.header["num_images"] != len(dataset_dicts):
        raise StoreError(
            f"store {store.root} was made from {store.header['num_images']} images of "
            f"{store.header.get('dataset')!r}; dataset {dataset!r} has {len(dataset_dicts)} "
            "images: another copy or version of the dataset. Use the dataset the store was "
            f"made from, or make the store again (another --output, or delete {store.root})"
        )
    held = [d for d in dataset_dicts if d["image_id"] in store]
    known = held
    hashed = set(range(len(known)))
    if sample is not None and sample < len(known):
        hashed = {round(i * (len(known) - 1) / max(sample - 1, 1)) for i in range(sample)}
    start = time.perf_counter()
    for i, d in enumerate(known):
        recorded = store.made_from(d["image_id"])
        if i in hashed or os.stat(d["file_name"]).st_size != recorded[0]:
            have = file_identity(d["file_name"])
            if have != recorded:
                raise not_made_from(
                    store.root, dataset, d["file_name"], d["image_id"], have, recorded
                )
    if known:
        logger.info(
            "Store %s: the %d image files of %r it holds checked (%d hashed) in %.1f s",
            store.root,
            len(known),
            dataset,
            len(hashed),
            time.perf_counter() - start,
        )
    return len(hashed)
