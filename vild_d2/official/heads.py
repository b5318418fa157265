"""The official box and mask heads (projects/vild/modeling/vild_head.py, heads.py
MaskrcnnHead): every conv and FC keeps its bias AND is followed by a batch norm + ReLU; the
mask head's transposed conv too (detectron2's ``FastRCNNConvFCHead`` and
``MaskRCNNConvUpsampleHead`` drop the bias under a norm, put no norm after FCs or the
transposed conv).

fc6 of the official head reads the pooled features flattened in (H, W, C) order; these modules
flatten in PyTorch's (C, H, W) order and the converter permutes fc6's input rows instead.
"""

from typing import Callable, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead
from torch import nn

from .layers import norm_from_config

__all__ = ["OfficialBoxHead", "OfficialMaskHead"]


def _fc_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 2-D batch norm over (R, D) features: (R, D, 1, 1) has the same statistics."""
    return norm(x[:, :, None, None]).flatten(1)


@ROI_BOX_HEAD_REGISTRY.register()
class OfficialBoxHead(nn.Module):
    """
    Pooled (R, C, S, S) -> (R, fc_dims[-1]): ``num_conv`` x [conv3x3 + bias, norm, ReLU], flatten,
    ``num_fc`` x [FC + bias, norm, ReLU] (MODEL.ROI_BOX_HEAD.NAME "OfficialBoxHead").
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dims: List[int], fc_dims: List[int],
                 norm: Callable):  # fmt: skip
        super().__init__()
        channels = input_shape.channels
        self.convs, self.conv_norms = nn.ModuleList(), nn.ModuleList()
        for dim in conv_dims:
            self.convs.append(nn.Conv2d(channels, dim, 3, padding=1))
            self.conv_norms.append(norm(dim))
            channels = dim
        size = channels * input_shape.height * input_shape.width
        self.fcs, self.fc_norms = nn.ModuleList(), nn.ModuleList()
        for dim in fc_dims:
            self.fcs.append(nn.Linear(size, dim))
            self.fc_norms.append(norm(dim))
            size = dim
        self._output_size = size
        for conv in self.convs:  # the official initialisers
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.ROI_BOX_HEAD
        return {
            "input_shape": input_shape,
            "conv_dims": [head.CONV_DIM] * head.NUM_CONV,
            "fc_dims": [head.FC_DIM] * head.NUM_FC,
            "norm": norm_from_config(cfg),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.conv_norms):
            x = F.relu(norm(conv(x)))
        x = x.flatten(1)
        for fc, norm in zip(self.fcs, self.fc_norms):
            x = F.relu(_fc_norm(norm, fc(x)))
        return x

    @property
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self._output_size)


@ROI_MASK_HEAD_REGISTRY.register()
class OfficialMaskHead(BaseMaskRCNNHead):
    """
    Pooled (R, C, S, S) -> (R, 1, 2S, 2S) class-agnostic mask logits: ``num_conv`` x [conv3x3 +
    bias, norm, ReLU], transposed conv 2x2/2 + bias, norm, ReLU, conv1x1 (MODEL.ROI_MASK_HEAD.NAME
    "OfficialMaskHead"). Losses and inference are detectron2's.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dims: List[int], norm: Callable,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        channels = input_shape.channels
        self.convs, self.conv_norms = nn.ModuleList(), nn.ModuleList()
        for dim in conv_dims:
            self.convs.append(nn.Conv2d(channels, dim, 3, padding=1))
            self.conv_norms.append(norm(dim))
            channels = dim
        self.deconv = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.deconv_norm = norm(channels)
        self.predictor = nn.Conv2d(channels, 1, 1)
        for layer in [*self.convs, self.deconv, self.predictor]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        head = cfg.MODEL.ROI_MASK_HEAD
        if not head.CLS_AGNOSTIC_MASK:
            raise ValueError("OfficialMaskHead is class-agnostic: set "
                             "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True")  # fmt: skip
        ret.update(
            input_shape=input_shape,
            conv_dims=[head.CONV_DIM] * head.NUM_CONV,
            norm=norm_from_config(cfg),
        )
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.conv_norms):
            x = F.relu(norm(conv(x)))
        x = F.relu(self.deconv_norm(self.deconv(x)))
        return self.predictor(x)
