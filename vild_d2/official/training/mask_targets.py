"""The official mask targets: soft, never binarised.

* The parser (projects/vild/dataloader/vild_parser.py ``_parse_train_data``) crops each
  ground-truth mask at its box to 112 x 112 with ``tf.image.crop_and_resize`` (bilinear,
  corner-aligned samples, 0 outside the image): :func:`crop_gt_masks`.
* The model (ops/spatial_transform_ops.py ``crop_mask_in_target_box``) pads that crop by 2
  zero pixels and resamples it at the RoI, 28 x 28, one bilinear sample per bin centre:
  :func:`crop_mask_in_target_box`.

The official parser crops the mask of the original image at the ground-truth box mapped back
to it; here the crop is taken from the mask as the mapper gives it (after the resize).
"""

import torch
from detectron2.structures import BitMasks, PolygonMasks

__all__ = ["crop_gt_masks", "crop_mask_in_target_box"]

_EPS = 1e-8


def crop_gt_masks(masks, boxes: torch.Tensor, size: int = 112) -> torch.Tensor:
    """
    ``tf.image.crop_and_resize`` of each mask at its box, as the official parser.

    Args:
        masks: detectron2 BitMasks / PolygonMasks of G instances, or a (G, H, W) tensor, in the
            network input's pixels.
        boxes: (G, 4) XYXY boxes in the same pixels.
    Returns:
        (G, size, size) float32 soft masks.
    """
    if isinstance(masks, PolygonMasks):
        raise TypeError("crop_gt_masks needs rasterised masks: give BitMasks or a tensor")
    tensor = masks.tensor if isinstance(masks, BitMasks) else masks
    tensor = tensor.float()
    g, h, w = tensor.shape
    if g == 0:
        return tensor.new_zeros(0, size, size)
    boxes = boxes.float()
    # normalize_boxes divides by (H, W); crop_and_resize then samples
    # y1n * (H - 1) + i * (y2n - y1n) * (H - 1) / (size - 1).
    steps = torch.arange(size, dtype=torch.float32, device=tensor.device)
    y1n, y2n = boxes[:, 1] / h, boxes[:, 3] / h
    x1n, x2n = boxes[:, 0] / w, boxes[:, 2] / w
    ys = y1n[:, None] * (h - 1) + steps[None] * ((y2n - y1n) * (h - 1) / (size - 1))[:, None]
    xs = x1n[:, None] * (w - 1) + steps[None] * ((x2n - x1n) * (w - 1) / (size - 1))[:, None]
    return _sample(tensor, ys, xs, extrapolate_zero=True)


def _sample(tensor, ys, xs, extrapolate_zero: bool, bound_y=None, bound_x=None):
    """Bilinear samples of (M, H, W) at rows (M, S) x columns (M, T).

    ``extrapolate_zero``: crop_and_resize's rule (a sample outside [0, H - 1] is 0; inside,
    corners floor / ceil). Otherwise the official crop-and-resize grid rule: corners
    floor(y) clamped to [0, bound], y0 + 1 clamped to bound, weight y - y0."""
    m, h, w = tensor.shape
    b = torch.arange(m, device=tensor.device)[:, None, None]
    if extrapolate_zero:
        y0, x0 = torch.floor(ys), torch.floor(xs)
        y1, x1 = torch.ceil(ys), torch.ceil(xs)
        ly, lx = ys - y0, xs - x0
        inside = ((ys >= 0) & (ys <= h - 1))[:, :, None] & ((xs >= 0) & (xs <= w - 1))[:, None, :]
        y0, y1 = y0.clamp(0, h - 1).long(), y1.clamp(0, h - 1).long()
        x0, x1 = x0.clamp(0, w - 1).long(), x1.clamp(0, w - 1).long()
    else:
        y0 = torch.floor(ys).clamp(min=0.0).clamp(max=float(bound_y))
        x0 = torch.floor(xs).clamp(min=0.0).clamp(max=float(bound_x))
        y1, x1 = (y0 + 1).clamp(max=float(bound_y)), (x0 + 1).clamp(max=float(bound_x))
        ly, lx = ys - y0, xs - x0
        y0, y1, x0, x1 = y0.long(), y1.long(), x0.long(), x1.long()
        inside = None

    def at(yy, xx):
        return tensor[b, yy[:, :, None], xx[:, None, :]]

    wy, wx = ly[:, :, None], lx[:, None, :]
    top = at(y0, x0) + (at(y0, x1) - at(y0, x0)) * wx
    if not extrapolate_zero:  # the official kernel form: sum of the four weighted corners
        top = (1 - wy) * (1 - wx) * at(y0, x0) + (1 - wy) * wx * at(y0, x1)
        return top + wy * (1 - wx) * at(y1, x0) + wy * wx * at(y1, x1)
    bottom = at(y1, x0) + (at(y1, x1) - at(y1, x0)) * wx
    out = top + (bottom - top) * wy
    return torch.where(inside, out, torch.zeros_like(out))


def crop_mask_in_target_box(
    masks: torch.Tensor, gt_boxes: torch.Tensor, rois: torch.Tensor, size: int = 28
) -> torch.Tensor:
    """
    Args:
        masks: (M, S, S) the parser's crops (S = 112) of the matched ground truths.
        gt_boxes: (M, 4) their boxes, XYXY; rois: (M, 4) the sampled RoIs, XYXY.
    Returns:
        (M, size, size) soft targets.
    """
    m, height, width = masks.shape
    padded = torch.nn.functional.pad(masks.float(), (2, 2, 2, 2))
    gx1, gy1, gx2, gy2 = gt_boxes.float().unbind(1)
    bx1, by1, bx2, by2 = rois.float().unbind(1)
    # The official code scales both offsets by the mask's height (square crops).
    y = (by1 - gy1) * height / (gy2 - gy1 + _EPS) + 2
    x = (bx1 - gx1) * height / (gx2 - gx1 + _EPS) + 2
    h = (by2 - by1) * width / (gy2 - gy1 + _EPS)
    w = (bx2 - bx1) * width / (gx2 - gx1 + _EPS)
    offsets = torch.arange(size, dtype=torch.float32, device=masks.device) + 0.5
    ys = y[:, None] + offsets[None] * h[:, None] / size
    xs = x[:, None] + offsets[None] * w[:, None] / size
    return _sample(padded, ys, xs, False, height + 3, width + 3)
