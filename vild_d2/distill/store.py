"""A compact, resumable, sharded on-disk store of per-image arrays (proposals, CLIP targets).

Layout of a store directory::

    header.json            what the store holds and how it was made (written once)
    chunk-000000.vds ...   chunk c = dataset images [c * K, (c + 1) * K), K = header chunk_size

A chunk file is written whole, to a temporary name, fsync'ed and renamed, so a crash never
leaves a file that looks complete. Chunks depend only on the dataset order and K: the shard
``i`` of ``N`` writes the chunks ``c % N == i``, a re-run skips the chunks already there, and N
shards together make the very same files as one unsharded run; there is no merge step.

Chunk file: ``MAGIC | u32 index length | u32 index crc32 | index (json) | pad | payload``.
The index names the store (header digest) and, per image, its id, box count, payload offset
and crc32; a record is each field's (M, width) array in header order, contiguous. Opening a
store reads only the indices (truncation is caught there by the file length); records are
read through a memory map on demand and checked against their crc32, so a dataloader worker
holds no copy of the data and a corrupted record is never returned. A resumed run reads each
chunk it skips whole and checks every record (and the zero padding): a damaged chunk is named
and computed again.

Dataset identity: the index also lists, per image, the image file it was made from as
``[size in bytes, first 16 hex digits of the file's sha256]`` ("files"). The path is not part
of it: a dataset moved to another root (same bytes) is the same dataset; a re-encoded or edited
picture is not. A store is refused (:func:`check_dataset`, and on resume) for image files other
than its own. Chunks written before "files" existed are accepted with a warning that their
identity cannot be verified.
"""

import collections
import functools
import hashlib
import json
import logging
import mmap
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..fileio import atomic_write

__all__ = [
    "DistillStore",
    "StoreWriter",
    "StoreError",
    "check_dataset",
    "chunks_of_shard",
    "file_identity",
    "proposals_for",
    "read_rgb",
]

logger = logging.getLogger(__name__)

FORMAT = "vild_d2.distill_store"
VERSION = 1
MAGIC = b"VILDCHK1"
_PREFIX = struct.Struct("<8sII")  # magic, index length, index crc32
_ALIGN = 64
HEADER_FILE = "header.json"


class StoreError(RuntimeError):
    """A store that cannot be used as asked: wrong header, truncated or corrupted chunk, or
    made from other image files than the dataset's."""


def file_identity(file_name: str) -> list:
    """``[size, first 16 hex digits of sha256]`` of a file's bytes (what a chunk records)."""
    st = os.stat(file_name)
    return [st.st_size, _sha256_16(str(file_name), st.st_size, st.st_mtime_ns, st.st_ino)]


@functools.lru_cache(maxsize=1 << 17)
def _sha256_16(file_name: str, size: int, mtime_ns: int, inode: int) -> str:
    # Cached by (path, size, mtime, inode): a run checks its source store and then records the
    # same files in its own chunks; a file changed on disk is hashed again.
    h = hashlib.sha256()
    with open(file_name, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _describe(identity) -> str:
    return f"{identity[0]} bytes, sha256 {identity[1]}..."


def _not_made_from(root, dataset, file_name, image_id, have, recorded) -> StoreError:
    return StoreError(
        f"store {root} was not made from dataset {dataset!r} as it is now: image {image_id!r} "
        f"is {file_name} ({_describe(have)}), the store was made from a file of "
        f"{_describe(recorded)} (another copy of the dataset, or a changed image). Use the "
        f"dataset the store was made from, or make the store again from this one (another "
        f"--output, or delete {root})"
    )


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}.vds"


def chunks_of_shard(num_images: int, chunk_size: int, shard: int, num_shards: int) -> List[int]:
    """Chunk ids written by shard ``shard`` of ``num_shards`` (chunk c goes to shard c % N)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    num_chunks = -(-num_images // chunk_size)
    return list(range(shard, num_chunks, num_shards))


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def header_digest(header: Mapping) -> str:
    return hashlib.sha256(_canonical(header)).hexdigest()[:32]


def _field_specs(header: Mapping) -> List[Tuple[str, np.dtype, int]]:
    """[(name, dtype, width)]; width 0 = one value per box (shape (M,))."""
    return [(name, np.dtype(dt), int(w)) for name, (dt, w) in header["fields"].items()]


def _record_nbytes(specs, m: int) -> int:
    return sum(m * max(w, 1) * dt.itemsize for _, dt, w in specs)


def _diff(a: Mapping, b: Mapping, prefix="") -> List[str]:
    """Keys (dotted) where two nested dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _get(d: Mapping, dotted: str):
    for k in dotted.split("."):
        d = d.get(k, "<absent>") if isinstance(d, Mapping) else "<absent>"
    return d


def _read_header(root: Path) -> dict:
    path = root / HEADER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a distillation store (no {HEADER_FILE}); make one with "
            "tools/precompute_proposals.py or tools/precompute_clip_embeddings.py"
        )
    try:
        header = json.loads(path.read_text())
    except ValueError as e:
        raise StoreError(f"corrupted store header {path}: {e}") from None
    got = header if isinstance(header, dict) else {}
    if got.get("format") != FORMAT or got.get("version") != VERSION:
        raise StoreError(
            f"{path}: format {got.get('format')!r} version {got.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return header


def _read_index(path: Path, digest: str, specs) -> dict:
    """The index of chunk file ``path``, checked against the store and the file's length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise StoreError(f"truncated chunk {path}: {size} bytes, shorter than its prefix")
        magic, index_len, index_crc = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise StoreError(f"{path} is not a store chunk (magic {magic!r})")
        if index_len > size - _PREFIX.size:  # (not read: a damaged length can be ~4 GB)
            raise StoreError(f"truncated chunk {path}: {size} bytes, its index alone needs more")
        raw = f.read(index_len)
    if len(raw) < index_len:
        raise StoreError(f"truncated chunk {path}: {size} bytes, its index alone needs more")
    if zlib.crc32(raw) != index_crc:
        raise StoreError(f"corrupted chunk {path}: index checksum mismatch")
    index = json.loads(raw)
    if index["header_digest"] != digest:
        raise StoreError(
            f"chunk {path} belongs to another store (header digest {index['header_digest']} "
            f"!= {digest}): the directory mixes runs with different settings"
        )
    start = _payload_start(index_len)
    expected = start + index["payload_bytes"]
    if size != expected:
        raise StoreError(
            f"{'truncated' if size < expected else 'corrupted'} chunk {path}: {size} bytes, "
            f"its index says {expected}"
        )
    for image_id, m, offset, _ in index["records"]:
        if offset + _record_nbytes(specs, m) > index["payload_bytes"]:
            raise StoreError(f"corrupted chunk {path}: record of image {image_id} out of range")
    if len(index.get("files", index["records"])) != len(index["records"]):
        raise StoreError(f"corrupted chunk {path}: image files and records do not pair up")
    index["index_end"] = _PREFIX.size + index_len
    index["payload_start"] = start
    return index


def _verify_payload(path: Path, index: dict, specs) -> None:
    """Read the chunk whole and check what its index cannot: every record against its crc32,
    records that tile the payload, zero padding (a resumed run keeps only a chunk that is
    byte for byte what was written)."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    start = index["payload_start"]
    if any(data[index["index_end"] : start]):
        raise StoreError(f"corrupted chunk {path}: non-zero padding after its index")
    pos = 0
    for image_id, m, offset, crc in index["records"]:
        n = _record_nbytes(specs, m)
        if offset != pos:
            raise StoreError(f"corrupted chunk {path}: record of image {image_id!r} misplaced")
        if zlib.crc32(data[start + offset : start + offset + n]) != crc:
            raise StoreError(
                f"corrupted chunk {path}: record of image {image_id!r} fails its checksum"
            )
        pos += n
    if pos != index["payload_bytes"]:
        raise StoreError(
            f"corrupted chunk {path}: records hold {pos} of its {index['payload_bytes']} bytes"
        )


def _payload_start(index_len: int) -> int:
    n = _PREFIX.size + index_len
    return -(-n // _ALIGN) * _ALIGN


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
        self.header = _read_header(self.root)
        self.digest = header_digest(self.header)
        self.specs = _field_specs(self.header)
        self._files: List[Path] = []
        self._starts: List[int] = []
        # image id -> (file index, offset in file, M, crc32)
        self._where: Dict = {}
        # image id -> [size, sha256 prefix] of the image file it was made from (None: a chunk
        # written before they were recorded)
        self._made_from: Dict = {}
        self._chunks = set()
        for path in sorted(self.root.glob("chunk-*.vds")):
            index = _read_index(path, self.digest, self.specs)
            k = len(self._files)
            self._files.append(path)
            self._chunks.add(index["chunk"])
            start = index["payload_start"]
            files = index.get("files") or [None] * len(index["records"])
            for (image_id, m, offset, crc), made_from in zip(index["records"], files):
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

    def made_from(self, image_id) -> Optional[list]:
        """``[size, sha256 prefix]`` of the image file ``image_id`` was computed from (None if
        its chunk predates the record)."""
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
        nbytes = _record_nbytes(self.specs, m)
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
            have = _get(self.header, key)
            if _normalise(have) != _normalise(want):
                problems.append(f"{key}: store has {have!r}, {what} asks for {want!r}")
        if problems:
            raise StoreError(f"store {self.root} does not match {what}: " + "; ".join(problems))


def _normalise(v):
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


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
        header = json.loads(_canonical(header))  # tuples -> lists, as read back
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
        existing = _read_header(self.root)
        diff = _diff(existing, header)
        if diff:
            raise StoreError(
                f"{self.root} was made with other settings; refusing to mix them. "
                + "; ".join(
                    f"{k}: store has {_get(existing, k)!r}, this run {_get(header, k)!r}"
                    for k in diff
                )
                + ". Use another --output, or delete the store to start over."
            )
        self.header = header
        self.digest = header_digest(header)
        self.specs = _field_specs(header)
        self._warned_unverified = False

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
            index = _read_index(path, self.digest, self.specs)
        except StoreError as e:
            logger.warning("Redoing chunk %d: %s", chunk, e)
            return False
        if index["chunk"] != chunk:
            return False
        if image_ids is not None:
            held = [r[0] for r in index["records"]]
            if held != [_json_id(i) for i in image_ids]:
                logger.warning(
                    "Redoing chunk %d: %s holds other images than the dataset's (ids %s..., "
                    "expected %s...): the dataset changed since it was written",
                    chunk,
                    path,
                    held[:3],
                    [_json_id(i) for i in image_ids][:3],
                )
                return False
        if file_names is not None:
            self._check_made_from(path, index, file_names)
        try:
            _verify_payload(path, index, self.specs)
        except StoreError as e:
            logger.warning("Redoing chunk %d: %s", chunk, e)
            return False
        return True

    def _check_made_from(self, path: Path, index: dict, file_names: Sequence[str]) -> None:
        if "files" not in index:
            if not self._warned_unverified:
                logger.warning(
                    "%s: chunks such as %s were written before stores recorded their image "
                    "files: cannot verify they were made from dataset %r as it is now; they are "
                    "kept. To rebuild, delete the store (or its chunks) and re-run.",
                    self.root, path.name, self.header.get("dataset"),
                )  # fmt: skip
                self._warned_unverified = True
            return
        for record, recorded, file_name in zip(index["records"], index["files"], file_names):
            have = file_identity(file_name)
            if have != recorded:
                raise _not_made_from(
                    self.root, self.header.get("dataset"), file_name, record[0], have, recorded
                )

    def write_chunk(
        self,
        chunk: int,
        records: Sequence[Tuple[object, Mapping[str, np.ndarray]]],
        file_names: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            chunk: chunk id.
            records: (image_id, {field: array (M, width) or (M,)}) per image, in dataset order.
            file_names: the image file of each record, recorded by identity (size, sha256)
                so that the store can tell the dataset it was made from.

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
            entries.append([_json_id(image_id), m, offset, zlib.crc32(blob)])
            blobs.append(blob)
            offset += len(blob)
        index = {
            "chunk": chunk,
            "header_digest": self.digest,
            "payload_bytes": offset,
            "records": entries,
        }
        if file_names is not None:
            if len(file_names) != len(entries):
                raise ValueError(f"{len(file_names)} file names for {len(entries)} records")
            index["files"] = [file_identity(f) for f in file_names]
        index = _canonical(index)
        pad = _payload_start(len(index)) - _PREFIX.size - len(index)
        prefix = _PREFIX.pack(MAGIC, len(index), zlib.crc32(index))
        atomic_write(
            self.root / chunk_name(chunk),
            [prefix, index, b"\0" * pad, *blobs],
            hint=self._write_hint(),
        )


def _json_id(image_id):
    """Image ids as json keeps them (numpy ints -> int)."""
    if isinstance(image_id, np.integer):
        return int(image_id)
    return image_id


def check_dataset(
    store: DistillStore,
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
        The number of image files hashed and compared (0 for a store that predates the
        record: accepted with a warning, nothing to compare with).

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
    known = [d for d in held if store.made_from(d["image_id"]) is not None]
    if len(known) < len(held):
        logger.warning(
            "%s: %d of %d images were written before stores recorded their image files: "
            "cannot verify they were made from dataset %r. To rebuild, delete the store and "
            "re-run its precompute command.",
            store.root, len(held) - len(known), len(held), dataset,
        )  # fmt: skip
    hashed = set(range(len(known)))
    if sample is not None and sample < len(known):
        hashed = {round(i * (len(known) - 1) / max(sample - 1, 1)) for i in range(sample)}
    start = time.perf_counter()
    for i, d in enumerate(known):
        recorded = store.made_from(d["image_id"])
        if i in hashed or os.stat(d["file_name"]).st_size != recorded[0]:
            have = file_identity(d["file_name"])
            if have != recorded:
                raise _not_made_from(
                    store.root, dataset, d["file_name"], d["image_id"], have, recorded
                )
    if known:
        logger.info(
            "Store %s: the %d image files of %r it holds checked (%d hashed) in %.1f s",
            store.root, len(known), dataset, len(hashed), time.perf_counter() - start,
        )  # fmt: skip
    return len(hashed)


# --- what the precompute jobs and the online targets read ----------------------------------


def read_rgb(dataset_dict: dict) -> torch.Tensor:
    """The original image of a dataset dict: (3, H, W) uint8 RGB, checked against its
    "height"/"width" (the coordinates proposals are given in)."""
    from detectron2.data.detection_utils import read_image

    file_name = dataset_dict["file_name"]
    try:
        image = read_image(file_name, format="RGB")
    except (OSError, ValueError) as e:  # missing, corrupt or truncated (PIL's message may omit it)
        raise OSError(f"{file_name}: cannot read image ({e})") from e
    h, w = image.shape[:2]
    expected = (dataset_dict.get("height", h), dataset_dict.get("width", w))
    if (h, w) != tuple(expected):
        raise ValueError(
            f"{file_name}: image is {h}x{w} (HxW) but the dataset says {expected[0]}x{expected[1]}"
        )
    # read_image can return a read-only view; torch needs a writable array.
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)


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
