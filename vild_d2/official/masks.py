"""The official evaluation's mask pasting and box handling, for the official configs.

The official LVIS evaluation (``evaluation/coco_evaluator.py: LVISEvaluator.evaluate`` ->
``evaluation/coco_utils.py: convert_predictions_to_coco_annotations`` ->
``utils/mask_utils.py: paste_instance_masks``) takes the detections' boxes divided by the image
scale, as they are (not clipped to the image, none dropped), and pastes each 28 x 28 mask
probability map as Detectron (v1) did: the mask is zero-padded by one pixel, its box widened by
(M + 2) / M about its centre and truncated to integers, the padded mask resized to that box
(cv2.resize, bilinear, half-pixel centres, edges clamped), thresholded at > 0.5 and pasted into
the image, clipped to it. detectron2's ``paste_masks_in_image`` samples the mask at each image
pixel's centre inside the box instead: other pixels, worth 5-13 mask AP on small objects
(docs/OFFICIAL.md, "The official evaluation's boxes and masks"; tools/official_paste_effect.py).

Shape shorthand: N = detections, M = mask side, (H, W) = the image.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import paste_masks_in_image
from detectron2.structures import BitMasks, Boxes, Instances, ROIMasks

__all__ = [
    "OfficialROIMasks",
    "official_paste_boxes",
    "official_postprocess",
    "paste_masks_official",
]


def official_paste_boxes(boxes: torch.Tensor, mask_size: Tuple[int, int]) -> torch.Tensor:
    """(N, 4) XYXY float boxes -> (N, 4) int64 (x1, y1, x2, y2) of the official paste: the box
    as (x, y, w = x2 - x1, h = y2 - y1), widened by max((M + 2) / M) about its centre in
    float32, truncated toward zero (numpy's astype(int32))."""
    mh, mw = mask_size
    scale = max((mw + 2.0) / mw, (mh + 2.0) / mh)
    b = boxes.float()
    w_half, h_half = (b[:, 2] - b[:, 0]) * 0.5, (b[:, 3] - b[:, 1]) * 0.5
    x_c, y_c = b[:, 0] + w_half, b[:, 1] + h_half
    w_half, h_half = w_half * scale, h_half * scale
    out = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    return out.to(torch.int32).long()  # C cast: toward zero


def paste_masks_official(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> torch.Tensor:
    """
    Args:
        masks: (N, M, M) mask probabilities, each relative to its box.
        boxes: (N, 4) XYXY boxes in the image's pixels (not clipped).
        height, width: the image.
        threshold: a resized mask value must be above it (official 0.5).
    Returns:
        (N, H, W) bool.
    """
    n = len(masks)
    out = torch.zeros((n, height, width), dtype=torch.bool, device=masks.device)
    if n == 0:
        return out
    mh, mw = masks.shape[-2:]
    padded = F.pad(masks.float(), (1, 1, 1, 1))  # (N, M + 2, M + 2), zero border
    ref = official_paste_boxes(boxes.reshape(-1, 4), (mh, mw)).tolist()
    for i, (x1, y1, x2, y2) in enumerate(ref):
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        # cv2.resize INTER_LINEAR = bilinear with half-pixel centres, source edges clamped.
        resized = (
            F.interpolate(padded[i][None, None], size=(h, w), mode="bilinear", align_corners=False)[
                0, 0
            ]
            > threshold
        )
        x_0, x_1 = min(max(x1, 0), width), min(max(x2 + 1, 0), width)
        y_0, y_1 = min(max(y1, 0), height), min(max(y2 + 1, 0), height)
        if x_1 > x_0 and y_1 > y_0:
            out[i, y_0:y_1, x_0:x_1] = resized[y_0 - y1 : y_1 - y1, x_0 - x1 : x_1 - x1]
    return out


class OfficialROIMasks(ROIMasks):
    """:class:`ROIMasks` (N, M, M) pasted as the official evaluation pastes them."""

    def to(self, device) -> "OfficialROIMasks":
        return OfficialROIMasks(self.tensor.to(device))

    def __getitem__(self, item) -> "OfficialROIMasks":
        return OfficialROIMasks(super().__getitem__(item).tensor)

    def to_bitmasks(self, boxes, height, width, threshold=0.5) -> BitMasks:
        boxes = boxes.tensor if isinstance(boxes, Boxes) else boxes
        return BitMasks(paste_masks_official(self.tensor, boxes, height, width, threshold))


def official_postprocess(
    results: Instances,
    height: int,
    width: int,
    paste: str = "official",
    clip_to_image: bool = False,
    paste_now: bool = True,
) -> Instances:
    """
    ``detector_postprocess`` with the official evaluation's choices: boxes scaled from
    ``results.image_size`` to ``height`` x ``width``; clipped to the image and emptied ones
    dropped only if ``clip_to_image`` (detectron2 does; the official evaluation does not);
    masks pasted officially (``paste="official"``) or by detectron2's ``paste_masks_in_image``.

    Args:
        results: one image's detections, ``pred_masks`` (N, 1, M, M) probabilities.
        paste_now: False = keep the masks small (:class:`OfficialROIMasks` or
            :class:`ROIMasks`), pasted one at a time when used (the demo, the server).
    """
    scale_x, scale_y = width / results.image_size[1], height / results.image_size[0]
    out = Instances((height, width), **results.get_fields())
    boxes = out.pred_boxes = Boxes(out.pred_boxes.tensor.clone())  # (results left as they are)
    boxes.scale(scale_x, scale_y)
    if clip_to_image:
        boxes.clip(out.image_size)
        out = out[boxes.nonempty()]
    if out.has("pred_masks") and not isinstance(out.pred_masks, ROIMasks):
        small = out.pred_masks[:, 0, :, :]
        masks = OfficialROIMasks(small) if paste == "official" else ROIMasks(small)
        if paste_now:
            boxes = out.pred_boxes.tensor
            if paste == "official":
                masks = paste_masks_official(small, boxes, height, width)
            else:
                masks = paste_masks_in_image(small, boxes, (height, width), threshold=0.5)
        out.pred_masks = masks
    return out
