"""The official anchors (dataloader/anchor.py), ``OfficialAnchorGenerator``.

Per level l (stride s = 2^l): side ``anchor_size * s``, one anchor per ratio r = width / height
in the configured order (official: 1, 2, 0.5), i.e. width ``side * sqrt(r)``, height
``side / sqrt(r)``, centred at (s/2 + i*s, s/2 + j*s); ordered by location (row-major, x
fastest), then ratio. detectron2's ``DefaultAnchorGenerator`` reads ratios as height / width
and centres anchors at 0 by default.
"""

import math
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
from detectron2.structures import Boxes
from torch import nn

__all__ = ["OfficialAnchorGenerator"]


@ANCHOR_GENERATOR_REGISTRY.register()
class OfficialAnchorGenerator(nn.Module):
    """Anchors of the official ViLD / TF Mask R-CNN (MODEL.ANCHOR_GENERATOR.NAME
    "OfficialAnchorGenerator")."""

    box_dim: int = 4

    @configurable
    def __init__(self, *, strides: List[int], aspect_ratios: List[float], anchor_size: float):
        """
        Args:
            strides: one per feature map (4, 8, ..., 64).
            aspect_ratios: width / height, in the order of the RPN's outputs.
            anchor_size: side in units of the stride (8).
        """
        super().__init__()
        self.strides = list(strides)
        self.aspect_ratios = [float(r) for r in aspect_ratios]
        self.anchor_size = float(anchor_size)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ratios = cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
        if len(ratios) != 1:
            raise ValueError("OfficialAnchorGenerator takes one list of ratios for all levels")
        return {
            "strides": [s.stride for s in input_shape],
            "aspect_ratios": list(ratios[0]),
            "anchor_size": cfg.MODEL.VILD.OFFICIAL.ANCHOR_SIZE,
        }

    @property
    def num_cell_anchors(self) -> List[int]:
        return [len(self.aspect_ratios)] * len(self.strides)

    @property
    def num_anchors(self) -> List[int]:
        return self.num_cell_anchors

    def level_anchors(self, stride: int, height: int, width: int) -> torch.Tensor:
        """(height * width * A, 4) XYXY anchors of one level, in float64."""
        side = self.anchor_size * stride
        half = torch.tensor(
            [[side * math.sqrt(r) / 2.0, side / math.sqrt(r) / 2.0] for r in self.aspect_ratios],
            dtype=torch.float64,
        )  # (A, 2): half width, half height
        ys = torch.arange(height, dtype=torch.float64) * stride + stride / 2.0
        xs = torch.arange(width, dtype=torch.float64) * stride + stride / 2.0
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)[:, None, :]  # (HW, 1, 2)
        return torch.cat([centres - half, centres + half], dim=2).reshape(-1, 4)

    def forward(self, features: List[torch.Tensor]) -> List[Boxes]:
        """Per (N, C, H_l, W_l) feature map, Boxes of (H_l * W_l * A, 4) anchors."""
        return [
            Boxes(self.level_anchors(s, f.shape[-2], f.shape[-1]).to(f.device, torch.float32))
            for s, f in zip(self.strides, features)
        ]
