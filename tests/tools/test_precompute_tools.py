"""The precompute tools and the training-time join, end to end on a tiny shapes world.

Both tools run once as commands; kill-and-resume and sharding run the same jobs in-process
(a crash is an exception raised after k images) and compare the stores byte for byte. Their
flags may follow the config's KEY VALUE overrides.
"""

import vild_d2  # noqa: F401  (compat bridges first)

import filecmp
import importlib.util
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from vild_d2.data import ViLDDatasetMapper
from vild_d2.engine import get_training_dicts
from vild_d2.distill import DistillStore, StoreError
from vild_d2.distill.precompute import iter_proposals
from vild_d2.data.images import read_rgb
from vild_d2.engine import Trainer
from tiny_world import (  # tests/ helper
    M,
    TINY_OPTS,
    TINY_SPEC,
    make_proposals,
    make_targets,
    make_world,
    random_rpn,
    save_random_clip,
    tiny_config,
)

NUM_TRAIN = TINY_SPEC.num_train
SIZE = TINY_SPEC.image_size
PREFIX = "dtest_shapes"


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_path):
    base = tmp_path_factory.mktemp("distill")
    names = make_world(base / "datasets", prefix=PREFIX)
    # As tools/precompute_proposals.py: the RPN's post-NMS output is exactly the top M.
    rpn = random_rpn(
        tiny_clip_path, base / "cache", base / "rpn.pth", "MODEL.RPN.POST_NMS_TOPK_TEST", str(M)
    )
    return {"base": base, "clip": tiny_clip_path, "rpn": rpn, "dataset": names["train"]}


def proposal_cfg(world, *opts):
    return tiny_config(
        "configs/Shapes/rpn.yaml",
        world["clip"],
        world["base"] / "cache",
        "MODEL.WEIGHTS",
        world["rpn"].MODEL.WEIGHTS,
        *opts,
    )


def proposals_of(world, out, **kwargs):
    return make_proposals(world["rpn"], world["dataset"], out, **kwargs)


def targets_of(world, proposals, out, **kwargs):
    return make_targets(world["clip"], world["dataset"], proposals, out, **kwargs)


@pytest.fixture(scope="module")
def stores(world):
    base = world["base"]
    proposals_of(world, base / "proposals")
    targets_of(world, base / "proposals", base / "targets")
    return base / "proposals", base / "targets"


def same_store(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


# --- the two commands ---------------------------------------------------------------------


@pytest.mark.slow
def test_tools_end_to_end(world, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(world["base"] / "datasets"), OMP_NUM_THREADS="2")
    props, targets, pkl = tmp_path / "props", tmp_path / "targets", tmp_path / "props.pkl"

    def run(*args):
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    log = run(
        "tools/precompute_proposals.py",
        "--config-file",
        "configs/Shapes/rpn.yaml",
        "--dataset",
        "shapes_train_base",  # the world at $DETECTRON2_DATASETS/shapes, registered on import
        "--output",
        str(props),
        "--num-proposals",
        str(M),
        "--chunk-size",
        "4",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--export-detectron2",
        str(pkl),
        *TINY_OPTS,
        "MODEL.WEIGHTS",
        world["rpn"].MODEL.WEIGHTS,
    )
    assert "img/s" in log and "6 of 6 images done" in log, log[-2000:]
    log = run(
        "tools/precompute_clip_embeddings.py",
        "--proposals",
        str(props),
        "--dataset",
        "shapes_train_base",
        "--clip",
        world["clip"],
        "--output",
        str(targets),
        "--chunk-size",
        "4",
        "--num-workers",
        "1",
        "--device",
        "cpu",
    )
    assert "img/s" in log and "6 of 6 images done" in log, log[-2000:]

    p, t = DistillStore(str(props)), DistillStore(str(targets))
    assert p.is_complete and t.is_complete and len(p) == len(t) == NUM_TRAIN
    assert t.header["embed_dim"] == 32 and t.header["crops"]["scales"] == [1.0, 1.5]
    assert p.header["model"]["fp16"] is False  # no autocast on the CPU
    # Another CLIP batch size changes the targets' last bits: recorded, so a resume with
    # another one is refused (StoreWriter's header check).
    assert t.header["fp16"] is False and t.header["batch_size"] == 0
    # detectron2's proposal-file format, in dataset order.
    with open(pkl, "rb") as f:
        exported = pickle.load(f)
    ids = [d["image_id"] for d in DatasetCatalog.get(world["dataset"])]
    assert exported["ids"] == ids
    for i, image_id in enumerate(ids):
        assert np.array_equal(exported["boxes"][i], p[image_id]["boxes"])
        assert np.array_equal(t[image_id]["boxes"], p[image_id]["boxes"])
        assert t[image_id]["embeddings"].shape == (len(p[image_id]["boxes"]), 32)


def test_proposals_are_top_m_in_original_coordinates(world, stores):
    store = DistillStore(str(stores[0]))
    cfg = proposal_cfg(world, "MODEL.RPN.POST_NMS_TOPK_TEST", "1000")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    d = DatasetCatalog.get(world["dataset"])[0]
    x = DatasetMapper(cfg, is_train=False)(d)
    h, w = x["image"].shape[1:]  # the test-time resized image (64 x 64 -> 64 x 64 here)
    with torch.no_grad():
        out = model([{"image": x["image"], "height": h, "width": w}])[0]["proposals"]
    # By hand: scale to the original size, clip, keep boxes of positive size, top M.
    boxes = out.proposal_boxes.tensor.numpy() * np.tile([d["width"] / w, d["height"] / h], 2)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, d["width"])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, d["height"])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    got = store[d["image_id"]]
    assert len(got["boxes"]) == M
    np.testing.assert_allclose(got["boxes"], boxes[keep][:M], atol=1e-4)
    logits = got["objectness_logits"]
    assert (np.diff(logits) <= 0).all()  # sorted by objectness
    np.testing.assert_allclose(logits, out.objectness_logits.numpy()[keep][:M], atol=1e-5)


def test_proposals_of_a_resized_image_are_in_original_coordinates(world):
    # The tiny world's test-time resize is the identity (64 x 64): test a real one, 1.5x.
    cfg = proposal_cfg(
        world,
        "INPUT.MIN_SIZE_TEST",
        "96",
        "INPUT.MAX_SIZE_TEST",
        "200",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "1000",
    )
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    d = DatasetCatalog.get(world["dataset"])[0]
    x = DatasetMapper(cfg, is_train=False)(d)
    h, w = x["image"].shape[1:]
    assert (h, w) == (96, 96) and (d["height"], d["width"]) == (64, 64)
    with torch.no_grad():
        out = model([{"image": x["image"], "height": h, "width": w}])[0]["proposals"]
    boxes = out.proposal_boxes.tensor.numpy() / 1.5
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, d["width"])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, d["height"])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    ((image_id, got),) = iter_proposals(
        model, [[d]], DatasetMapper(cfg, is_train=False), max_proposals=M
    )
    assert image_id == d["image_id"] and len(got["boxes"]) == M
    np.testing.assert_allclose(got["boxes"], boxes[keep][:M], atol=1e-4)
    assert got["boxes"][:, 2].max() <= d["width"] and got["boxes"][:, 3].max() <= d["height"]


# --- resume, shards ---------------------------------------------------------------------------


def test_kill_and_resume_equals_uninterrupted(world, stores, tmp_path):
    out = tmp_path / "targets"

    def crash_after(k):
        def hook(n):
            if n == k:
                raise Crash(f"simulated crash after {k} images")

        return hook

    with pytest.raises(Crash):
        targets_of(world, stores[0], out, on_image=crash_after(3))
    # Chunk 0 (images 0-1) was written; chunk 1 was half done: nothing of it is on disk.
    assert sorted(os.listdir(out)) == ["chunk-000000.vds", "header.json"]
    stats = targets_of(world, stores[0], out)
    assert (stats["done_before"], stats["computed"]) == (2, 4)
    same_store(out, stores[1])
    stats = targets_of(world, stores[0], out)  # nothing left to do
    assert stats["computed"] == 0

    # The same for the proposals job, crashing in its first batch's chunk.
    with pytest.raises(Crash):
        proposals_of(world, tmp_path / "props", on_image=crash_after(1))
    assert os.listdir(tmp_path / "props") == ["header.json"]
    proposals_of(world, tmp_path / "props")
    same_store(tmp_path / "props", stores[0])


def test_shards_equal_unsharded(world, stores, tmp_path):
    out = tmp_path / "targets"
    targets_of(world, stores[0], out, shard=1, num_shards=2)
    partial = DistillStore(str(out))
    assert partial.missing_chunks() == [0, 2] and len(partial) == 2
    targets_of(world, stores[0], out, shard=0, num_shards=2)
    same_store(out, stores[1])
    for i in range(3):
        proposals_of(world, tmp_path / "props", shard=i, num_shards=3)
    same_store(tmp_path / "props", stores[0])


def test_rerun_with_other_settings_is_refused(world, stores):
    with pytest.raises(
        StoreError, match=r"crops\.scales: store has \[1\.0, 1\.5\], this run " r"\[1\.0, 2\.0\]"
    ):
        targets_of(world, stores[0], stores[1], scales=(1.0, 2.0))


# --- training ---------------------------------------------------------------------------------


def train_cfg(world, store, **distill):
    opts = [x for k, v in distill.items() for x in (f"MODEL.VILD.DISTILL.{k}", v)]
    cfg = tiny_config(
        "configs/Shapes/vild.yaml",
        world["clip"],
        world["base"] / "cache",
        "DATASETS.TRAIN",
        f"('{world['dataset']}',)",
        "DATASETS.TEST",
        "()",
        "MODEL.VILD.DISTILL.STORES",
        f"('{store}',)",
        *opts,
    )
    cfg.defrost()
    return cfg


def test_training_step_reads_targets_from_store(world, stores):
    cfg = train_cfg(world, stores[1])
    store = DistillStore(str(stores[1]))
    batch = next(iter(Trainer.build_train_loader(cfg)))
    for x in batch:
        rec = store[x["image_id"]]
        distill = x["distill"]
        # The store's M boxes, all inside the image.
        assert len(distill) == M
        assert torch.equal(
            distill.embeddings, torch.from_numpy(rec["embeddings"].astype(np.float32))
        )
        # Same transform as the image: resize by s, maybe a horizontal flip.
        h, w = x["image"].shape[1:]
        s = w / x["width"]
        assert abs(h / x["height"] - s) < 0.02
        b = rec["boxes"] * s
        flipped = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
        got = distill.boxes.tensor.numpy()
        assert np.allclose(got, b, atol=0.05) or np.allclose(got, flipped, atol=0.05)
    model = Trainer.build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(batch)
    assert torch.isfinite(losses["loss_distill"]) and losses["loss_distill"] > 0
    sum(losses.values()).backward()


def test_missing_images_error_or_skip(world, stores, tmp_path, caplog):
    partial = tmp_path / "partial"
    targets_of(world, stores[0], partial, shard=0, num_shards=2)  # chunks 0 and 2
    # Training drops images without a base annotation (FILTER_EMPTY_ANNOTATIONS).
    total = sum(1 for d in DatasetCatalog.get(world["dataset"]) if d["annotations"])
    with pytest.raises(
        StoreError,
        match=rf"2 of {total} images of training dataset "
        rf"'{PREFIX}_train_base' are not in store .*MISSING skip",
    ):
        Trainer.build_train_loader(train_cfg(world, partial))
    cfg = train_cfg(world, partial, MISSING="skip")
    with caplog.at_level(logging.WARNING):
        Trainer.build_train_loader(cfg)
    assert f"2 of {total} images" in caplog.text and "without distillation targets" in caplog.text
    mapper = ViLDDatasetMapper(cfg, is_train=True)
    dicts = get_training_dicts(cfg)
    absent = [d for d in dicts if d["image_id"] not in DistillStore(str(partial))]
    out = mapper(absent[0])
    assert len(out["distill"]) == 0 and tuple(out["distill"].embeddings.shape) == (0, 32)


def test_store_made_with_other_clip_or_crops_is_refused(world, stores, tmp_path):
    other = save_random_clip(str(tmp_path / "other_clip.pt"), seed=1)
    cfg = train_cfg(world, stores[1])
    cfg.MODEL.VILD.CLIP_MODEL = other
    with pytest.raises(
        StoreError,
        match=r"clip: store has 'sha256:\w{16}', the config .*asks for 'sha256:\w{16}'.*"
        r"MODEL.VILD.CLIP_MODEL is .*other_clip\.pt",
    ):
        get_training_dicts(cfg)
    cfg = train_cfg(world, stores[1], CROP_SCALES="(1.0, 2.0)")
    with pytest.raises(
        StoreError, match=r"crops\.scales: store has \[1\.0, 1\.5\].*\[1\.0, 2\.0\]"
    ):
        get_training_dicts(cfg)
    cfg = train_cfg(world, stores[0])  # a proposals store where targets are expected
    with pytest.raises(StoreError, match="'proposals' store.*ONLINE"):
        get_training_dicts(cfg)


def test_online_targets_equal_offline(world, stores):
    offline = get_training_dicts(train_cfg(world, stores[1]))
    online = get_training_dicts(train_cfg(world, stores[0], ONLINE="True"))
    for a, b in zip(offline[:2], online[:2]):
        assert a["image_id"] == b["image_id"]
        boxes_a, boxes_b = a["distill_boxes"].load(), b["distill_boxes"].load()
        emb_a, emb_b = a["distill_embeddings"].load(), b["distill_embeddings"].load()
        assert np.array_equal(boxes_a, boxes_b)
        assert np.array_equal(emb_a, emb_b)
        assert emb_a.shape == (M, 32) and emb_a.dtype == np.float32


def test_dicts_hold_lazy_references_not_targets(world, stores):
    """A dataset dict carries a few bytes per image (what the loader pickles to its workers),
    not the (M, D) targets; they are read when the mapper asks for them."""
    dicts = get_training_dicts(train_cfg(world, stores[1]))
    store = DistillStore(str(stores[1]))
    for d in dicts:
        assert len(pickle.dumps(d["distill_embeddings"])) < 400
        rec = store[d["image_id"]]
        assert np.array_equal(d["distill_embeddings"].load(), rec["embeddings"][:M])
        assert np.array_equal(d["distill_boxes"].load(), rec["boxes"][:M])


def test_corrupt_image_is_named(tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 6), (10, 20, 30)).save(good)
    assert tuple(read_rgb({"file_name": str(good), "height": 6, "width": 8}).shape) == (3, 6, 8)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])  # header only: PIL fails without the path
    with pytest.raises(OSError, match=r"truncated\.png: cannot read image"):
        read_rgb({"file_name": str(truncated), "height": 6, "width": 8})
    with pytest.raises(
        ValueError, match=r"good\.png: image is 6x8 \(HxW\) but the dataset says 7x8"
    ):
        read_rgb({"file_name": str(good), "height": 7, "width": 8})


@pytest.mark.slow
@pytest.mark.parametrize("limit_kb", [1, 100])
def test_worker_under_a_file_size_limit_does_not_hang(world, tmp_path, limit_kb):
    """`ulimit -f` (a full disk or quota, as a worker sees it) with --num-workers 1: once the
    main process waited forever for an item its worker could not send (tensors were shared
    through files in /dev/shm). Now the run ends within seconds: done, or the write that
    failed named."""
    import resource
    import time

    env = dict(os.environ, DETECTRON2_DATASETS=str(world["base"] / "datasets"), OMP_NUM_THREADS="1")
    props = tmp_path / "props"  # of the world as the tools see it (shapes_train_base)
    proposals = [
        sys.executable,
        "tools/precompute_proposals.py",
        "--config-file",
        "configs/Shapes/rpn.yaml",
        "--dataset",
        "shapes_train_base",
        "--output",
        str(props),
        "--num-proposals",
        str(M),
        "--num-workers",
        "0",
        *TINY_OPTS,
        "MODEL.WEIGHTS",
        world["rpn"].MODEL.WEIGHTS,
    ]
    made = subprocess.run(proposals, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    cmd = [
        sys.executable,
        "tools/precompute_clip_embeddings.py",
        "--proposals",
        str(props),
        "--dataset",
        "shapes_train_base",
        "--clip",
        world["clip"],
        "--output",
        str(tmp_path / "targets"),
        "--chunk-size",
        "4",
        "--num-workers",
        "1",
        "--device",
        "cpu",
    ]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, resource.RLIM_INFINITY))

    start = time.monotonic()
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, preexec_fn=limit, timeout=300
    )
    took = time.monotonic() - start
    log = proc.stdout + proc.stderr
    if limit_kb == 1:  # a chunk is more than 1 KB: the main process's write fails, named
        assert proc.returncode != 0 and "File too large" in log and "chunk-000000" in log, log
    else:  # chunks fit: the workers' items no longer touch the file-size limit
        assert proc.returncode == 0 and "6 of 6 images done" in log, log[-3000:]
    assert "unable to resize file" not in log
    assert took < 120, took  # seconds, with the tool's start-up (imports, CLIP) on a busy machine


# --- flags after the config's overrides ----------------------------------------------------------
def _tool(name):
    spec = importlib.util.spec_from_file_location(name, f"tools/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shard_flags_after_config_opts(world, tmp_path, monkeypatch):
    tool = _tool("precompute_proposals")
    # (SEED -1: a value that starts with a dash)
    opts = [*TINY_OPTS, "MODEL.WEIGHTS", world["rpn"].MODEL.WEIGHTS, "SEED", "-1"]
    flags = ["--config-file", "configs/Shapes/rpn.yaml", "--dataset", world["dataset"]]
    args = tool.parse_args([*flags, "--output", "x", *opts, "--shard", "1", "--num-shards", "2"])
    assert (args.shard, args.num_shards, args.output, args.opts) == (1, 2, "x", opts)
    args = tool.parse_args([*flags, "--shard=1", *opts, "--output", "y", "--num-shards", "2"])
    assert (args.shard, args.num_shards, args.output, args.opts) == (1, 2, "y", opts)
    with pytest.raises(SystemExit):  # a misspelt flag is not taken for a config key
        tool.parse_args([*flags, "--output", "x", *opts, "--shrad", "1"])
    clip_tool = _tool("precompute_clip_embeddings")
    args = clip_tool.parse_args(
        [
            "--proposals",
            "p",
            "--dataset",
            world["dataset"],
            "--scales",
            "1",
            "2",
            "--clip",
            "c",
            "--output",
            "o",
            "--shard",
            "1",
            "--num-shards",
            "2",
        ]
    )
    assert (args.shard, args.num_shards, args.scales) == (1, 2, [1.0, 2.0])

    # The tool itself, in-process (its loggers left as they are), shard 1 of 2.
    monkeypatch.setattr(tool, "setup_logger", lambda name=None, **kw: logging.getLogger(name))
    out = tmp_path / "props"
    tool.main(
        [
            *flags,
            "--output",
            str(out),
            "--num-proposals",
            str(M),
            "--chunk-size",
            "2",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--no-fp16",
            *opts,
            "--shard",
            "1",
            "--num-shards",
            "2",
        ]
    )
    assert sorted(os.listdir(out)) == ["chunk-000001.vds", "header.json"]
