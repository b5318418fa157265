"""The official RPN targets (dataloader/anchor.py ``RpnAnchorLabeler``, with
utils/object_detection ``ArgMaxMatcher``, ``IouSimilarity``, ``FasterRcnnBoxCoder``).

Per image, over the anchors of all levels (P2..P6, the official (y, x, ratio) order):

* IoU (no "+1"; 0 where boxes do not intersect) of every ground-truth box with every anchor;
* match: the best ground truth per anchor (first on ties) if IoU >= 0.7; < 0.3 negative;
  in between ignored; then every ground truth forces its best anchor (first on ties; an anchor
  forced by several ground truths takes the first of them), whatever the IoU;
* box targets for every MATCHED anchor (not only the sampled ones): (dy, dx, dh, dw) without
  the "+1", weights (1, 1, 1, 1), 1e-8 added to every height and width; 0 elsewhere;
* score targets: 256 sampled (at most half positive, :func:`balanced_subsample`):
  1 positive, 0 negative, -1 not sampled.

detectron2's RPN differs: its low-quality matches keep every tied anchor, its sampler draws
with torch's generator, and its box loss only covers the sampled positives.
"""

from typing import Tuple

import torch

from .sampling import Shuffler, balanced_subsample

__all__ = ["official_iou", "official_anchor_match", "encode_rpn_targets", "official_rpn_targets"]

_EPS = 1e-8


def official_iou(gt: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(G, 4), (A, 4) XYXY -> (G, A) IoU as box_list_ops.iou (0 where no intersection)."""
    gx1, gy1, gx2, gy2 = gt.unbind(1)
    bx1, by1, bx2, by2 = boxes.unbind(1)
    ih = (torch.minimum(gy2[:, None], by2[None]) - torch.maximum(gy1[:, None], by1[None])).clamp(
        min=0
    )
    iw = (torch.minimum(gx2[:, None], bx2[None]) - torch.maximum(gx1[:, None], bx1[None])).clamp(
        min=0
    )
    inter = ih * iw
    union = ((gy2 - gy1) * (gx2 - gx1))[:, None] + ((by2 - by1) * (bx2 - bx1))[None] - inter
    return torch.where(inter == 0, torch.zeros_like(inter), inter / union)


def official_anchor_match(iou: torch.Tensor, high: float = 0.7, low: float = 0.3) -> torch.Tensor:
    """(G, A) IoU -> (A,) int64 match: ground-truth index, -1 negative, -2 ignored."""
    num_gt, num_anchors = iou.shape
    if num_gt == 0:
        return torch.full((num_anchors,), -1, dtype=torch.int64, device=iou.device)
    vals, matches = iou.max(dim=0)  # torch's max returns the first index of the maximum
    matches = torch.where(vals < low, torch.full_like(matches, -1), matches)
    matches = torch.where((vals >= low) & (vals < high), torch.full_like(matches, -2), matches)
    forced = iou.argmax(dim=1)  # (G,) each ground truth's best anchor, first on ties
    onehot = torch.zeros_like(iou, dtype=torch.bool)
    onehot[torch.arange(num_gt, device=iou.device), forced] = True
    # An anchor forced by several ground truths takes the first of them.
    return torch.where(onehot.any(dim=0), onehot.long().argmax(dim=0), matches)


def encode_rpn_targets(gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """FasterRcnnBoxCoder (no scale factors): (A, 4) matched gt and anchors XYXY ->
    (A, 4) (dy, dx, dh, dw)."""
    ha = anchors[:, 3] - anchors[:, 1]
    wa = anchors[:, 2] - anchors[:, 0]
    yca, xca = anchors[:, 1] + ha / 2.0, anchors[:, 0] + wa / 2.0
    h = gt[:, 3] - gt[:, 1]
    w = gt[:, 2] - gt[:, 0]
    yc, xc = gt[:, 1] + h / 2.0, gt[:, 0] + w / 2.0
    ha, wa, h, w = ha + _EPS, wa + _EPS, h + _EPS, w + _EPS
    return torch.stack([(yc - yca) / ha, (xc - xca) / wa, torch.log(h / ha), torch.log(w / wa)], 1)


def official_rpn_targets(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    shuffle: Shuffler,
    *,
    high: float = 0.7,
    low: float = 0.3,
    batch_size: int = 256,
    positive_fraction: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    One image.

    Args:
        anchors: (A, 4) XYXY, all levels concatenated.
        gt_boxes: (G, 4) XYXY (non-empty boxes only, as the official parser keeps).
        shuffle: the anchor sampler's random choices (two calls).
    Returns:
        score targets (A,) int64 in {1, 0, -1}, box targets (A, 4) (dy, dx, dh, dw).
    """
    anchors = anchors.float()
    gt_boxes = gt_boxes.to(anchors)
    matches = official_anchor_match(official_iou(gt_boxes, anchors), high, low)
    matched = matches >= 0
    box_targets = anchors.new_zeros(anchors.shape)
    if matched.any():
        box_targets[matched] = encode_rpn_targets(gt_boxes[matches[matched]], anchors[matched])
    sampled = balanced_subsample(matches > -2, matched, batch_size, positive_fraction, shuffle)
    scores = torch.full_like(matches, -1)
    scores[sampled & matched] = 1
    scores[sampled & ~matched] = 0
    return scores, box_targets
