"""The store's on-disk format: header, chunk files and their indices (read and checked here;
the reader and the writer build on it).

Layout of a store directory::

    header.json            what the store holds and how it was made (written once)
    chunk-000000.vds ...   chunk c = dataset images [c * K, (c + 1) * K), K = header chunk_size

Chunk file: ``MAGIC | u32 index length | u32 index crc32 | index (json) | pad | payload``.
The index names the store (header digest) and, per image, its id, box count, payload offset
and crc32 ("records"), and the identity of the image file it was made from ("files",
:mod:`.identity`); a record is each field's (M, width) array in header order, contiguous.

Version 2 made "files" part of every chunk. A store of version 1 is refused with a message
asking to rebuild it (it is never misread).
"""

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import List, Mapping, Tuple

import numpy as np

__all__ = [
    "FORMAT",
    "HEADER_FILE",
    "MAGIC",
    "VERSION",
    "StoreError",
    "chunk_name",
    "chunks_of_shard",
    "header_digest",
    "read_header",
    "read_index",
    "verify_payload",
]

FORMAT = "vild_d2.distill_store"
VERSION = 2
MAGIC = b"VILDCHK2"
PREFIX = struct.Struct("<8sII")  # magic, index length, index crc32
ALIGN = 64
HEADER_FILE = "header.json"


class StoreError(RuntimeError):
    """A store that cannot be used as asked: wrong header, truncated or corrupted chunk, or
    made from other image files than the dataset's."""


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}.vds"


def chunks_of_shard(num_images: int, chunk_size: int, shard: int, num_shards: int) -> List[int]:
    """Chunk ids written by shard ``shard`` of ``num_shards`` (chunk c goes to shard c % N)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    num_chunks = -(-num_images // chunk_size)
    return list(range(shard, num_chunks, num_shards))


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def header_digest(header: Mapping) -> str:
    return hashlib.sha256(canonical(header)).hexdigest()[:32]


def field_specs(header: Mapping) -> List[Tuple[str, np.dtype, int]]:
    """[(name, dtype, width)]; width 0 = one value per box (shape (M,))."""
    return [(name, np.dtype(dt), int(w)) for name, (dt, w) in header["fields"].items()]


def record_nbytes(specs, m: int) -> int:
    return sum(m * max(w, 1) * dt.itemsize for _, dt, w in specs)


def diff_keys(a: Mapping, b: Mapping, prefix="") -> List[str]:
    """Keys (dotted) where two nested dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def get_dotted(d: Mapping, dotted: str):
    for k in dotted.split("."):
        d = d.get(k, "<absent>") if isinstance(d, Mapping) else "<absent>"
    return d


def read_header(root: Path) -> dict:
    """The header of the store at ``root``, checked to be of this format and version."""
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
    version = got.get("version")
    if got.get("format") == FORMAT and isinstance(version, int) and version < VERSION:
        raise StoreError(
            f"{root} is a store of format version {version}, made by an earlier vild_d2; this "
            f"one reads version {VERSION} (chunks record the image files they were made from). "
            f"Rebuild it: delete {root} and re-run the precompute command that made it"
        )
    if got.get("format") != FORMAT or version != VERSION:
        raise StoreError(
            f"{path}: format {got.get('format')!r} version {got.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return header


def read_index(path: Path, digest: str, specs) -> dict:
    """The index of chunk file ``path``, checked against the store and the file's length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(PREFIX.size)
        if len(prefix) < PREFIX.size:
            raise StoreError(f"truncated chunk {path}: {size} bytes, shorter than its prefix")
        magic, index_len, index_crc = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise StoreError(f"{path} is not a store chunk (magic {magic!r})")
        if index_len > size - PREFIX.size:  # (not read: a damaged length can be ~4 GB)
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
    start = payload_start(index_len)
    expected = start + index["payload_bytes"]
    if size != expected:
        raise StoreError(
            f"{'truncated' if size < expected else 'corrupted'} chunk {path}: {size} bytes, "
            f"its index says {expected}"
        )
    for image_id, m, offset, _ in index["records"]:
        if offset + record_nbytes(specs, m) > index["payload_bytes"]:
            raise StoreError(f"corrupted chunk {path}: record of image {image_id} out of range")
    if len(index.get("files", ())) != len(index["records"]):
        raise StoreError(f"corrupted chunk {path}: image files and records do not pair up")
    index["index_end"] = PREFIX.size + index_len
    index["payload_start"] = start
    return index


def verify_payload(path: Path, index: dict, specs) -> None:
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
        n = record_nbytes(specs, m)
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


def payload_start(index_len: int) -> int:
    n = PREFIX.size + index_len
    return -(-n // ALIGN) * ALIGN


def normalise_value(v):
    if isinstance(v, (list, tuple)):
        return [normalise_value(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def json_id(image_id):
    """Image ids as json keeps them (numpy ints -> int)."""
    if isinstance(image_id, np.integer):
        return int(image_id)
    return image_id
