"""The precompute tools and the training-time join, end to end on the toy world.

Both tools run once as commands; kill-and-resume and sharding run the same jobs in-process
(a crash is an exception raised after k images) and compare the stores byte for byte.
"""

import vild_d2  # noqa: F401  (compat bridges first)

import filecmp
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from vild_d2 import add_vild_config
from vild_d2.data import ViLDDatasetMapper
from vild_d2.data.toy import compute_toy_distillation, generate_toy_world, register_toy_world
from vild_d2.distill import CLIPTeacher, DistillStore, StoreError, StoreWriter
from vild_d2.distill.precompute import (
    embeddings_header,
    iter_embeddings,
    iter_proposals,
    proposals_header,
    read_rgb,
    run_precompute,
)
from vild_d2.engine import Trainer
from vild_d2.text import load_clip, save_random_clip

M = 40  # proposals per image
CHUNK = 2
NUM_TRAIN = 6
DATASET = "dtest_toy_train"


class Crash(Exception):
    pass


def proposal_cfg(weights=""):
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file("configs/Toy/vild.yaml")
    # Any meta-architecture with an RPN: ProposalNetwork needs no CLIP.
    cfg.MODEL.META_ARCHITECTURE = "ProposalNetwork"
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = M
    cfg.MODEL.WEIGHTS = weights
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_path):
    base = tmp_path_factory.mktemp("distill")
    root = base / "datasets" / "vild_toy"
    generate_toy_world(root, num_train=NUM_TRAIN, num_val=2)
    compute_toy_distillation(root, load_clip(tiny_clip_path)[0])  # the toy's own targets
    register_toy_world(str(root), prefix="dtest_toy")
    torch.manual_seed(0)
    weights = str(base / "rpn.pth")
    torch.save({"model": build_model(proposal_cfg()).state_dict()}, weights)
    return {"base": base, "root": root, "weights": weights, "clip": tiny_clip_path}


def make_proposals(world, out, **kwargs):
    cfg = proposal_cfg(world["weights"])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(world["weights"])
    model.eval()
    dicts = DatasetCatalog.get(DATASET)
    header = proposals_header(
        DATASET, len(dicts), chunk_size=CHUNK, max_proposals=M, model={"weights": world["weights"]}
    )
    writer = StoreWriter(out, header)
    return run_precompute(
        writer,
        dicts,
        lambda chunks: iter_proposals(
            model, chunks, DatasetMapper(cfg, is_train=False), max_proposals=M, batch_size=2
        ),
        progress=False,
        **kwargs,
    )


def make_targets(world, proposals, out, scales=(1.0, 1.5), **kwargs):
    proposals = DistillStore(str(proposals))
    teacher = CLIPTeacher(world["clip"], scales=scales)
    dicts = DatasetCatalog.get(DATASET)
    header = embeddings_header(
        DATASET,
        len(dicts),
        chunk_size=CHUNK,
        max_proposals=M,
        teacher_settings=teacher.settings(),
        proposals=proposals,
    )
    writer = StoreWriter(out, header)
    return run_precompute(
        writer,
        dicts,
        lambda chunks: iter_embeddings(teacher, chunks, proposals, max_boxes=M),
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def stores(world):
    base = world["base"]
    make_proposals(world, base / "proposals")
    make_targets(world, base / "proposals", base / "targets")
    return base / "proposals", base / "targets"


def same_store(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


# --- the two commands ---------------------------------------------------------------------


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
        "configs/Toy/vild.yaml",
        "--dataset",
        "vild_toy_train",
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
        "MODEL.META_ARCHITECTURE",
        "ProposalNetwork",
        "MODEL.WEIGHTS",
        world["weights"],
    )
    assert "img/s" in log and "6 of 6 images done" in log, log[-2000:]
    log = run(
        "tools/precompute_clip_embeddings.py",
        "--proposals",
        str(props),
        "--dataset",
        "vild_toy_train",
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
    ids = [d["image_id"] for d in DatasetCatalog.get(DATASET)]
    assert exported["ids"] == ids
    for i, image_id in enumerate(ids):
        assert np.array_equal(exported["boxes"][i], p[image_id]["boxes"])
        assert np.array_equal(t[image_id]["boxes"], p[image_id]["boxes"])
        assert t[image_id]["embeddings"].shape == (len(p[image_id]["boxes"]), 32)


def test_proposals_are_top_m_in_original_coordinates(world, stores):
    store = DistillStore(str(stores[0]))
    cfg = proposal_cfg(world["weights"])
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    model = build_model(cfg)
    DetectionCheckpointer(model).load(world["weights"])
    model.eval()
    d = DatasetCatalog.get(DATASET)[0]
    x = DatasetMapper(cfg, is_train=False)(d)
    h, w = x["image"].shape[1:]  # the test-time resized image (64 x 80 -> 64 x 80 here)
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
    # The toy's test-time resize is the identity (64 x 80): test a real one, 1.5x.
    cfg = proposal_cfg(world["weights"])
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    model = build_model(cfg)
    DetectionCheckpointer(model).load(world["weights"])
    model.eval()
    d = DatasetCatalog.get(DATASET)[0]
    x = DatasetMapper(cfg, is_train=False)(d)
    h, w = x["image"].shape[1:]
    assert (h, w) == (96, 120) and (d["height"], d["width"]) == (64, 80)
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
        make_targets(world, stores[0], out, on_image=crash_after(3))
    # Chunk 0 (images 0-1) was written; chunk 1 was half done: nothing of it is on disk.
    assert sorted(os.listdir(out)) == ["chunk-000000.vds", "header.json"]
    stats = make_targets(world, stores[0], out)
    assert (stats["done_before"], stats["computed"]) == (2, 4)
    same_store(out, stores[1])
    stats = make_targets(world, stores[0], out)  # nothing left to do
    assert stats["computed"] == 0

    # The same for the proposals job, crashing in its first batch's chunk.
    with pytest.raises(Crash):
        make_proposals(world, tmp_path / "props", on_image=crash_after(1))
    assert os.listdir(tmp_path / "props") == ["header.json"]
    make_proposals(world, tmp_path / "props")
    same_store(tmp_path / "props", stores[0])


def test_shards_equal_unsharded(world, stores, tmp_path):
    out = tmp_path / "targets"
    make_targets(world, stores[0], out, shard=1, num_shards=2)
    partial = DistillStore(str(out))
    assert partial.missing_chunks() == [0, 2] and len(partial) == 2
    make_targets(world, stores[0], out, shard=0, num_shards=2)
    same_store(out, stores[1])
    for i in range(3):
        make_proposals(world, tmp_path / "props", shard=i, num_shards=3)
    same_store(tmp_path / "props", stores[0])


def test_rerun_with_other_settings_is_refused(world, stores):
    with pytest.raises(
        StoreError, match=r"crops\.scales: store has \[1\.0, 1\.5\], this run " r"\[1\.0, 2\.0\]"
    ):
        make_targets(world, stores[0], stores[1], scales=(1.0, 2.0))


# --- training ---------------------------------------------------------------------------------


def train_cfg(world, store, **distill):
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file("configs/Toy/vild.yaml")
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.MODEL.VILD.CLIP_MODEL = world["clip"]
    cfg.MODEL.VILD.EMBEDDING_CACHE_DIR = str(world["base"] / "cache")
    cfg.MODEL.VILD.DISTILL.STORES = (str(store),)
    for k, v in distill.items():
        cfg.MODEL.VILD.DISTILL[k] = v
    cfg.SOLVER.IMS_PER_BATCH = 2
    return cfg


def test_training_step_reads_targets_from_store(world, stores):
    cfg = train_cfg(world, stores[1])
    store = DistillStore(str(stores[1]))
    batch = next(iter(Trainer.build_train_loader(cfg)))
    for x in batch:
        assert "distill_source" not in x
        rec = store[x["image_id"]]
        distill = x["distill"]
        # The store's M boxes (the toy's own dicts carry 8), all inside the image.
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
    make_targets(world, stores[0], partial, shard=0, num_shards=2)  # chunks 0 and 2
    with pytest.raises(
        StoreError,
        match=r"2 of 6 images of training dataset "
        r"'dtest_toy_train' are not in store .*MISSING skip",
    ):
        Trainer.build_train_loader(train_cfg(world, partial))
    cfg = train_cfg(world, partial, MISSING="skip")
    with caplog.at_level(logging.WARNING):
        Trainer.build_train_loader(cfg)
    assert "2 of 6 images" in caplog.text and "without distillation targets" in caplog.text
    mapper = ViLDDatasetMapper(cfg, is_train=True)
    dicts = mapper.distill_targets.attach([DATASET], [DatasetCatalog.get(DATASET)])
    absent = [d for d in dicts if d["image_id"] not in DistillStore(str(partial))]
    out = mapper(absent[0])
    assert len(out["distill"]) == 0 and tuple(out["distill"].embeddings.shape) == (0, 32)


def test_store_made_with_other_clip_or_crops_is_refused(world, stores, tmp_path):
    other = save_random_clip(str(tmp_path / "other_clip.pt"), seed=1)
    cfg = train_cfg(world, stores[1])
    cfg.MODEL.VILD.CLIP_MODEL = other
    with pytest.raises(
        StoreError,
        match=r"clip: store has '.*tiny_clip\.pt.*', the config .*" r"asks for '.*other_clip\.pt",
    ):
        ViLDDatasetMapper(cfg, is_train=True)
    cfg = train_cfg(world, stores[1], CROP_SCALES=(1.0, 2.0))
    with pytest.raises(
        StoreError, match=r"crops\.scales: store has \[1\.0, 1\.5\].*\[1\.0, 2\.0\]"
    ):
        ViLDDatasetMapper(cfg, is_train=True)
    cfg = train_cfg(world, stores[0])  # a proposals store where targets are expected
    with pytest.raises(StoreError, match="'proposals' store.*ONLINE"):
        ViLDDatasetMapper(cfg, is_train=True)


def test_online_targets_equal_offline(world, stores):
    offline = ViLDDatasetMapper(train_cfg(world, stores[1]), is_train=True).distill_targets
    online = ViLDDatasetMapper(
        train_cfg(world, stores[0], ONLINE=True), is_train=True
    ).distill_targets
    assert online.teacher is not None
    for d in DatasetCatalog.get(DATASET)[:2]:
        a, b = dict(d), dict(d)
        offline.fill(a)
        online.fill(b)
        assert np.array_equal(a["distill_boxes"], b["distill_boxes"])
        assert np.array_equal(a["distill_embeddings"], b["distill_embeddings"])
        assert a["distill_embeddings"].shape == (M, 32)


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
