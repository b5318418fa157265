"""Stores refuse data they were not made from, resume verifies what it skips, write errors name
their file, files follow the umask.

Two tiny shapes worlds under one dataset name (as two copies of a dataset behind one
$DETECTRON2_DATASETS name): "a" (seed 0) and "b" (seed 1, other pictures, same image ids).
"""

import vild_d2  # noqa: F401  (compat bridges first)

import errno
import filecmp
import json
import logging
import os
import shutil
import struct

import pytest

from detectron2.data import DatasetCatalog

from vild_d2.data.datasets.shapes import WorldSpec, register_shapes_world
from vild_d2.distill import DistillStore, StoreError
from vild_d2.distill.store import StoreWriter
from vild_d2.fileio import atomic_write
from tiny_world import (  # tests/ helper
    M,
    TINY_SPEC,
    make_proposals,
    make_targets,
    make_world,
    random_rpn,
)

PREFIX = "hstore"
NAME = f"{PREFIX}_train_base"


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, tiny_clip_path):
    base = tmp_path_factory.mktemp("hardening")
    make_world(base / "b", prefix=PREFIX, spec=WorldSpec(**{**TINY_SPEC.__dict__, "seed": 1}))
    make_world(base / "a", prefix=PREFIX)  # registered last: NAME is world "a"
    rpn = random_rpn(
        tiny_clip_path, base / "cache", base / "rpn.pth", "MODEL.RPN.POST_NMS_TOPK_TEST", str(M)
    )
    make_proposals(rpn, NAME, base / "props")
    make_targets(tiny_clip_path, NAME, base / "props", base / "targets")
    return {"base": base, "rpn": rpn, "clip": tiny_clip_path}


def use(worlds, which):
    """Register NAME as the world ``which`` ("a" or "b"); returns its first image file."""
    register_shapes_world(str(worlds["base"] / which), prefix=PREFIX, folder="shapes")
    return DatasetCatalog.get(NAME)[0]["file_name"]


def same_store(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


class ListHandler(logging.Handler):
    """Records of one logger (a tool run in-process may stop vild_d2's propagation)."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.records, self.logger = [], logging.getLogger(name)

    def __enter__(self):
        self.logger.addHandler(self)
        self.level_before = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)

    def emit(self, record):
        self.records.append(record.getMessage())

    @property
    def text(self):
        return "\n".join(self.records)


# --- class 4: a store is refused for a dataset it was not made from -------------------------


def test_worlds_share_ids_not_pictures(worlds):
    use(worlds, "a")
    a_dicts = DatasetCatalog.get(NAME)
    use(worlds, "b")
    b_dicts = DatasetCatalog.get(NAME)
    assert [d["image_id"] for d in a_dicts] == [d["image_id"] for d in b_dicts]
    for da, db in zip(a_dicts, b_dicts):
        assert open(da["file_name"], "rb").read() != open(db["file_name"], "rb").read()


def test_clip_targets_of_another_worlds_proposals_are_refused(worlds, tmp_path):
    first_b = use(worlds, "b")
    props = worlds["base"] / "props"
    with pytest.raises(StoreError) as e:
        make_targets(worlds["clip"], NAME, props, tmp_path / "targets")
    # Both names: the store folder and the first image whose file differs (image 1's).
    assert str(props) in str(e.value) and first_b in str(e.value), str(e.value)
    assert not list((tmp_path / "targets").glob("chunk-*"))  # nothing computed


def test_resume_with_another_world_is_refused(worlds, tmp_path):
    use(worlds, "a")
    out = tmp_path / "props"
    shutil.copytree(worlds["base"] / "props", out)
    os.unlink(out / "chunk-000002.vds")  # an interrupted run: chunks 0, 1 done
    first_b = use(worlds, "b")
    with pytest.raises(StoreError) as e:
        make_proposals(worlds["rpn"], NAME, out)
    assert str(out) in str(e.value) and first_b in str(e.value), str(e.value)
    assert sorted(os.listdir(out)) == ["chunk-000000.vds", "chunk-000001.vds", "header.json"]


def test_training_check_refuses_another_world_accepts_a_moved_one(worlds, tmp_path):
    from vild_d2.distill.store import check_dataset

    targets = DistillStore(str(worlds["base"] / "targets"))
    first_b = use(worlds, "b")
    dicts = DatasetCatalog.get(NAME)
    with pytest.raises(StoreError) as e:
        check_dataset(targets, dicts[1:], NAME)  # training may drop images: a subset
    second_b = dicts[1]["file_name"]
    assert (
        str(targets.root) in str(e.value)
        and second_b in str(e.value)
        and first_b not in str(e.value)
    )
    # The same image count is compared when the dicts are the whole dataset (precompute).
    with pytest.raises(StoreError, match=r"6 images.* 4 images"):
        check_dataset(targets, dicts[:4], NAME, complete=True)
    # World "a" moved to another root (the same bytes): accepted.
    shutil.copytree(worlds["base"] / "a", tmp_path / "moved")
    register_shapes_world(str(tmp_path / "moved"), prefix=PREFIX, folder="shapes")
    moved = DatasetCatalog.get(NAME)
    assert moved[0]["file_name"].startswith(str(tmp_path / "moved"))
    assert check_dataset(targets, moved, NAME, complete=True) == 6
    assert check_dataset(targets, moved, NAME, sample=2) == 2
    use(worlds, "a")


def test_store_of_the_previous_format_is_refused_asking_to_rebuild(worlds, tmp_path):
    """A store written by the format before image identities (version 1) is never read: its
    header is refused, naming the store and asking to rebuild it, and a resumed run touches
    nothing."""
    use(worlds, "a")
    out = tmp_path / "props"
    shutil.copytree(worlds["base"] / "props", out)
    header = json.loads((out / "header.json").read_text())
    header["version"] = 1
    (out / "header.json").write_text(json.dumps(header))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(StoreError, match=r"format version 1.*Rebuild it: delete") as e:
        DistillStore(str(out))
    assert str(out) in str(e.value)
    with pytest.raises(StoreError, match=r"format version 1.*Rebuild it"):
        make_proposals(worlds["rpn"], NAME, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- class 5: resume verifies the chunks it skips --------------------------------------------


def test_flipped_byte_is_found_on_resume_and_only_its_chunk_redone(worlds, tmp_path):
    use(worlds, "a")
    out = tmp_path / "props"
    shutil.copytree(worlds["base"] / "props", out)
    path = out / "chunk-000001.vds"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # one bit of the last record's data
    path.write_bytes(bytes(raw))
    with ListHandler("vild_d2.distill") as log:
        stats = make_proposals(worlds["rpn"], NAME, out)
    assert (stats["done_before"], stats["computed"]) == (4, 2)
    assert "chunk-000001.vds" in log.text and "checksum" in log.text, log.text
    same_store(out, worlds["base"] / "props")  # byte for byte a fresh store


def test_flipped_padding_byte_is_found_on_resume(worlds, tmp_path):
    use(worlds, "a")
    out = tmp_path / "props"
    shutil.copytree(worlds["base"] / "props", out)
    path = out / "chunk-000002.vds"
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<I", raw[8:12])[0]
    start = -(-(16 + n) // 64) * 64
    assert start > 16 + n  # there is padding between the index and the records
    raw[16 + n] ^= 0x01
    path.write_bytes(bytes(raw))
    stats = make_proposals(worlds["rpn"], NAME, out)
    assert (stats["done_before"], stats["computed"]) == (4, 2)
    same_store(out, worlds["base"] / "props")


# --- class 7 (part): a full disk names the file and leaves a resumable store -----------------


def test_disk_full_names_the_file_and_the_store_resumes(worlds, tmp_path, monkeypatch):
    use(worlds, "a")
    out = tmp_path / "props"
    real_fsync = os.fsync

    def full_disk_on_chunk_1(fd):
        if ".chunk-000001.vds." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_on_chunk_1)
    with pytest.raises(OSError) as e:
        make_proposals(worlds["rpn"], NAME, out)
    message = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert str(out / "chunk-000001.vds") in message, message
    assert "free space" in message and "--output" in message and "re-run" in message, message
    # Chunk 0 is kept; no temporary file is left behind.
    assert sorted(os.listdir(out)) == ["chunk-000000.vds", "header.json"]
    monkeypatch.undo()
    stats = make_proposals(worlds["rpn"], NAME, out)
    assert (stats["done_before"], stats["computed"]) == (2, 4)
    same_store(out, worlds["base"] / "props")


# --- also noticed: file modes, --shard anywhere ----------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.json", [b"{}"])
        w = StoreWriter(
            tmp_path / "s",
            {"kind": "x", "num_images": 1, "chunk_size": 1, "fields": {"v": ["float32", 0]}},
        )
        (tmp_path / "1.jpg").write_bytes(b"image 1")
        w.write_chunk(0, [(1, {"v": [1.0]})], [str(tmp_path / "1.jpg")])
    finally:
        os.umask(before)
    for path in (
        tmp_path / "f.json",
        tmp_path / "s" / "header.json",
        tmp_path / "s" / "chunk-000000.vds",
    ):
        assert oct(os.stat(path).st_mode & 0o777) == oct(mode), path
