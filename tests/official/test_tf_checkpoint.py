"""The numpy-only TensorFlow checkpoint reader against TensorFlow's own reader's values."""

import os
import shutil

import numpy as np
import pytest

from vild_d2.official.checkpoint.tf_checkpoint import (
    CheckpointError,
    list_tf_checkpoint,
    read_tf_checkpoint,
)

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
HERE = os.path.join(TESTS, "fixtures", "tf_checkpoint")
PREFIX = os.path.join(HERE, "model.ckpt")


@pytest.fixture
def copy(tmp_path):
    """A writable copy of the fixture checkpoint; returns its prefix."""
    for name in os.listdir(HERE):
        if name.startswith("model.ckpt"):
            shutil.copy(os.path.join(HERE, name), tmp_path / name)
    return str(tmp_path / "model.ckpt")


def test_matches_tensorflow_reader():
    expected = np.load(os.path.join(HERE, "expected.npz"))
    got = read_tf_checkpoint(PREFIX)
    assert sorted(got) == sorted(expected.files)
    assert len(got) == 209
    for name in expected.files:
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].shape == expected[name].shape, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_list_and_index_path():
    listed = list_tf_checkpoint(PREFIX + ".index")
    assert listed["layer/a/bias"] == ("float16", (5,))
    assert listed["layer/b/kernel_bf16"] == ("bfloat16", (2, 2))
    assert listed["layer/b/scale"] == ("float64", ())
    assert listed["empty"] == ("float32", (0, 3))
    assert listed["flags"] == ("bool", (3, 2))
    assert listed["counts/int64"] == ("int64", (4,))
    # Both shards are read (variables alternate between the two devices that saved them).
    got = read_tf_checkpoint(PREFIX + ".index")
    assert got["counts/int64"][3] == -(2**62)
    np.testing.assert_array_equal(got["many/variable_199"], [199, 200, 201])


def test_missing_index(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.index: checkpoint index not found"):
        read_tf_checkpoint(str(tmp_path / "nothing"))


def test_missing_shard(copy):
    os.remove(copy + ".data-00001-of-00002")
    with pytest.raises(CheckpointError, match=r"data-00001-of-00002: .*not found"):
        read_tf_checkpoint(copy)


def test_truncated_shard(copy):
    path = copy + ".data-00000-of-00002"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"data-00000-of-00002: truncated"):
        read_tf_checkpoint(copy)


def test_truncated_index(copy):
    path = copy + ".index"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: (bad magic|truncated)"):
        list_tf_checkpoint(copy)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.index"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match=r"x\.index: bad magic"):
        read_tf_checkpoint(str(path))


def test_snappy_block_refused(copy):
    from vild_d2.official.checkpoint.tf_checkpoint import _varint

    path = copy + ".index"
    data = bytearray(open(path, "rb").read())
    footer = data[-48:]
    _, pos = _varint(footer, 0, path)
    _, pos = _varint(footer, pos, path)
    offset, pos = _varint(footer, pos, path)
    size, _ = _varint(footer, pos, path)
    data[offset + size] = 1  # the index block's trailer: compression type snappy
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: snappy"):
        list_tf_checkpoint(copy)


def _varint_bytes(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _block(pairs, restart_interval=4):
    """A LevelDB table block: prefix-compressed entries, restart array, count."""
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(pairs):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += _varint_bytes(shared) + _varint_bytes(len(key) - shared)
        out += _varint_bytes(len(value)) + key[shared:] + value
        last = key
    for r in restarts:
        out += r.to_bytes(4, "little")
    return bytes(out + len(restarts).to_bytes(4, "little"))


def test_index_with_many_blocks(copy):
    # TF writes small indexes as one data block; rebuild the fixture's index as 11 blocks of
    # 20 entries (restart every 4) to exercise the index block and restarts.
    from vild_d2.official.checkpoint.tf_checkpoint import _block_entries, _read_block, _varint

    path = copy + ".index"
    data = memoryview(open(path, "rb").read())
    footer = data[-48:]
    _, pos = _varint(footer, 0, path)
    _, pos = _varint(footer, pos, path)
    offset, pos = _varint(footer, pos, path)
    size, _ = _varint(footer, pos, path)
    pairs = []
    for _, handle in _block_entries(_read_block(data, offset, size, path), path):
        o, p = _varint(handle, 0, path)
        s, _ = _varint(handle, p, path)
        pairs += [
            (bytes(k), bytes(v)) for k, v in _block_entries(_read_block(data, o, s, path), path)
        ]
    out, index = bytearray(), []
    for start in range(0, len(pairs), 20):
        chunk = pairs[start : start + 20]
        block = _block(chunk)
        index.append((chunk[-1][0], _varint_bytes(len(out)) + _varint_bytes(len(block))))
        out += block + b"\0\0\0\0\0"
    meta = len(out)
    out += _block([]) + b"\0\0\0\0\0"
    index_offset, index_block = len(out), _block(index, restart_interval=1)
    out += index_block + b"\0\0\0\0\0"
    handles = _varint_bytes(meta) + _varint_bytes(8) + _varint_bytes(index_offset)
    handles += _varint_bytes(len(index_block))
    out += handles + b"\0" * (40 - len(handles)) + (0xDB4775248B80FB57).to_bytes(8, "little")
    with open(path, "wb") as f:
        f.write(out)
    assert len(index) == 11
    expected = np.load(os.path.join(HERE, "expected.npz"))
    got = read_tf_checkpoint(copy)
    assert sorted(got) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
