"""Write a TensorFlow V2 checkpoint (TensorBundle) without TensorFlow, for tests: a user's
``<PREFIX>.index`` + ``<PREFIX>.data-00000-of-00001`` as TF's Saver lays them out (one data
shard, an SSTable index of one uncompressed data block, CRC32C-masked block trailers).

The format, as tensorflow/core/util/tensor_bundle and LevelDB's table format define it: the
index's entries are sorted keys; the empty key holds a ``BundleHeaderProto`` (num_shards 1,
little-endian), every tensor name a ``BundleEntryProto`` (dtype, shape, shard, offset, size).
Checked against the project's reader (vild_d2.official.checkpoint.tf_checkpoint) and, once, TF's
own.
"""

import struct

import numpy as np

__all__ = ["write_tf_checkpoint"]

_DTYPES = {
    np.dtype(np.float32): 1,
    np.dtype(np.float64): 2,
    np.dtype(np.int32): 3,
    np.dtype(np.int64): 9,
}
_MAGIC = 0xDB4775248B80FB57


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, value) -> bytes:
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(value)
    return tag + _varint(len(value)) + value  # wire 2: length-delimited


def _block(entries) -> bytes:
    """An SSTable block of (key, value) pairs, every entry a restart point (no shared key
    prefixes), with its 5-byte trailer."""
    body, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(body))
        body += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
    restarts = restarts or [0]
    body += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(body) + b"\x00" + struct.pack("<I", _masked_crc32c(bytes(body) + b"\x00"))


def write_tf_checkpoint(prefix, tensors, checksums: bool = False) -> None:
    """Write ``{name: numpy array}`` (float32/64, int32/64) as the checkpoint ``prefix``.
    ``checksums``: store each tensor's CRC32C, which TF's reader verifies (vild_d2's does not);
    pure Python, about 1 s per MB: for small checkpoints only."""
    prefix = str(prefix)
    entries, offset = [], 0
    with open(f"{prefix}.data-00000-of-00001", "wb") as data:
        for name in sorted(tensors):
            array = np.array(tensors[name], order="C")  # (0-d stays 0-d)
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            data.write(raw)
            shape = b"".join(_field(2, 2, _field(1, 0, d)) for d in array.shape)
            entry = (
                _field(1, 0, _DTYPES[array.dtype])
                + _field(2, 2, shape)
                + _field(4, 0, offset)
                + _field(5, 0, len(raw))
            )
            if checksums:  # field 6, fixed32
                entry += _varint(6 << 3 | 5) + struct.pack("<I", _masked_crc32c(raw))
            entries.append((name.encode("utf-8"), entry))
            offset += len(raw)
    header = _field(1, 0, 1) + _field(3, 2, _field(1, 0, 1))  # 1 shard, little-endian, v1
    data_block = _block([(b"", header), *entries])
    meta_block = _block([])
    last_key = entries[-1][0] if entries else b""
    data_handle = _varint(0) + _varint(len(data_block) - 5)
    index_block = _block([(last_key, data_handle)])
    meta_offset = len(data_block)
    index_offset = meta_offset + len(meta_block)
    footer = (
        _varint(meta_offset)
        + _varint(len(meta_block) - 5)
        + _varint(index_offset)
        + _varint(len(index_block) - 5)
    )
    footer = footer.ljust(40, b"\x00") + struct.pack("<Q", _MAGIC)
    with open(f"{prefix}.index", "wb") as index:
        index.write(data_block + meta_block + index_block + footer)
