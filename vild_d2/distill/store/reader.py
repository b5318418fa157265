"""Reading a store: :class:`DistillStore` (lazy, memory-mapped, checksummed records)."""

import collections
import mmap
import os
import zlib
from pathlib import Path
from typing import Dict, List, Mapping

import numpy as np

from .format import (
    StoreError,
    field_specs,
    get_dotted,
    header_digest,
    normalise_value,
    read_header,
    read_index,
    record_nbytes,
)

__all__ = ["DistillStore", "proposals_for"]


class DistillStore:
    """
    Read access to a store: ``store[image_id]`` -> {field: ndarray (M, width) or (M,)}.

    Only the chunk indices are held in memory; records are read lazily through per-process
    memory maps (safe to fork into dataloader workers, picklable). At most ``max_open_maps``
    chunk files are mapped at a time (each map holds a file descriptor; LVIS has ~1600 chunks,
    more than the usual limit of 1024 open files), the least recently used is closed first.
    """

    max_open_maps = 64

    def __init__(self, root: str):
        self.root = Path(os.path.expanduser(root))
        self.header = read_header(self.root)
        self.digest = header_digest(self.header)
        self.specs = field_specs(self.header)
        self._files: List[Path] = []
        self._starts: List[int] = []
        # image id -> (file index, offset in file, M, crc32)
        self._where: Dict = {}
        # image id -> [size, sha256 prefix] of the image file it was made from
        self._made_from: Dict = {}
        self._chunks = set()
        for path in sorted(self.root.glob("chunk-*.vds")):
            index = read_index(path, self.digest, self.specs)
            k = len(self._files)
            self._files.append(path)
            self._chunks.add(index["chunk"])
            start = index["payload_start"]
            for (image_id, m, offset, crc), made_from in zip(index["records"], index["files"]):
                if image_id in self._where:
                    raise StoreError(f"{path}: image {image_id} is also in another chunk")
                self._where[image_id] = (k, start + offset, m, crc)
                self._made_from[image_id] = made_from
        self._maps: "collections.OrderedDict[int, mmap.mmap]" = collections.OrderedDict()
        self._pid = os.getpid()

    # --- contents ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id) -> bool:
        return image_id in self._where

    def image_ids(self) -> List:
        return list(self._where)

    def made_from(self, image_id) -> list:
        """``[size, sha256 prefix]`` of the image file ``image_id`` was computed from."""
        return self._made_from[image_id]

    @property
    def num_chunks(self) -> int:
        return -(-self.header["num_images"] // self.header["chunk_size"])

    def missing_chunks(self) -> List[int]:
        """Chunks not written yet (a shard still running or never run)."""
        return sorted(set(range(self.num_chunks)) - self._chunks)

    @property
    def is_complete(self) -> bool:
        return not self.missing_chunks()

    def __getitem__(self, image_id) -> Dict[str, np.ndarray]:
        if image_id not in self._where:
            raise KeyError(
                f"image {image_id!r} is not in store {self.root} ({len(self)} images"
                + (
                    f"; chunks {self.missing_chunks()[:10]} not written yet)"
                    if not self.is_complete
                    else ")"
                )
            )
        k, offset, m, crc = self._where[image_id]
        nbytes = record_nbytes(self.specs, m)
        raw = self._map(k)[offset : offset + nbytes]
        if len(raw) != nbytes:
            raise StoreError(f"truncated chunk {self._files[k]}: record of image {image_id}")
        if zlib.crc32(raw) != crc:
            raise StoreError(
                f"corrupted chunk {self._files[k]}: record of image {image_id!r} fails its "
                "checksum (re-create the chunk: delete it and re-run the precompute command)"
            )
        out, pos = {}, 0
        for name, dt, w in self.specs:
            n = m * max(w, 1) * dt.itemsize
            arr = np.frombuffer(raw, dtype=dt, count=m * max(w, 1), offset=pos)
            out[name] = arr.reshape(m, w) if w else arr
            pos += n
        return out

    def verify(self) -> int:
        """Check every record's checksum; returns the number of records checked."""
        for image_id in self._where:
            self[image_id]
        return len(self._where)

    def _map(self, k: int) -> mmap.mmap:
        if os.getpid() != self._pid:  # forked: maps are per process
            self._maps, self._pid = collections.OrderedDict(), os.getpid()
        if k in self._maps:
            self._maps.move_to_end(k)
            return self._maps[k]
        while len(self._maps) >= max(1, self.max_open_maps):
            # Safe: records are copied out of the map (slicing an mmap makes bytes).
            self._maps.popitem(last=False)[1].close()
        with open(self._files[k], "rb") as f:
            self._maps[k] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[k]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = collections.OrderedDict()
        return state

    # --- checks -----------------------------------------------------------------------------

    def check(self, expected: Mapping, what: str = "the config") -> None:
        """
        Raise :class:`StoreError` naming both values for every key of ``expected`` (dotted
        names allowed, e.g. "crops.scales") whose value differs from the header's.
        """
        problems = []
        for key, want in expected.items():
            have = get_dotted(self.header, key)
            if normalise_value(have) != normalise_value(want):
                problems.append(f"{key}: store has {have!r}, {what} asks for {want!r}")
        if problems:
            raise StoreError(f"store {self.root} does not match {what}: " + "; ".join(problems))


def proposals_for(store: DistillStore, image_id, max_boxes: int, file_name: str = "") -> np.ndarray:
    """The top ``max_boxes`` boxes (M, 4) float32 of an image in a proposals/targets store."""
    if image_id not in store:
        raise KeyError(
            f"image {image_id!r} ({file_name}) has no proposals in {store.root}"
            + (
                ""
                if store.is_complete
                else f" (store incomplete: chunks {store.missing_chunks()[:10]} missing)"
            )
        )
    return np.array(store[image_id]["boxes"][:max_boxes])
