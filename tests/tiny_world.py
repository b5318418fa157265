"""The tests' tiny scale of the shapes world and its models: a few 64-pixel images, a random
tiny CLIP, configs/Shapes/* shrunk by :data:`TINY_OPTS`, distillation stores made by the
project's own precompute jobs, and random-init checkpoints (no training) for the predictor,
demo, export and benchmark tests."""

import vild_d2  # noqa: F401  (first: compat bridges)

import contextlib
import os
from pathlib import Path
from typing import List, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model

from vild_d2 import TextEncoder, ViLDCheckpointer
from vild_d2.config import load_config
from vild_d2.data.datasets.shapes import WorldSpec, generate_shapes_world, register_shapes_world
from vild_d2.distill import CLIPTeacher, DistillStore, StoreWriter
from vild_d2.distill.precompute import (
    embeddings_header,
    iter_embeddings,
    iter_proposals,
    proposals_header,
    run_precompute,
)
from vild_d2.text import build_clip, vocabulary_from_names

TRAIN_NAMES = ["red square", "blue circle", "green triangle"]
TINY_SPEC = WorldSpec(num_train=6, num_val=4, image_size=64, objects_per_image=(2, 3))
M = 40  # distillation boxes per image

# configs/Shapes/* at test size: 64-pixel images, small RPN and heads, few steps, no workers.
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN",
    "(56, 64, 72)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "128",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "400",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "200",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "400",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "100",
    "MODEL.ROI_BOX_HEAD.NUM_CONV",
    "1",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "128",
    "MODEL.ROI_MASK_HEAD.NUM_CONV",
    "1",
    "MODEL.VILD.DISTILL.MAX_BOXES",
    str(M),
    "DATALOADER.NUM_WORKERS",
    "0",
    "TEST.DETECTIONS_PER_IMAGE",
    "50",
    # A slow start: the x100 cosine logits give large early gradients.
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.BASE_LR",
    "0.0025",
    "SOLVER.WARMUP_ITERS",
    "100",
    "SOLVER.MAX_ITER",
    "20",
    "SOLVER.STEPS",
    "(15,)",
    "SOLVER.CHECKPOINT_PERIOD",
    "1000",
]


def save_random_clip(path: str, *, embed_dim: int = 32, seed: int = 0, **dims) -> str:
    """A tiny random-weight ViT CLIP checkpoint that ``clip.load(path)`` reads; returns path."""
    spec = dict(
        embed_dim=embed_dim,
        image_resolution=32,
        vision_layers=1,
        vision_width=64,
        vision_patch_size=16,
        transformer_width=64,
        transformer_layers=1,
    )
    spec.update(dims)
    torch.manual_seed(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_clip(**spec).state_dict(), path)
    return str(path)


def make_world(datasets_root, prefix: str = "shapes", spec: WorldSpec = TINY_SPEC) -> dict:
    """Write a tiny shapes world at ``<datasets_root>/shapes`` and register it as
    ``<prefix>_train_base``, ``<prefix>_train``, ``<prefix>_val``; returns their names."""
    root = Path(datasets_root) / "shapes"
    generate_shapes_world(root, spec)
    names = register_shapes_world(str(datasets_root), prefix=prefix, folder="shapes")
    return {"root": root, "spec": spec, "train": names[0], "train_all": names[1], "val": names[2]}


def tiny_config(config_file: str, clip_path: str, cache_dir, *opts: str):
    """``config_file`` (a configs/Shapes/* file) at test size, with the tiny CLIP."""
    clip = [
        "MODEL.VILD.CLIP_MODEL",
        str(clip_path),
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(cache_dir),
    ]
    return load_config(config_file, [*TINY_OPTS, *clip, *opts])


def make_proposals(cfg, dataset: str, out, *, chunk_size: int = 2, **kwargs) -> dict:
    """The proposals job in-process (as tools/precompute_proposals.py) with ``cfg``'s RPN."""
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    dicts = DatasetCatalog.get(dataset)
    header = proposals_header(
        dataset,
        len(dicts),
        chunk_size=chunk_size,
        max_proposals=M,
        model={"weights": cfg.MODEL.WEIGHTS},
    )
    mapper = DatasetMapper(cfg, is_train=False)
    return run_precompute(
        StoreWriter(str(out), header),
        dicts,
        lambda chunks: iter_proposals(model, chunks, mapper, max_proposals=M, batch_size=2),
        progress=False,
        **kwargs,
    )


def make_targets(
    clip_path: str, dataset: str, proposals, out, *, scales=(1.0, 1.5), chunk_size=2, **kwargs
) -> dict:
    """The CLIP-targets job in-process (as tools/precompute_clip_embeddings.py)."""
    proposals = DistillStore(str(proposals))
    teacher = CLIPTeacher(clip_path, scales=scales)
    dicts = DatasetCatalog.get(dataset)
    header = embeddings_header(
        dataset,
        len(dicts),
        chunk_size=chunk_size,
        max_proposals=M,
        teacher_settings=teacher.settings(),
        proposals=proposals,
    )
    return run_precompute(
        StoreWriter(str(out), header),
        dicts,
        lambda chunks: iter_embeddings(teacher, chunks, proposals, max_boxes=M),
        progress=False,
        **kwargs,
    )


def random_rpn(clip_path: str, cache_dir, out, *opts: str, seed: int = 0):
    """A random-init base RPN (configs/Shapes/rpn.yaml at test size), saved to ``out``;
    returns its config (MODEL.WEIGHTS = ``out``)."""
    cfg = tiny_config("configs/Shapes/rpn.yaml", clip_path, cache_dir, *opts)
    torch.manual_seed(seed)
    torch.save({"model": build_model(cfg).state_dict()}, str(out))
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(out)
    cfg.freeze()
    return cfg


def make_stores(world: dict, clip_path: str, base) -> dict:
    """Proposals of a random base RPN and their tiny-CLIP targets for ``world["train"]``."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    rpn = random_rpn(clip_path, base / "cache", base / "rpn.pth")
    make_proposals(rpn, world["train"], base / "proposals")
    make_targets(clip_path, world["train"], base / "proposals", base / "targets")
    return {"rpn": rpn, "proposals": base / "proposals", "targets": base / "targets"}


def tool_world(root, clip_path: str, prefix: str, threads: int) -> dict:
    """A tiny world at <root>/shapes with its distillation stores, for tests that run the
    tools in subprocesses: they register it as shapes_* from $DETECTRON2_DATASETS (``env``),
    this process as <prefix>_*; ``common`` are the config options every tool run takes."""
    world = make_world(root, prefix=prefix)
    stores = make_stores(world, clip_path, root / "stores")
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), OMP_NUM_THREADS=str(threads))
    common = [
        *TINY_OPTS,
        "MODEL.VILD.CLIP_MODEL",
        clip_path,
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(root / "cache"),
        "MODEL.VILD.DISTILL.STORES",
        f"('{stores['targets']}',)",
    ]
    return {
        "root": root,
        "env": env,
        "world": world,
        "stores": stores,
        "common": common,
        "clip": clip_path,
    }


@contextlib.contextmanager
def counting_text_encodes(clip_model):
    """Within the block, ``clip_model.encode_text`` calls are recorded: yields the list of
    their batch sizes (a cached vocabulary encodes nothing)."""
    calls = []
    encode_text = clip_model.encode_text

    def counting(tokens):
        calls.append(len(tokens))
        return encode_text(tokens)

    clip_model.encode_text = counting
    try:
        yield calls
    finally:
        del clip_model.encode_text  # the class's method again


def make_random_model(
    root, clip_path: str, variant: str = "vild", seed: int = 0
) -> (str, List[str]):
    """A random-init ViLD checkpoint under ``root`` whose training vocabulary is a saved file
    (no dataset needed); returns (config file, opts) that :func:`load_config` takes."""
    root = Path(root)
    cache = root / "cache"
    train_file = root / "train_vocabulary.pth"
    vocabulary_from_names(TRAIN_NAMES, TextEncoder(clip_path, cache_dir=str(cache))).save(
        str(train_file)
    )
    config_file = f"configs/Shapes/{variant}.yaml"
    opts: Sequence[str] = [
        *TINY_OPTS,
        "MODEL.VILD.CLIP_MODEL",
        str(clip_path),
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(cache),
        "MODEL.VILD.TRAIN_VOCABULARY",
        str(train_file),
        "MODEL.VILD.DISTILL.STORES",
        "()",
        "DATASETS.TRAIN",
        "()",
        "DATASETS.TEST",
        "()",
    ]
    torch.manual_seed(seed)
    model = build_model(load_config(config_file, opts))
    ViLDCheckpointer(model, str(root)).save("model")
    return config_file, list(opts) + ["MODEL.WEIGHTS", str(root / "model.pth")]
