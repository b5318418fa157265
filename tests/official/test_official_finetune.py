"""Fine-tuning converted official weights (docs/OFFICIAL.md "Fine-tuning the official ViLD"):
configs/Shapes/official_finetune.yaml through tools/train_net.py, in this process, on the tiny
world with its distillation store, from a real TF checkpoint of the seeded official weights
(tests/official/tf_bundle.py) converted by tools/convert_official_checkpoint.py."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from detectron2.data import MetadataCatalog

from vild_d2.config import load_config
from vild_d2.engine import Trainer
from reference.random_weights import random_official_weights
from vild_d2.official import official_variables
from tf_bundle import write_tf_checkpoint  # tests/ helper
from tiny_world import save_random_clip, tool_world  # tests/ helper

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "Shapes" / "official_finetune.yaml")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"vild_ft_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _restoring_logs(fn, *args):
    """``fn(*args)`` with the loggers' handlers as before (the tools set up logging)."""
    loggers = [logging.root] + [logging.getLogger(n) for n in ("vild_d2", "detectron2", "d2")]
    handlers = [x.handlers[:] for x in loggers]
    try:
        return fn(*args)
    finally:
        for x, h in zip(loggers, handlers):
            x.handlers[:] = h


def test_fine_tunes_converted_official_weights(tmp_path, monkeypatch):
    clip = save_random_clip(str(tmp_path / "clip512.pt"), embed_dim=512)  # the official width
    world = tool_world(tmp_path / "datasets", clip, "offt", threads=1)
    tf_vars = random_official_weights(official_variables(50, ensemble=False), 0)
    tf_vars["global_step"] = np.int64(180000)
    write_tf_checkpoint(tmp_path / "model.ckpt-180000", tf_vars)
    weights = tmp_path / "vild_r50.pth"
    convert = _tool("convert_official_checkpoint")
    argv = ["--checkpoint", str(tmp_path / "model.ckpt-180000"), "--config-file"]
    argv += [str(REPO / "configs/LVIS-OVD/official/vild_R50_tf.yaml"), "--output", str(weights)]
    assert _restoring_logs(convert.main, argv) == 0

    out = tmp_path / "out"
    opts = [
        "MODEL.WEIGHTS",
        str(weights),
        "MODEL.VILD.CLIP_MODEL",
        clip,
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(tmp_path / "cache"),
        "MODEL.VILD.DISTILL.STORES",
        f"('{world['stores']['targets']}',)",
        "DATASETS.TRAIN",
        f"('{world['world']['train']}',)",
        "DATASETS.TEST",
        f"('{world['world']['val']}',)",
        # the tiny world's 64 px images; 3 steps
        "MODEL.VILD.OFFICIAL.IMAGE_SIZE",
        "64",
        "MODEL.VILD.LSJ.IMAGE_SIZE",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "SOLVER.MAX_ITER",
        "3",
        "OUTPUT_DIR",
        str(out),
    ]
    # The frozen class-predict kernel before training: the training vocabulary's embeddings
    # of the model the trainer builds from this config.
    cfg = load_config(CONFIG, opts)
    before = Trainer.build_model(cfg).roi_heads.box_predictor.cls_score.train_embeddings.clone()

    built = []  # the model the trainer trains, kept to read its classifier afterwards
    build = Trainer.build_model
    monkeypatch.setattr(
        Trainer, "build_model", classmethod(lambda c, x: built.append(build(x)) or built[-1])
    )
    train_net = _tool("train_net")
    args = train_net.parse_args(["--config-file", CONFIG, *opts])
    _restoring_logs(train_net.main, args)

    records = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    losses = [{k: v for k, v in r.items() if k.startswith("loss")} for r in records]
    losses = [x for x in losses if x]
    expected = {"loss_cls", "loss_box_reg", "loss_mask", "loss_distill"}
    assert losses and expected | {"loss_rpn_cls", "loss_rpn_loc"} <= set(losses[-1])
    assert all(math.isfinite(v) for x in losses for v in x.values())

    (model,) = built
    classifier = model.roi_heads.box_predictor.cls_score
    assert classifier.train_vocabulary.names == list(
        MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
    )
    assert torch.equal(classifier.train_embeddings, before)  # class-predict: frozen
    assert not any(p is classifier.train_embeddings for p in model.parameters())
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    converted = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    key = "roi_heads.box_predictor.cls_score.projection.weight"
    assert not torch.equal(final["model"][key], converted[key])  # the rest trained
    # evaluated at the end, on the val set: LVIS-style box and mask APs
    saved = out / "inference" / world["world"]["val"] / "results.json"
    results = json.loads(saved.read_text())
    assert set(results) == {"bbox", "segm"} and all(
        math.isfinite(results[t][k]) for t in results for k in ("AP", "AP50", "APr")
    )
