"""The official box coding (utils/box_utils.py): deltas in (dy, dx, dh, dw) order, widths and
heights with the "+1" convention (w = x2 - x1 + 1), centres at x1 + w / 2, a decoded box ends
at x1 + w - 1; clipping to [0, size - 1].

Boxes here are detectron2's (x1, y1, x2, y2); only the deltas keep the official order, so the
official regression layers load unchanged.
"""

import math
from typing import Sequence, Tuple

import torch

__all__ = ["OfficialBox2BoxTransform", "clip_boxes_official"]

# The official decode's cap on dh, dw (after dividing by the weights): log(1000 / 16).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class OfficialBox2BoxTransform:
    """
    A drop-in for detectron2's ``Box2BoxTransform`` (``get_deltas``, ``apply_deltas``) with the
    official coding. ``weights`` divide/multiply (dy, dx, dh, dw): (1, 1, 1, 1) for the RPN,
    (10, 10, 5, 5) for the box head.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = BBOX_XFORM_CLIP):  # fmt: skip
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    @staticmethod
    def _centres(boxes: torch.Tensor):
        w = boxes[:, 2] - boxes[:, 0] + 1.0
        h = boxes[:, 3] - boxes[:, 1] + 1.0
        return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h

    def get_deltas(self, src_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4) anchors/proposals and (N, 4) targets, XYXY -> (N, 4) (dy, dx, dh, dw)."""
        sx, sy, sw, sh = self._centres(src_boxes)
        tx, ty, tw, th = self._centres(target_boxes.to(src_boxes.dtype))
        wy, wx, wh, ww = self.weights
        deltas = torch.stack(
            [wy * (ty - sy) / sh, wx * (tx - sx) / sw, wh * torch.log(th / sh),
             ww * torch.log(tw / sw)], dim=1,
        )  # fmt: skip
        return deltas

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4k) deltas (dy, dx, dh, dw per box) on (N, 4) XYXY boxes -> (N, 4k) XYXY."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        x, y, w, h = self._centres(boxes)
        wy, wx, wh, ww = self.weights
        dy = deltas[:, 0::4] / wy
        dx = deltas[:, 1::4] / wx
        dh = torch.clamp(deltas[:, 2::4] / wh, max=self.scale_clamp)
        dw = torch.clamp(deltas[:, 3::4] / ww, max=self.scale_clamp)
        cy = dy * h[:, None] + y[:, None]
        cx = dx * w[:, None] + x[:, None]
        ph = torch.exp(dh) * h[:, None]
        pw = torch.exp(dw) * w[:, None]
        y1 = cy - 0.5 * ph
        x1 = cx - 0.5 * pw
        out = torch.stack([x1, y1, x1 + pw - 1.0, y1 + ph - 1.0], dim=2)  # (N, k, 4)
        return out.reshape(deltas.shape)


def clip_boxes_official(boxes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Clip (..., 4) XYXY ``boxes`` to [0, W - 1] x [0, H - 1], ``size`` = (H, W)."""
    h, w = size
    limits = boxes.new_tensor([w - 1.0, h - 1.0, w - 1.0, h - 1.0])
    return torch.minimum(boxes, limits).clamp(min=0.0)
