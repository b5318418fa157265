"""A compact, resumable, sharded on-disk store of per-image arrays (proposals, CLIP targets).

Split by job: :mod:`.format` (the files and their checks), :mod:`.reader`
(:class:`DistillStore`), :mod:`.writer` (:class:`StoreWriter`) and :mod:`.identity` (which
image files a store was made from).
"""

from .format import FORMAT, VERSION, StoreError, chunks_of_shard
from .identity import check_dataset, file_identity
from .reader import DistillStore, proposals_for
from .writer import StoreWriter

__all__ = [
    "FORMAT",
    "VERSION",
    "DistillStore",
    "StoreError",
    "StoreWriter",
    "check_dataset",
    "chunks_of_shard",
    "file_identity",
    "proposals_for",
]
