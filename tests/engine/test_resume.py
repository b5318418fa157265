"""Reproducible training, in-process parts: text encoding leaves the global RNGs alone, the
training loader resumes at the exact next item (aspect-ratio buckets and loader workers
included), the RNG states survive a weights-only checkpoint load, and train_net's command line
(flags after the overrides; a refused dataset writes nothing). The end-to-end kill / resume
runs are in tests/tools/test_train_net.py."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import itertools
import io
import random

import numpy as np
import pytest
import torch

from vild_d2.engine.resume import (
    ResumableTrainLoader,
    capture_rng_state,
    preserved_rng_state,
    restore_rng_state,
)
from vild_d2.text import TextEncoder


def _rng_draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def _same_draws(a, b):
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_text_encoding_does_not_draw_from_the_global_rng(tiny_clip_path, tmp_path):
    """The issue's case: a cold cache loads CLIP (whose construction initialises random
    weights), a warm one does not; the RNG streams after encoding must not tell them apart."""

    def draws_after(encode):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        if encode is not None:
            encode()
        return _rng_draws()

    expected = draws_after(None)  # no encoding at all
    for cache in ("cold", "warm"):  # the same cache folder: the second call reads it
        encoder = TextEncoder(tiny_clip_path, templates=["a {}."], cache_dir=str(tmp_path))
        got = draws_after(lambda e=encoder: e.encode(["red square", "blue circle"]))
        assert encoder.is_loaded == (cache == "cold")
        assert _same_draws(got, expected), cache


def test_rng_state_round_trips_through_a_weights_only_checkpoint():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.randn()  # a cached gaussian is part of numpy's state
    state = capture_rng_state()
    expected = _rng_draws()
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"]
    _rng_draws()
    restore_rng_state(loaded)
    assert _same_draws(_rng_draws(), expected)
    with preserved_rng_state():
        _rng_draws()
    after = _rng_draws()
    restore_rng_state(loaded)
    _rng_draws()
    assert _same_draws(_rng_draws(), after)


class _Items(torch.utils.data.Dataset):
    """Ten dataset dicts; odd ones are portrait (another aspect-ratio group)."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"id": i, "width": 10 if i % 2 else 20, "height": 20 if i % 2 else 10}


def _augment(d):
    """A mapper that draws from all three global RNGs, as augmentations do."""
    return {**d, "aug": (random.random(), float(np.random.rand()), float(torch.rand(())))}


def _loader(num_workers=0, seed=7):
    from detectron2.data.samplers import TrainingSampler

    return ResumableTrainLoader(
        _Items(),
        _augment,
        lambda s: TrainingSampler(10, seed=s),
        seed,
        batch_size=3,
        aspect_ratio_grouping=True,
        num_workers=num_workers,
    )


def _take(iterator, n):
    return [[(d["id"], d["aug"]) for d in next(iterator)] for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_at_the_exact_next_batch(num_workers):
    """Batches 0-5 of one loader == batches 0-2 of a loader, then 3-5 of a new one given its
    state; items held back in the aspect-ratio buckets are part of the state."""
    torch.manual_seed(1)
    expected = _take(iter(_loader(num_workers)), 6)
    # Order as detectron2's TrainingSampler(seed=7) gives it, grouped by aspect ratio (by hand
    # from the sampler's order: each batch is 3 items of one group, in stream order).
    from detectron2.data.samplers import TrainingSampler

    order = list(itertools.islice(iter(TrainingSampler(10, seed=7)), 60))
    groups, batches = ([], []), []
    for i in order:
        g = groups[i % 2]
        g.append(i)
        if len(g) == 3:
            batches.append(list(g))
            g.clear()
    assert [[i for i, _ in b] for b in expected] == batches[:6]

    first = _loader(num_workers)
    it = iter(first)
    # The main process's RNGs are not used by the loader (items are mapped under their own).
    torch.manual_seed(2)
    before = _rng_draws()
    torch.manual_seed(2)
    assert _take(it, 3) == expected[:3]
    assert torch.equal(_rng_draws()[2], before[2])
    state = first.state_dict()
    assert any(state["buckets"]), "the case must hold items back in a bucket"
    # Through a weights-only checkpoint, as the trainer saves it.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    second = _loader(num_workers, seed=123)  # another run's seed: the saved one wins
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert _take(iter(second), 3) == expected[3:]


def _train_net_tool():
    spec = importlib.util.spec_from_file_location("vild_train_net_tool", "tools/train_net.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_flags_after_the_overrides_are_flags():
    """``train_net.py --config-file c.yaml SOLVER.MAX_ITER 5 --resume``: argparse's REMAINDER
    took --resume as a config key (silently lost, or a KeyError later)."""
    tool = _train_net_tool()
    args = tool.parse_args(
        ["--config-file", "c.yaml", "SOLVER.MAX_ITER", "5", "--resume", "SEED", "3"]
    )
    assert args.resume and args.opts == ["SOLVER.MAX_ITER", "5", "SEED", "3"]
    args = tool.parse_args(
        ["--config-file", "c.yaml", "A.B", "1", "--num-gpus", "2", "--eval-only"]
    )
    assert (args.num_gpus, args.eval_only, args.opts) == (2, True, ["A.B", "1"])
    # A value that starts with "--" stays a value; flags before the overrides are as before.
    args = tool.parse_args(["--resume", "OUTPUT_DIR", "--odd", "SEED", "1"])
    assert args.resume and args.opts == ["OUTPUT_DIR", "--odd", "SEED", "1"]
    with pytest.raises(SystemExit) as e:  # argparse's one line for an unknown flag
        tool.parse_args(["--config-file", "c.yaml", "SEED", "1", "--no-such-flag"])
    assert e.value.code == 2


def test_refused_dataset_writes_nothing_into_the_output_folder(tiny_clip_path, tmp_path):
    """The dataset is checked before detectron2's setup writes config.yaml and log.txt."""
    import json

    import cv2

    from vild_d2.data import register_ovd_dataset

    root = tmp_path / "own"
    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "1.png"), np.zeros((50, 50, 3), np.uint8))
    doc = {
        "images": [{"id": 1, "file_name": "1.png", "height": 50, "width": 50}],
        "annotations": [  # a negative width: refused
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, -3, 10], "area": 30}
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "a.json").write_text(json.dumps(doc))
    register_ovd_dataset(
        "refused_own",
        train_json=str(root / "a.json"),
        train_images=str(root / "images"),
        val_json=str(root / "a.json"),
        val_images=str(root / "images"),
        novel=["dog"],
    )
    tool = _train_net_tool()
    out = tmp_path / "out"
    args = tool.parse_args(
        [
            "--config-file",
            "configs/Shapes/vild_text.yaml",
            "MODEL.VILD.CLIP_MODEL",
            tiny_clip_path,
            "MODEL.VILD.EMBEDDING_CACHE_DIR",
            str(tmp_path / "cache"),
            "DATASETS.TRAIN",
            "('refused_own_train_base',)",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(out),
        ]
    )
    with pytest.raises(tool.InputError, match=r"^error: .*a.json.*annotation id 1"):
        tool.main(args)
    assert not out.exists()
