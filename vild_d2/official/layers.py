"""Small building blocks of the official ViLD model: TensorFlow's 'SAME' padding and the
official batch norm (epsilon 1e-4, momentum 0.997).

TF's 'SAME' padding of a stride-s, kernel-k layer on an input of n pixels pads
``max((ceil(n / s) - 1) * s + k - n, 0)`` in total, the smaller half BEFORE: a 3x3/2 layer on an
even input pads 0 before and 1 after, where PyTorch's ``padding=1`` pads 1 on both sides. The
two sample different pixels, so every strided layer with k > 1 (the stem's max-pool, FPN's P6
conv) must pad like TF.
"""

import math
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn

__all__ = ["tf_same_padding", "pad_same", "MaxPool2dSame", "Conv2dSame", "OfficialBatchNorm2d",
           "official_norm"]  # fmt: skip


def tf_same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """(before, after) padding of TF's 'SAME' for one axis of ``size`` pixels."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (N, C, H, W) ``x`` as TF's 'SAME' would for a square kernel and stride."""
    top, bottom = tf_same_padding(x.shape[-2], kernel, stride)
    left, right = tf_same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom), value=value)


class MaxPool2dSame(nn.Module):
    """``tf.layers.max_pooling2d(padding='SAME')``: (N, C, H, W) -> (N, C, ceil(H/s), ceil(W/s)).
    Padded cells never win (TF ignores them; -inf here)."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class Conv2dSame(nn.Conv2d):
    """``tf.layers.conv2d(padding='same')`` for any stride: (N, C_in, H, W) ->
    (N, C_out, ceil(H/s), ceil(W/s)). Square kernels and strides, no dilation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = True):  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size[0], self.stride[0]))


class OfficialBatchNorm2d(nn.BatchNorm2d):
    """``tf.layers.batch_normalization`` in training: the BIASED batch variance both normalises
    and enters the moving average (PyTorch's BatchNorm2d puts the unbiased one there). At test
    time, and in every other respect, it is ``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats:
            return super().forward(x)
        dims = [0, 2, 3]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        with torch.no_grad():
            self.running_mean.add_(self.momentum * (mean.detach() - self.running_mean))
            self.running_var.add_(self.momentum * (var.detach() - self.running_var))
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def official_norm(kind: str, eps: float = 1e-4, momentum: float = 0.003) -> Callable:
    """A ``channels -> module`` factory (what detectron2's ``get_norm`` accepts) for the official
    batch norm: "BN", "SyncBN" (torch's; detectron2's naive one on a CPU-only process group
    would do too, but torch's is what DDP converts to), "NaiveSyncBN", "FrozenBN"."""

    def make(channels: int) -> nn.Module:
        if kind == "BN":
            return OfficialBatchNorm2d(channels, eps=eps, momentum=momentum)
        if kind == "SyncBN":
            return nn.SyncBatchNorm(channels, eps=eps, momentum=momentum)
        if kind == "NaiveSyncBN":
            return NaiveSyncBatchNorm(channels, eps=eps, momentum=momentum)
        if kind == "FrozenBN":
            return FrozenBatchNorm2d(channels, eps=eps)
        raise ValueError(
            f"MODEL.VILD.OFFICIAL.NORM must be BN, SyncBN, NaiveSyncBN or FrozenBN, got {kind!r}"
        )

    return make


def norm_from_config(cfg) -> Callable:
    """The official norm factory of ``cfg.MODEL.VILD.OFFICIAL``."""
    o = cfg.MODEL.VILD.OFFICIAL
    return official_norm(o.NORM, o.BN_EPS, o.BN_MOMENTUM)
