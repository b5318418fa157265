"""The pure-Python detectron2 bridges: each detected, applied only when needed, and working."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from vild_d2 import compat


def test_bridges_report_what_they_applied():
    # Each bridge is listed exactly when its gap exists in this environment.
    compiled = importlib.util.find_spec("detectron2._C") is not None and compat.has_compiled_ops()
    assert ("detectron2._C" in compat.APPLIED) == (not compiled)
    assert ("numpy aliases" in compat.APPLIED) == (np.lib.NumpyVersion(np.__version__) >= "1.24.0")
    assert np.float is float and np.int is int and np.object is object
    assert Image.LINEAR == Image.Resampling.BILINEAR


def test_bridges_are_applied_only_when_needed(monkeypatch):
    monkeypatch.setattr(compat, "APPLIED", {})
    compat.apply_bridges()  # everything already bridged: nothing new to do
    assert "numpy aliases" not in compat.APPLIED and "PIL.Image.LINEAR" not in compat.APPLIED
    assert "create_ddp_model on CPU" not in compat.APPLIED  # wrapped once, not twice

    monkeypatch.delattr(np, "float")
    monkeypatch.delattr(Image, "LINEAR")
    compat.apply_bridges()
    assert np.float is float and Image.LINEAR == Image.Resampling.BILINEAR
    assert "np.{float}" in compat.APPLIED["numpy aliases"]
    assert "PIL.Image.LINEAR" in compat.APPLIED


@pytest.mark.skipif(compat.has_compiled_ops(), reason="detectron2 has its compiled ops")
def test_compiled_ops_fail_with_a_clear_message():
    import detectron2
    from detectron2.layers import nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated
    from detectron2.utils.collect_env import collect_env_info

    # What DeformConv calls on a GPU (on the CPU detectron2 0.6 uses torchvision's kernel).
    with pytest.raises(compat.CompiledOpsUnavailable, match="compiled.*from source"):
        detectron2._C.deform_conv_forward
    with pytest.raises(compat.CompiledOpsUnavailable, match="box_iou_rotated"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    with pytest.raises(compat.CompiledOpsUnavailable, match="nms_rotated"):
        nms_rotated(torch.zeros(1, 5), torch.ones(1), 0.5)
    # default_setup() prints the environment, which asks _C for its compiler.
    assert "pure-Python detectron2" in collect_env_info()


def test_pure_python_parts_work():
    """RoIAlign (torchvision's kernel) and NMS need no compiled detectron2 ops."""
    from detectron2.layers import ROIAlign, batched_nms

    feat = torch.arange(16.0).view(1, 1, 4, 4)
    out = ROIAlign((1, 1), spatial_scale=1.0, sampling_ratio=1, aligned=True)(
        feat, torch.tensor([[0.0, 1.0, 1.0, 2.0, 2.0]])
    )
    # One sample at the box centre (1.5, 1.5) in pixel coordinates with aligned=True -> the
    # bilinear value at (1.0, 1.0) of the grid = feat[1, 1] = 5.
    assert out.item() == pytest.approx(5.0)
    keep = batched_nms(
        torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]),
        torch.tensor([0.9, 0.8, 0.7]),
        torch.tensor([0, 0, 0]),
        0.5,
    )
    assert keep.tolist() == [0, 2]


def test_tracing_adapter_without_caffe2():
    cls = compat.tracing_adapter_class()
    from detectron2.export.flatten import TracingAdapter

    assert cls is TracingAdapter
    if importlib.util.find_spec("caffe2") is None:  # torch 2.x: the bridge was needed
        assert "detectron2.export" in compat.APPLIED


def test_ddp_bridge_wraps_what_the_trainer_calls():
    """DefaultTrainer.__init__ wraps its model with detectron2.engine.defaults.create_ddp_model;
    the bridged one leaves a CPU model's device ids out (DDP refuses [local_rank] there).
    tests/engine/test_distributed.py trains through it in 2 processes."""
    from detectron2.engine import defaults

    assert "create_ddp_model on CPU" in compat.APPLIED
    assert defaults.create_ddp_model.vild_d2_bridge
    model = torch.nn.Linear(2, 2)
    assert defaults.create_ddp_model(model) is model  # one process: no wrapper, as detectron2
