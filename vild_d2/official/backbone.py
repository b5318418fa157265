"""The official ViLD backbone: TF-style ResNet + FPN (``build_tf_resnet_fpn_backbone``).

Differences from detectron2's ``build_resnet_fpn_backbone`` (official code:
modeling/architecture/{resnet,fpn,nn_ops,nn_blocks}.py):

* stem max-pool 3x3/2 with TF 'SAME' padding (0 before, 1 after on an even input);
* batch norm epsilon 1e-4, momentum 0.997, everywhere;
* the stride sits in the 3x3 conv of a bottleneck (detectron2's ``STRIDE_IN_1X1 False``), TF's
  fixed padding of a strided 3x3 / 7x7 conv is symmetric like PyTorch's;
* FPN: laterals 1x1 and outputs 3x3 with bias and no norm; P6 = a 3x3/2 'SAME' conv (with bias)
  on P5's output conv, before P5's norm; then a batch norm (no ReLU) on each of P2..P6.
"""

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from torch import nn

from .layers import Conv2dSame, MaxPool2dSame, norm_from_config

__all__ = ["TFStem", "TFFPN", "build_tf_resnet", "build_tf_resnet_fpn_backbone"]

# ResNet bottleneck blocks per stage (res2..res5).
BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class TFStem(CNNBlockBase):
    """conv 7x7/2 (no bias, padding 3) + norm + ReLU + TF 'SAME' max-pool 3x3/2:
    (N, 3, H, W) -> (N, 64, ceil(H/4), ceil(W/4)) for even H, W."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: Callable = None):
        super().__init__(in_channels, out_channels, 4)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3,
                            bias=False, norm=norm(out_channels))  # fmt: skip
        self.pool = MaxPool2dSame(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu_(self.conv1(x)))


def build_tf_resnet(*, depth: int, norm: Callable, out_features: List[str], freeze_at: int = 0
                    ) -> ResNet:  # fmt: skip
    """detectron2's :class:`ResNet` (its bottleneck blocks, stride in the 3x3 conv) with the TF
    stem and the official norm; ``depth`` 50, 101 or 152."""
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"the official ResNet depth must be one of {sorted(BLOCKS_PER_STAGE)}, "
                         f"got {depth}")  # fmt: skip
    stages, in_channels, bottleneck, out_channels = [], 64, 64, 256
    for i, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        stride = 1 if i == 0 else 2
        stages.append(
            ResNet.make_stage(
                BottleneckBlock, num_blocks, stride_per_block=[stride] + [1] * (num_blocks - 1),
                in_channels=in_channels, out_channels=out_channels,
                bottleneck_channels=bottleneck, norm=norm, stride_in_1x1=False,
            )
        )  # fmt: skip
        in_channels, bottleneck, out_channels = out_channels, bottleneck * 2, out_channels * 2
    return ResNet(TFStem(3, 64, norm), stages, out_features=out_features, freeze_at=freeze_at)


class TFFPN(Backbone):
    """
    The official FPN on a bottom-up network with outputs res2..res5 (strides 4..32):
    ``p2``..``p5`` = norm(conv3x3(lateral + upsampled top-down)), ``p6`` = norm(conv3x3/2 'SAME'
    of P5's pre-norm output). Norms have no ReLU. Each output (N, out_channels, H/s, W/s).
    """

    @configurable
    def __init__(self, *, bottom_up: Backbone, in_features: List[str], out_channels: int,
                 norm: Callable):  # fmt: skip
        """
        Args:
            bottom_up: e.g. :func:`build_tf_resnet`, with outputs ``in_features``.
            in_features: the bottom-up outputs, finest first (``res2``..``res5``).
            out_channels: FPN width (256).
            norm: ``channels -> module`` norm factory (:func:`official_norm`).
        """
        super().__init__()
        self.bottom_up = bottom_up
        shapes = bottom_up.output_shape()
        self.in_features = list(in_features)
        strides = [shapes[f].stride for f in in_features]
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(shapes[f].channels, out_channels, 1) for f in in_features
        )
        # 'same' padding of a stride-1 3x3 conv is symmetric: PyTorch's padding=1.
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_features
        )
        self.p6_conv = Conv2dSame(out_channels, out_channels, 3, stride=2)
        levels = [int(torch.tensor(float(s)).log2().item()) for s in strides] + [
            int(torch.tensor(float(strides[-1])).log2().item()) + 1
        ]
        self._out_features = [f"p{lv}" for lv in levels]
        self.norms = nn.ModuleList(norm(out_channels) for _ in self._out_features)
        self._out_feature_strides = {f"p{lv}": 2**lv for lv in levels}
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._size_divisibility = 2 ** levels[-1]

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        norm = norm_from_config(cfg)
        bottom_up = build_tf_resnet(
            depth=cfg.MODEL.RESNETS.DEPTH, norm=norm, out_features=cfg.MODEL.FPN.IN_FEATURES,
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        )  # fmt: skip
        return {
            "bottom_up": bottom_up,
            "in_features": cfg.MODEL.FPN.IN_FEATURES,
            "out_channels": cfg.MODEL.FPN.OUT_CHANNELS,
            "norm": norm,
        }

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {"p2": (N, C, H/4, W/4), ..., "p6": (N, C, H/64, W/64)}."""
        bottom_up = self.bottom_up(x)
        feats = [conv(bottom_up[f]) for conv, f in zip(self.lateral_convs, self.in_features)]
        for i in range(len(feats) - 2, -1, -1):
            # Nearest x2 upsampling (TF's nearest_upsampling repeats each pixel).
            feats[i] = feats[i] + F.interpolate(feats[i + 1], scale_factor=2.0, mode="nearest")
        feats = [conv(f) for conv, f in zip(self.output_convs, feats)]
        feats.append(self.p6_conv(feats[-1]))
        return {name: norm(f) for name, norm, f in zip(self._out_features, self.norms, feats)}


@BACKBONE_REGISTRY.register()
def build_tf_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """The official ViLD backbone (MODEL.BACKBONE.NAME "build_tf_resnet_fpn_backbone"):
    TF-style ResNet-``MODEL.RESNETS.DEPTH`` (50/101/152) + FPN with P2..P6."""
    if input_shape.channels != 3:
        raise ValueError(f"the official backbone takes RGB images, got {input_shape.channels} "
                         "channels")  # fmt: skip
    return TFFPN(cfg, input_shape)
