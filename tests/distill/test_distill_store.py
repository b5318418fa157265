"""The distillation store: round trip, size, lazy reads, header checks, truncation/corruption."""

import vild_d2  # noqa: F401  (compat bridges first)

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from vild_d2.distill.store import DistillStore, StoreError, StoreWriter, chunks_of_shard
from vild_d2.fileio import atomic_write


def header(num_images=5, chunk_size=2, dim=8, clip="ViT-B/32", scales=(1.0, 1.5)):
    return {
        "kind": "embeddings",
        "dataset": "unit",
        "num_images": num_images,
        "chunk_size": chunk_size,
        "fields": {"boxes": ["float32", 4], "embeddings": ["float16", dim]},
        "clip": clip,
        "crops": {"scales": list(scales), "size": 224},
        "embed_dim": dim,
    }


def records(ids, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, image_id in enumerate(ids):
        m = i + 1  # different M per image, one with M = 0 below
        if image_id == "empty":
            m = 0
        out.append(
            (
                image_id,
                {
                    "boxes": rng.random((m, 4)).astype(np.float32) * 100,
                    "embeddings": rng.standard_normal((m, dim)).astype(np.float16),
                },
            )
        )
    return out


def image_files(root, recs):
    """A small file per record, standing in for the images a store records by identity."""
    folder = Path(root).parent / f"{Path(root).name}-images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{image_id}.jpg" for image_id, _ in recs]
    for path, (image_id, _) in zip(paths, recs):
        path.write_bytes(f"image {image_id}".encode())
    return [str(p) for p in paths]


def write_all(root, recs, hdr):
    w = StoreWriter(root, hdr)
    k = hdr["chunk_size"]
    for c in range(-(-len(recs) // k)):
        part = recs[c * k : (c + 1) * k]
        w.write_chunk(c, part, image_files(root, part))
    return w


def test_round_trip(tmp_path):
    ids = [11, 12, "empty", 14, 15]
    recs = records(ids)
    write_all(tmp_path / "s", recs, header())
    store = DistillStore(str(tmp_path / "s"))
    assert len(store) == 5 and store.is_complete and store.missing_chunks() == []
    assert sorted(os.listdir(tmp_path / "s")) == [
        "chunk-000000.vds",
        "chunk-000001.vds",
        "chunk-000002.vds",
        "header.json",
    ]
    for image_id, fields in recs:
        got = store[image_id]
        assert got["boxes"].dtype == np.float32 and got["embeddings"].dtype == np.float16
        assert np.array_equal(got["boxes"], fields["boxes"])
        assert np.array_equal(got["embeddings"], fields["embeddings"])
    assert store["empty"]["boxes"].shape == (0, 4) and store["empty"]["embeddings"].shape == (0, 8)
    assert 99 not in store
    with pytest.raises(KeyError, match="image 99 is not in store"):
        store[99]
    assert store.verify() == 5


def test_size_per_image_at_m300_d512(tmp_path):
    rng = np.random.default_rng(0)
    recs = [
        (
            i,
            {
                "boxes": rng.random((300, 4)).astype(np.float32),
                "embeddings": rng.standard_normal((300, 512)).astype(np.float16),
            },
        )
        for i in range(8)
    ]
    write_all(tmp_path / "s", recs, header(num_images=8, chunk_size=4, dim=512))
    total = sum(os.path.getsize(p) for p in (tmp_path / "s").glob("chunk-*"))
    # 300 * (4 * 4 + 512 * 2) = 312000 bytes of data; the index adds a few dozen per image.
    assert 312000 <= total / 8 <= 320000, total / 8


def test_store_is_lazy_and_small_to_pickle(tmp_path):
    rng = np.random.default_rng(0)
    recs = [
        (
            i,
            {
                "boxes": rng.random((300, 4)).astype(np.float32),
                "embeddings": rng.standard_normal((300, 64)).astype(np.float16),
            },
        )
        for i in range(40)
    ]
    write_all(tmp_path / "s", recs, header(num_images=40, chunk_size=16, dim=64))
    store = DistillStore(str(tmp_path / "s"))
    data_bytes = 40 * 300 * (16 + 128)
    store[3]  # opens a memory map
    blob = pickle.dumps(store)  # what a spawned dataloader worker receives
    assert len(blob) < data_bytes / 50, len(blob)
    again = pickle.loads(blob)
    assert np.array_equal(again[39]["embeddings"], recs[39][1]["embeddings"])


def test_shards_partition_the_chunks():
    # 10 images, chunks of 3 -> chunks 0..3; 3 shards.
    parts = [chunks_of_shard(10, 3, i, 3) for i in range(3)]
    assert parts == [[0, 3], [1], [2]]
    with pytest.raises(ValueError, match="shard 3"):
        chunks_of_shard(10, 3, 3, 3)


def test_incomplete_store(tmp_path):
    w = StoreWriter(tmp_path / "s", header())
    recs = records([12, 13])
    w.write_chunk(1, recs, image_files(tmp_path / "s", recs))
    store = DistillStore(str(tmp_path / "s"))
    assert not store.is_complete and store.missing_chunks() == [0, 2]
    with pytest.raises(KeyError, match=r"chunks \[0, 2\] not written"):
        store[11]


def test_header_mismatch_names_both(tmp_path):
    StoreWriter(tmp_path / "s", header())
    with pytest.raises(StoreError, match=r"clip: store has 'ViT-B/32', this run 'RN50'"):
        StoreWriter(tmp_path / "s", header(clip="RN50"))
    with pytest.raises(
        StoreError, match=r"crops\.scales: store has \[1\.0, 1\.5\], this run \[1\.0, 2\.0\]"
    ):
        StoreWriter(tmp_path / "s", header(scales=(1.0, 2.0)))
    StoreWriter(tmp_path / "s", header())  # the same settings reopen fine

    write_all(tmp_path / "t", records([1, 2, 3, 4, 5]), header())
    store = DistillStore(str(tmp_path / "t"))
    store.check({"clip": "ViT-B/32", "crops.scales": [1, 1.5], "embed_dim": 8})
    with pytest.raises(
        StoreError,
        match=r"embed_dim: store has 8, the config asks for 768.*"
        r"clip: store has 'ViT-B/32', the config asks for 'ViT-L/14'",
    ):
        store.check({"embed_dim": 768, "clip": "ViT-L/14"})


def test_chunk_from_another_store_is_refused(tmp_path):
    write_all(tmp_path / "a", records([1, 2, 3, 4, 5]), header())
    write_all(tmp_path / "b", records([1, 2, 3, 4, 5]), header(clip="RN50"))
    os.replace(tmp_path / "b" / "chunk-000001.vds", tmp_path / "a" / "chunk-000001.vds")
    with pytest.raises(StoreError, match=r"chunk-000001\.vds belongs to another store"):
        DistillStore(str(tmp_path / "a"))


def test_truncated_chunk_is_named(tmp_path):
    write_all(tmp_path / "s", records([1, 2, 3, 4, 5]), header())
    path = tmp_path / "s" / "chunk-000001.vds"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(
        StoreError,
        match=rf"truncated chunk .*chunk-000001\.vds: {size - 10} "
        rf"bytes, its index says {size}",
    ):
        DistillStore(str(tmp_path / "s"))
    with open(path, "r+b") as f:
        f.truncate(12)
    with pytest.raises(StoreError, match=r"truncated chunk .*chunk-000001\.vds"):
        DistillStore(str(tmp_path / "s"))
    # A writer resuming into this store redoes the chunk instead of trusting it.
    w = StoreWriter(tmp_path / "s", header())
    assert w.is_done(0) and not w.is_done(1)


def test_corrupted_record_is_named_not_read(tmp_path):
    recs = records([1, 2, 3, 4, 5])
    write_all(tmp_path / "s", recs, header())
    path = tmp_path / "s" / "chunk-000001.vds"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last record (image 4), same length
    path.write_bytes(bytes(raw))
    store = DistillStore(str(tmp_path / "s"))  # lengths still agree
    assert np.array_equal(store[3]["boxes"], recs[2][1]["boxes"])  # the other record is fine
    with pytest.raises(StoreError, match=r"corrupted chunk .*chunk-000001\.vds: record of image 4"):
        store[4]
    with pytest.raises(StoreError, match="corrupted"):
        store.verify()
    # A damaged index is caught when the store is opened.
    raw[20] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"corrupted chunk .*chunk-000001\.vds: index checksum"):
        DistillStore(str(tmp_path / "s"))


def test_interrupted_write_leaves_nothing(tmp_path):
    root = tmp_path / "s"
    root.mkdir()

    def parts():
        yield b"x" * 100
        raise KeyboardInterrupt  # a crash in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(root / "chunk-000000.vds", parts())
    assert os.listdir(root) == []


def test_bad_record_shape(tmp_path):
    w = StoreWriter(tmp_path / "s", header())
    bad = [(1, {"boxes": np.zeros((2, 4)), "embeddings": np.zeros((3, 8))})]
    with pytest.raises(
        ValueError, match=r"image 1: field 'embeddings' has shape \(3, 8\), " r"expected \(2, 8\)"
    ):
        w.write_chunk(0, bad, image_files(tmp_path / "s", bad))
    assert not (tmp_path / "s" / "chunk-000000.vds").exists()


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a distillation store"):
        DistillStore(str(tmp_path))


def test_open_maps_are_bounded(tmp_path):
    # Each memory map holds a file descriptor: a store of more chunks than the open-file limit
    # (LVIS: ~1600 chunks of 64 vs the usual 1024) must still be readable from end to end.
    recs = records(list(range(10)))
    write_all(tmp_path / "s", recs, header(num_images=10, chunk_size=1))
    store = DistillStore(str(tmp_path / "s"))
    store.max_open_maps = 3
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for image_id, fields in recs:
            assert np.array_equal(store[image_id]["embeddings"], fields["embeddings"])
            assert len(store._maps) <= 3
    assert len(os.listdir("/proc/self/fd")) - fds_before <= 3
    assert store.verify() == 10


def _make_writer(root, hdr, barrier, queue):
    barrier.wait()
    try:
        StoreWriter(root, hdr)
        queue.put("ok")
    except BaseException as e:  # reported to the parent
        queue.put(f"{type(e).__name__}: {e}")


def test_shards_starting_together_share_one_header(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    # A large header widens the window in which the writers overlap.
    hdr = dict(header(), note="x" * 200_000)
    results = []
    for trial in range(4):
        root = str(tmp_path / f"s{trial}")
        n = 6
        barrier, queue = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(target=_make_writer, args=(root, hdr, barrier, queue)) for _ in range(n)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        results += [queue.get(timeout=5) for _ in range(n)]
        assert sorted(os.listdir(root)) == ["header.json"]  # no temporary file left
        assert DistillStore(root).header["note"] == hdr["note"]
    assert results == ["ok"] * len(results), [r for r in results if r != "ok"][:3]


def test_first_header_wins_and_others_are_checked(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    path = root / "header.json"
    path.write_text("{}")
    assert not atomic_write(path, [b"other"], exclusive=True)
    assert path.read_text() == "{}" and os.listdir(root) == ["header.json"]
    # A writer that lost the race to a shard with other settings refuses, naming both.
    StoreWriter(tmp_path / "t", header())
    with pytest.raises(StoreError, match="clip: store has 'ViT-B/32', this run 'RN50'"):
        StoreWriter(tmp_path / "t", header(clip="RN50"))


def test_bad_chunk_size_and_corrupted_header_are_named(tmp_path):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        StoreWriter(tmp_path / "a", header(chunk_size=0))
    StoreWriter(tmp_path / "s", header())
    (tmp_path / "s" / "header.json").write_text('{"format": ')
    with pytest.raises(StoreError, match=r"corrupted store header .*s/header\.json"):
        DistillStore(str(tmp_path / "s"))


def test_damaged_index_length_is_named(tmp_path):
    write_all(tmp_path / "s", records([1, 2, 3, 4, 5]), header())
    path = tmp_path / "s" / "chunk-000001.vds"
    raw = bytearray(path.read_bytes())
    raw[8:12] = (0xFFFFFFF0).to_bytes(4, "little")  # the index length field of the prefix
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"truncated chunk .*chunk-000001\.vds"):
        DistillStore(str(tmp_path / "s"))


def test_resume_redoes_a_chunk_of_other_images(tmp_path):
    # Same header (dataset name, image count) but the dataset's order changed: a chunk on disk
    # that holds other images than the dataset's is not trusted.
    w = StoreWriter(tmp_path / "s", header())
    recs = records([1, 2])
    w.write_chunk(0, recs, image_files(tmp_path / "s", recs))
    assert w.is_done(0) and w.is_done(0, [1, 2]) and w.is_done(0, [np.int64(1), 2])
    assert not w.is_done(0, [2, 1]) and not w.is_done(0, [1, 3])
