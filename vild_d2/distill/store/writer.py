"""Writing a store: :class:`StoreWriter` (resumable, sharded, atomic chunk files).

A chunk file is written whole, to a temporary name, fsync'ed and renamed, so a crash never
leaves a file that looks complete. Chunks depend only on the dataset order and K: the shard
``i`` of ``N`` writes the chunks ``c % N == i``, a re-run skips the chunks already there, and N
shards together make the very same files as one unsharded run; there is no merge step. A
resumed run reads each chunk it skips whole and checks every record (and the zero padding): a
damaged chunk is named and computed again.
"""

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from ...fileio import atomic_write
from .format import (
    FORMAT,
    HEADER_FILE,
    MAGIC,
    PREFIX,
    VERSION,
    StoreError,
    canonical,
    chunk_name,
    diff_keys,
    field_specs,
    get_dotted,
    header_digest,
    json_id,
    payload_start,
    read_header,
    read_index,
    verify_payload,
)
from .identity import file_identity, not_made_from

__all__ = ["StoreWriter"]

logger = logging.getLogger(__name__)


class StoreWriter:
    """
    Writes chunks of a store; creating the store writes its header, re-opening an existing
    store requires the very same header (same dataset, model, settings).
    """

    def __init__(self, root: str, header: Mapping):
        """
        Args:
            root: the store directory (created).
            header: must hold "kind", "num_images", "chunk_size" and "fields"
                ({name: [dtype, width]}); anything else (models, settings) is recorded too.
        """
        self.root = Path(os.path.expanduser(root))
        header = {"format": FORMAT, "version": VERSION, **header}
        header = json.loads(canonical(header))  # tuples -> lists, as read back
        for key in ("kind", "num_images", "chunk_size", "fields"):
            if key not in header:
                raise ValueError(f"store header needs {key!r}")
        if not isinstance(header["chunk_size"], int) or header["chunk_size"] < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {header['chunk_size']!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / HEADER_FILE
        # The first of several shards started together creates the header; every one (the
        # first included) then checks that the header on disk is its own.
        if not path.is_file():
            text = json.dumps(header, indent=1, sort_keys=True).encode("utf-8")
            atomic_write(path, [text], exclusive=True, hint=self._write_hint())
        existing = read_header(self.root)
        diff = diff_keys(existing, header)
        if diff:
            raise StoreError(
                f"{self.root} was made with other settings; refusing to mix them. "
                + "; ".join(
                    f"{k}: store has {get_dotted(existing, k)!r}, "
                    f"this run {get_dotted(header, k)!r}"
                    for k in diff
                )
                + ". Use another --output, or delete the store to start over."
            )
        self.header = header
        self.digest = header_digest(header)
        self.specs = field_specs(header)

    def _write_hint(self) -> str:
        return (
            f"if the disk is full, free space on the filesystem of {self.root}, then re-run the "
            "same command: the chunks already written are kept and the run resumes (or start "
            "over with another --output)"
        )

    def chunk_images(self, chunk: int, items: Sequence) -> Sequence:
        """The part of the dataset-ordered ``items`` that chunk ``chunk`` holds."""
        k = self.header["chunk_size"]
        return items[chunk * k : (chunk + 1) * k]

    def is_done(
        self,
        chunk: int,
        image_ids: Optional[Sequence] = None,
        file_names: Optional[Sequence[str]] = None,
    ) -> bool:
        """
        Whether a valid file of ``chunk`` exists: its index and every record check out (the
        whole file is read); a damaged one is reported and redone. With ``image_ids``, it must
        hold exactly those images, in that order (else it is redone).

        Raises:
            StoreError: ``file_names`` (the images' files, in order) are not the files the
                chunk was made from: another copy of the dataset, never mixed into one store.
        """
        path = self.root / chunk_name(chunk)
        if not path.is_file():
            return False
        try:
            index = read_index(path, self.digest, self.specs)
        except StoreError as e:
            logger.warning("Redoing chunk %d: %s", chunk, e)
            return False
        if index["chunk"] != chunk:
            return False
        if image_ids is not None:
            held = [r[0] for r in index["records"]]
            if held != [json_id(i) for i in image_ids]:
                logger.warning(
                    "Redoing chunk %d: %s holds other images than the dataset's (ids %s..., "
                    "expected %s...): the dataset changed since it was written",
                    chunk,
                    path,
                    held[:3],
                    [json_id(i) for i in image_ids][:3],
                )
                return False
        if file_names is not None:
            self._check_made_from(path, index, file_names)
        try:
            verify_payload(path, index, self.specs)
        except StoreError as e:
            logger.warning("Redoing chunk %d: %s", chunk, e)
            return False
        return True

    def _check_made_from(self, path: Path, index: dict, file_names: Sequence[str]) -> None:
        for record, recorded, file_name in zip(index["records"], index["files"], file_names):
            have = file_identity(file_name)
            if have != recorded:
                raise not_made_from(
                    self.root, self.header.get("dataset"), file_name, record[0], have, recorded
                )

    def write_chunk(
        self,
        chunk: int,
        records: Sequence[Tuple[object, Mapping[str, np.ndarray]]],
        file_names: Sequence[str],
    ):
        """
        Args:
            chunk: chunk id.
            records: (image_id, {field: array (M, width) or (M,)}) per image, in dataset order.
            file_names: the image file of each record, recorded by identity (size, sha256)
                so that the store can tell the dataset it was made from (required since
                format version 2).

        Raises:
            OSError: the write failed (a full disk: errno ENOSPC); the message names the file
                and what to do. Chunks written before are kept, a re-run resumes.
        """
        entries, blobs, offset = [], [], 0
        for image_id, fields in records:
            parts, m = [], None
            for name, dt, w in self.specs:
                arr = np.ascontiguousarray(np.asarray(fields[name]), dtype=dt)
                shape = (arr.shape[0], w) if w else (arr.shape[0],)
                m = arr.shape[0] if m is None else m
                if arr.shape != shape or arr.shape[0] != m:
                    raise ValueError(
                        f"image {image_id}: field {name!r} has shape {arr.shape}, expected "
                        + (f"({m}, {w})" if w else f"({m},)")
                    )
                parts.append(arr.tobytes())
            blob = b"".join(parts)
            entries.append([json_id(image_id), m, offset, zlib.crc32(blob)])
            blobs.append(blob)
            offset += len(blob)
        index = {
            "chunk": chunk,
            "header_digest": self.digest,
            "payload_bytes": offset,
            "records": entries,
        }
        if len(file_names) != len(entries):
            raise ValueError(f"{len(file_names)} file names for {len(entries)} records")
        index["files"] = [file_identity(f) for f in file_names]
        index = canonical(index)
        pad = payload_start(len(index)) - PREFIX.size - len(index)
        prefix = PREFIX.pack(MAGIC, len(index), zlib.crc32(index))
        atomic_write(
            self.root / chunk_name(chunk),
            [prefix, index, b"\0" * pad, *blobs],
            hint=self._write_hint(),
        )
