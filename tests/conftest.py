"""Shared pytest fixtures."""

import vild_d2  # noqa: F401  (first: applies compat bridges before detectron2 imports)

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on the two cores: one thread each (and in the tools
    # they start), or the workers' thread pools contend for the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from tiny_world import save_random_clip  # tests/ helper

# guard_checkout: the suite must leave the checkout's output/ and datasets/ as they were;
# pytester: to test that guard.
pytest_plugins = ["guard_checkout", "pytester"]


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> str:
    """Path of a tiny random-weight CLIP checkpoint (ViT, 32-d embeddings) for clip.load."""
    return save_random_clip(str(tmp_path_factory.mktemp("clip") / "tiny_clip.pt"), embed_dim=32)
