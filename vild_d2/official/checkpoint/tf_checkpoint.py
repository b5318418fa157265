"""Read TensorFlow checkpoints (TensorBundle V2) with numpy only: no TensorFlow, no protobuf.

A checkpoint `<prefix>` is `<prefix>.index` plus `<prefix>.data-00000-of-0000N` shards.
The index is a LevelDB SSTable: data blocks of prefix-compressed (key, value) entries, an index
block pointing at them, and a 48-byte footer ending in a magic number. Each block is followed by
a 5-byte trailer (compression type, masked CRC32C). Keys are tensor names; the value of the empty
key is a `BundleHeaderProto` (num_shards, endianness), every other value a `BundleEntryProto`
(dtype, shape, shard_id, offset, size). A tensor's bytes are `size` raw bytes at `offset` in its
shard, little-endian (unless the header says otherwise), row-major.
"""

import os
import struct

import numpy as np

__all__ = ["CheckpointError", "list_tf_checkpoint", "read_tf_checkpoint"]

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5

# tensorflow/core/framework/types.proto DataType -> numpy dtype. bfloat16 (14) has no numpy
# dtype: it is widened to float32 on read.
_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    8: np.complex64,
    9: np.int64,
    10: np.bool_,
    14: "bfloat16",
    17: np.uint16,
    18: np.complex128,
    19: np.float16,
    22: np.uint32,
    23: np.uint64,
}
_DT_STRING = 7


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or uses an unsupported feature."""


def _varint(buf, pos, path):
    """Decodes a base-128 varint at `pos`; returns (value, new_pos)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError(f"{path}: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError(f"{path}: malformed varint")


def _proto_fields(buf, path):
    """Yields (field_number, wire_type, value) of a serialized protobuf message.

    Varints come as int, length-delimited fields as bytes, fixed32/64 as int.
    """
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, path)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, path)
        elif wire == 2:
            length, pos = _varint(buf, pos, path)
            value = bytes(buf[pos : pos + length])
            if len(value) != length:
                raise CheckpointError(f"{path}: truncated protobuf field {field}")
            pos += length
        elif wire == 1:
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 5:
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise CheckpointError(f"{path}: unsupported protobuf wire type {wire}")
        yield field, wire, value


def _parse_shape(buf, path):
    dims = []
    for field, _, value in _proto_fields(buf, path):
        if field == 2:  # Dim
            size = 0
            for f, _, v in _proto_fields(value, path):
                if f == 1:
                    size = v - (1 << 64) if v >= 1 << 63 else v  # int64
            dims.append(size)
        elif field == 3 and value:
            raise CheckpointError(f"{path}: tensor of unknown rank")
    return tuple(dims)


def _parse_entry(buf, path, key):
    entry = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0}
    for field, _, value in _proto_fields(buf, path):
        if field == 1:
            entry["dtype"] = value
        elif field == 2:
            entry["shape"] = _parse_shape(value, path)
        elif field == 3:
            entry["shard_id"] = value
        elif field == 4:
            entry["offset"] = value
        elif field == 5:
            entry["size"] = value
        elif field == 7:
            raise CheckpointError(f"{path}: {key!r} is a partitioned (sliced) variable")
    return entry


def _read_block(data, offset, size, path):
    """Returns a block's contents, checking its trailer's compression byte."""
    end = offset + size
    if end + _BLOCK_TRAILER_LEN > len(data):
        raise CheckpointError(f"{path}: truncated (block at {offset} runs past the end)")
    compression = data[end]
    if compression == 1:
        raise CheckpointError(f"{path}: snappy-compressed blocks are not supported")
    if compression != 0:
        raise CheckpointError(f"{path}: unknown block compression type {compression}")
    return data[offset:end]


def _block_entries(block, path):
    """Yields (key, value) of one block, undoing the keys' prefix compression."""
    if len(block) < 4:
        raise CheckpointError(f"{path}: corrupt block")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise CheckpointError(f"{path}: corrupt block restart array")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos, path)
        non_shared, pos = _varint(block, pos, path)
        value_len, pos = _varint(block, pos, path)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise CheckpointError(f"{path}: corrupt block entry")
        key = key[:shared] + bytes(block[pos : pos + non_shared])
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _index_path(prefix):
    prefix = os.fspath(prefix)
    return prefix if prefix.endswith(".index") else prefix + ".index"


def _read_index(prefix):
    """Parses `<prefix>.index`; returns (prefix, header dict, {name: entry dict})."""
    path = _index_path(prefix)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint index not found")
    with open(path, "rb") as f:
        data = memoryview(f.read())
    if len(data) < _FOOTER_LEN:
        raise CheckpointError(f"{path}: truncated (shorter than the 48-byte table footer)")
    footer = data[len(data) - _FOOTER_LEN :]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_LEN - 8)
    if magic != _TABLE_MAGIC:
        raise CheckpointError(f"{path}: bad magic number (not a TensorFlow checkpoint index)")
    _, pos = _varint(footer, 0, path)  # metaindex handle: unused by TensorBundle
    _, pos = _varint(footer, pos, path)
    index_offset, pos = _varint(footer, pos, path)
    index_size, pos = _varint(footer, pos, path)
    index_block = _read_block(data, index_offset, index_size, path)

    header = {"num_shards": 1, "endianness": 0}
    entries = {}
    for _, handle in _block_entries(index_block, path):
        offset, p = _varint(handle, 0, path)
        size, _ = _varint(handle, p, path)
        for key, value in _block_entries(_read_block(data, offset, size, path), path):
            if key == b"":
                for field, _, v in _proto_fields(value, path):
                    if field == 1:
                        header["num_shards"] = v
                    elif field == 2:
                        header["endianness"] = v
            else:
                name = key.decode("utf-8")
                entries[name] = _parse_entry(value, path, name)
    return path[: -len(".index")], header, entries


def _dtype_name(code):
    if code == _DT_STRING:
        return "string"
    dtype = _DTYPES.get(code)
    return dtype if isinstance(dtype, str) else (np.dtype(dtype).name if dtype else None)


def list_tf_checkpoint(prefix):
    """Names, dtypes and shapes of a checkpoint's tensors, without reading their data.

    Args:
        prefix: the checkpoint prefix (`.../model.ckpt`) or the path of its `.index` file.

    Returns:
        {name: (dtype name, shape tuple)} in the index's (sorted) order; dtype is a numpy dtype
        name, "bfloat16", "string", or "DT_<code>" for types this reader cannot decode.
    """
    _, _, entries = _read_index(prefix)
    return {
        name: (_dtype_name(e["dtype"]) or f"DT_{e['dtype']}", e["shape"])
        for name, e in entries.items()
    }


def _decode_strings(raw, count, path, name):
    """String tensors: `count` varint lengths, a 4-byte checksum, then the bytes."""
    pos, lengths = 0, []
    for _ in range(count):
        n, pos = _varint(raw, pos, path)
        lengths.append(n)
    pos += 4
    out = []
    for n in lengths:
        out.append(bytes(raw[pos : pos + n]))
        pos += n
    if pos > len(raw):
        raise CheckpointError(f"{path}: truncated string tensor {name!r}")
    return np.array(out, dtype=object)


def read_tf_checkpoint(prefix):
    """All tensors of a TensorFlow V2 checkpoint as numpy arrays.

    Args:
        prefix: the checkpoint prefix (`.../model.ckpt`) or the path of its `.index` file.

    Returns:
        {name: array} with the stored dtype and shape (bfloat16 widened to float32, strings as
        an object array of bytes).

    Raises:
        CheckpointError: naming the file, if the index or a data shard is missing or truncated,
            the index's magic number is wrong, or a feature is unsupported (snappy blocks,
            partitioned variables, unknown dtypes).
    """
    prefix, header, entries = _read_index(prefix)
    big_endian = header["endianness"] == 1
    num_shards = header["num_shards"]
    shards = {}
    out = {}
    try:
        for name, e in entries.items():
            if e["shard_id"] >= num_shards:
                raise CheckpointError(f"{prefix}.index: {name!r} names shard {e['shard_id']}")
            shard = f"{prefix}.data-{e['shard_id']:05d}-of-{num_shards:05d}"
            if shard not in shards:
                if not os.path.isfile(shard):
                    raise CheckpointError(f"{shard}: checkpoint data shard not found")
                shards[shard] = open(shard, "rb")  # noqa: SIM115 (closed in finally)
            f = shards[shard]
            f.seek(e["offset"])
            raw = f.read(e["size"])
            if len(raw) != e["size"]:
                raise CheckpointError(
                    f"{shard}: truncated ({name!r} needs bytes {e['offset']}..."
                    f"{e['offset'] + e['size']})"
                )
            out[name] = _decode(raw, e, big_endian, shard, name)
    finally:
        for f in shards.values():
            f.close()
    return out


def _decode(raw, entry, big_endian, path, name):
    code, shape = entry["dtype"], entry["shape"]
    count = int(np.prod(shape, dtype=np.int64))
    if code == _DT_STRING:
        return _decode_strings(raw, count, path, name).reshape(shape)
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise CheckpointError(f"{path}: {name!r} has unsupported dtype code {code}")
    if dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32)
        array = (bits << 16).view(np.float32)
    else:
        dt = np.dtype(dtype).newbyteorder(">" if big_endian else "<")
        if len(raw) != count * dt.itemsize:
            raise CheckpointError(
                f"{path}: {name!r} has {len(raw)} bytes, expected {count * dt.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dt).astype(np.dtype(dtype), copy=True)
    return array.reshape(shape)
