"""The tiny ViLD config and seeded random vocabularies shared by tests/modeling/test_model.py
and tests/checkpoint/test_loading.py."""

import torch
from detectron2.config import get_cfg

from vild_d2 import Vocabulary, add_vild_config
from tiny_world import TINY_OPTS  # tests/ helper

TRAIN_NAMES = ["red square", "blue circle", "green triangle"]
TEST_NAMES = ["red square", "blue circle", "green triangle", "yellow star", "purple cross"]
DIM = 16


def random_vocab(names, seed, dim=DIM, novel=None):
    """A vocabulary of ``names`` with seeded random (N, dim) embeddings."""
    g = torch.Generator().manual_seed(seed)
    # Deliberately not unit-norm: the model must normalise the class embeddings itself.
    return Vocabulary(list(names), torch.randn(len(names), dim, generator=g) * 3, novel)


def tiny_cfg(variant, vocab_files, **overrides):
    """configs/Shapes/Base-Shapes-R18-FPN.yaml shrunk by TINY_OPTS, as ``variant``, with the
    vocabulary files ``vocab_files["train"]`` and ``["test"]``; ``overrides``: KEY=VALUE."""
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file("configs/Shapes/Base-Shapes-R18-FPN.yaml")
    cfg.merge_from_list(TINY_OPTS)
    cfg.MODEL.VILD.VARIANT = variant
    cfg.MODEL.VILD.TRAIN_VOCABULARY = vocab_files["train"]
    cfg.MODEL.VILD.TEST_VOCABULARY = vocab_files["test"]
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg
