"""The official RoI pooling (ops/spatial_transform_ops.py ``multilevel_crop_and_resize``).

Per box (x1, y1, x2, y2) in input pixels: level = floor(log2(sqrt(w * h) / 224)) + 4 with
w = x2 - x1, h = y2 - y1 (no "+1", no minimum size), clamped to the pooled levels; on that
level (stride s) the S x S output bin (i, j) is ONE bilinear sample at
(y1/s + (i + 0.5) * (h/s) / S, x1/s + (j + 0.5) * (w/s) / S). Sample corners: y0 = floor(y)
clamped to [0, H_l - 1], y1 = min(y0 + 1, H_l - 1), weight of y1 = y - y0 (so a sample beyond
the last row reads the last row, and one at y < 0 extrapolates from rows 0 and 1, as TF does).
detectron2's ROIAlign (aligned or not) differs: other level rule and levels, 2x2 samples per bin
(sampling ratio 0 = adaptive), a minimum RoI size of 1 when not aligned, a -0.5 shift when aligned.
"""

import math
from typing import List

import torch
from detectron2.structures import Boxes
from torch import nn

__all__ = ["OfficialROIPooler", "official_roi_levels"]

# log(2) in float32, as TF's tf.log(2.0): the level's floor is taken on a float32 quotient.
_LOG2 = torch.tensor(2.0).log()


def official_roi_levels(boxes: torch.Tensor, min_level: int, max_level: int) -> torch.Tensor:
    """(R, 4) XYXY boxes -> (R,) int64 pyramid levels of the official rule."""
    boxes = boxes.float()
    area_sqrt = torch.sqrt((boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0]))
    levels = torch.floor(torch.log(area_sqrt / 224.0) / _LOG2.to(boxes.device)) + 4.0
    # An empty box (log 0 = -inf) or a NaN goes to the finest level, as TF's int cast + clamp.
    levels = torch.nan_to_num(levels, nan=min_level, neginf=min_level, posinf=max_level)
    return levels.clamp(min_level, max_level).long()


class OfficialROIPooler(nn.Module):
    """A drop-in for detectron2's ``ROIPooler`` with the official multilevel crop-and-resize."""

    def __init__(self, output_size: int, scales: List[float]):
        """
        Args:
            output_size: S (7 for boxes, 14 for masks).
            scales: 1 / stride of each feature map, finest first (1/4 .. 1/64), consecutive
                levels.
        """
        super().__init__()
        self.output_size = int(output_size)
        levels = [-math.log2(s) for s in scales]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels):
            raise ValueError(f"feature scales must be powers of 2, got {scales}")
        self.min_level, self.max_level = int(round(levels[0])), int(round(levels[-1]))
        if [round(lv) for lv in levels] != list(range(self.min_level, self.max_level + 1)):
            raise ValueError(f"feature scales must be consecutive levels, got {scales}")

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """
        Args:
            x: per level (N, C, H_l, W_l).
            box_lists: per image Boxes (R_i, 4) in input pixels.
        Returns:
            (sum R_i, C, S, S), boxes in image order.
        """
        boxes = torch.cat([b.tensor for b in box_lists]).float()
        image_index = torch.cat(
            [torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(box_lists)]
        ).to(boxes.device)
        channels, size = x[0].shape[1], self.output_size
        out = x[0].new_zeros(len(boxes), channels, size, size)
        if len(boxes) == 0:
            return out
        levels = official_roi_levels(boxes, self.min_level, self.max_level)
        for k, feature in enumerate(x):
            idx = torch.nonzero(levels == self.min_level + k).squeeze(1)
            if idx.numel():
                scale = 2.0 ** (self.min_level + k)
                out[idx] = self._crop(feature, boxes[idx], scale, image_index[idx])
        return out

    def _crop(self, feature, boxes, scale: float, image_index):
        """(N, C, H, W) level of stride ``scale``, (R, 4) boxes in input pixels, (R,) image
        indices -> (R, C, S, S)."""
        size = self.output_size
        offsets = torch.arange(size, dtype=boxes.dtype, device=boxes.device) + 0.5
        height, width = feature.shape[-2:]
        # The official float32 operation order: w = (x2 - x1) / s, grid x1 / s + (i + 0.5) * w / S.
        w = (boxes[:, 2] - boxes[:, 0]) / scale
        h = (boxes[:, 3] - boxes[:, 1]) / scale
        gx = boxes[:, 0:1] / scale + offsets[None] * w[:, None] / size  # (R, S)
        gy = boxes[:, 1:2] / scale + offsets[None] * h[:, None] / size
        x0, x1, lx = self._corners(gx, width)
        y0, y1, ly = self._corners(gy, height)
        b = image_index[:, None, None]
        f = feature.permute(0, 2, 3, 1)  # (N, H, W, C): gathers give (R, S, S, C)

        def at(yy, xx):
            return f[b, yy[:, :, None], xx[:, None, :]]

        wy1, wx1 = ly[:, :, None, None], lx[:, None, :, None]
        wy0, wx0 = 1.0 - wy1, 1.0 - wx1
        out = (wy0 * wx0 * at(y0, x0) + wy0 * wx1 * at(y0, x1)
               + wy1 * wx0 * at(y1, x0) + wy1 * wx1 * at(y1, x1))  # fmt: skip
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def _corners(grid: torch.Tensor, limit: int):
        bound = float(limit - 1)
        lo = torch.floor(grid).clamp(min=0.0).clamp(max=bound)
        hi = torch.clamp(lo + 1.0, max=bound)
        return lo.long(), hi.long(), grid - lo
