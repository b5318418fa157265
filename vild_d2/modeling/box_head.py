"""ViLD's box head in detectron2 terms: convs and FCs, each followed by norm + ReLU (the
layout of the official head; the official head itself, with TF's BN and padding, is
:class:`vild_d2.official.OfficialBoxHead`)."""

from typing import List

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY

__all__ = ["ViLDConvFCHead"]


@ROI_BOX_HEAD_REGISTRY.register()
class ViLDConvFCHead(nn.Module):
    """
    Like detectron2's ``FastRCNNConvFCHead``, but the norm (``ROI_BOX_HEAD.NORM``) also follows
    each FC layer, the layout of the official ViLD head (4 conv3x3 + 2 FC, each + norm + ReLU;
    the exact official head is ``vild_d2/official/heads.py``).
    ``FastRCNNConvFCHead`` (norm after the convs only) remains selectable by name.

    Input (R, C_in, S, S) pooled features; output (R, fc_dims[-1]).
    """

    @configurable
    def __init__(
        self, input_shape: ShapeSpec, *, conv_dims: List[int], fc_dims: List[int], norm: str = ""
    ):
        super().__init__()
        if not fc_dims:
            raise ValueError("ViLDConvFCHead needs at least one FC layer (ROI_BOX_HEAD.NUM_FC)")
        channels = input_shape.channels
        self.convs = nn.ModuleList()
        for dim in conv_dims:
            conv = Conv2d(
                channels,
                dim,
                kernel_size=3,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, dim),
                activation=nn.ReLU(),
            )
            weight_init.c2_msra_fill(conv)
            self.convs.append(conv)
            channels = dim
        size = channels * (input_shape.height or 1) * (input_shape.width or 1)
        self.fcs, self.fc_norms = nn.ModuleList(), nn.ModuleList()
        for dim in fc_dims:
            fc = nn.Linear(size, dim)
            weight_init.c2_xavier_fill(fc)
            self.fcs.append(fc)
            self.fc_norms.append(get_norm(norm, dim) or nn.Identity())
            size = dim
        self._output_size = size

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.ROI_BOX_HEAD
        return {
            "input_shape": input_shape,
            "conv_dims": [head.CONV_DIM] * head.NUM_CONV,
            "fc_dims": [head.FC_DIM] * head.NUM_FC,
            "norm": head.NORM,
        }

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        x = torch.flatten(x, start_dim=1)
        for fc, norm in zip(self.fcs, self.fc_norms):
            # 2-D norms (BN, SyncBN, GN) take (R, C, 1, 1): the same statistics as 1-D ones.
            x = torch.relu(norm(fc(x)[:, :, None, None]).flatten(1))
        return x

    @property
    def output_shape(self):
        return ShapeSpec(channels=self._output_size)
