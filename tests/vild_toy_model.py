"""A random-init toy ViLD checkpoint (tiny CLIP, R18-FPN toy config) for the predictor, demo,
export and benchmark tests; no dataset needed (the training vocabulary is a saved file)."""

import vild_d2  # noqa: F401  (first: compat bridges)

from pathlib import Path

import torch
from detectron2.modeling import build_model

from vild_d2 import TextEncoder, ViLDCheckpointer
from vild_d2.engine.predictor import load_config
from vild_d2.text import vocabulary_from_names

TRAIN_NAMES = ["red square", "blue circle", "green triangle"]


def make_toy_model(root, clip_path, variant="vild", seed=0):
    """Write a random-init checkpoint under ``root``; returns (config file, opts)."""
    root = Path(root)
    cache = root / "cache"
    train_file = root / "train_vocabulary.pth"
    vocabulary_from_names(TRAIN_NAMES, TextEncoder(clip_path, cache_dir=str(cache))).save(
        str(train_file)
    )
    config_file = f"configs/Toy/{variant}.yaml"
    opts = [
        "MODEL.VILD.CLIP_MODEL", str(clip_path),
        "MODEL.VILD.EMBEDDING_CACHE_DIR", str(cache),
        "MODEL.VILD.TRAIN_VOCABULARY", str(train_file),
        "DATASETS.TRAIN", "()",
        "DATASETS.TEST", "()",
    ]  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(load_config(config_file, opts))
    ViLDCheckpointer(model, str(root)).save("model")
    return config_file, opts + ["MODEL.WEIGHTS", str(root / "model.pth")]
