"""The official RoI sampling (ops/target_ops.py ``assign_and_sample_proposals``,
``box_matching``; utils/box_utils.py ``bbox_overlap``) and mask sampling
(``sample_and_crop_foreground_masks``).

Per image, the candidates are the RPN's ``post_nms_topk`` proposals (zero boxes where fewer
were kept) followed by the ground-truth slots padded to ``max_instances`` with -1 boxes:

* IoU with the valid ground truths (+1e-8 in the union; -1 against a padded one); the padded
  candidate boxes have IoU 0, so they are background candidates and get sampled;
* foreground: IoU > 0.5 (strictly); background: 0 <= IoU < 0.5; IoU exactly 0.5 is neither;
* :func:`static_balanced_subsample`: 512, at most a quarter foreground;
* the sampled RoIs are returned in candidate order (a ``top_k`` of the 0/1 indicator);
* masks: the first 128 foreground RoIs in that order (background RoIs fill a short list).

detectron2's ``label_and_sample_proposals`` appends only the valid ground truths, takes
IoU >= 0.5 as foreground, and returns foreground first, each group in random order.
"""

from typing import NamedTuple

import torch

from .sampling import Shuffler, static_balanced_subsample

__all__ = ["SampledRois", "bbox_overlap", "official_sample_rois", "first_foreground"]


class SampledRois(NamedTuple):
    """Per image, K = samples: ``rois`` (K, 4) XYXY, ``gt_boxes`` (K, 4) matched ground truth
    (zeros where unmatched), ``gt_classes`` (K,) official classes (0 = background, 1.. =
    dataset class + 1), ``gt_indices`` (K,) matched ground-truth slot (0 for background, -1
    where nothing overlaps), ``indices`` (K,) candidate indices."""

    rois: torch.Tensor
    gt_boxes: torch.Tensor
    gt_classes: torch.Tensor
    gt_indices: torch.Tensor
    indices: torch.Tensor


def bbox_overlap(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(N, 4), (G, 4) XYXY -> (N, G) IoU as utils/box_utils.py ``bbox_overlap``: -1 against a
    padded ground truth (all coordinates < 0)."""
    bx1, by1, bx2, by2 = (c[:, None] for c in boxes.unbind(1))
    gx1, gy1, gx2, gy2 = (c[None] for c in gt.unbind(1))
    inter = (torch.minimum(bx2, gx2) - torch.maximum(bx1, gx1)).clamp(min=0) * (
        torch.minimum(by2, gy2) - torch.maximum(by1, gy1)
    ).clamp(min=0)
    union = (by2 - by1) * (bx2 - bx1) + (gy2 - gy1) * (gx2 - gx1) - inter + 1e-8
    iou = inter / union
    invalid = (gt.amax(dim=1) < 0)[None].expand_as(iou)
    return torch.where(invalid, -torch.ones_like(iou), iou)


def official_sample_rois(
    proposals: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    shuffle: Shuffler,
    *,
    num_proposals: int = 1000,
    max_instances: int = 300,
    num_samples: int = 512,
    fg_fraction: float = 0.25,
    fg_thresh: float = 0.5,
    bg_hi: float = 0.5,
    bg_lo: float = 0.0,
) -> SampledRois:
    """
    One image.

    Args:
        proposals: (P, 4) XYXY, P <= ``num_proposals`` (zero boxes are appended up to it).
        gt_boxes: (G, 4) XYXY; gt_classes: (G,) dataset classes 0..K-1 (official: +1).
        shuffle: the RoI sampler's random choice (one call, a permutation of
            ``num_proposals + max_instances``).
    """
    if len(gt_boxes) > max_instances:
        raise ValueError(
            f"{len(gt_boxes)} ground-truth boxes in an image; the official path pads "
            f"to MODEL.VILD.OFFICIAL.MAX_INSTANCES = {max_instances}"
        )
    if len(proposals) > num_proposals:
        raise ValueError(f"{len(proposals)} proposals, more than {num_proposals}")
    dev = proposals.device
    props = torch.zeros(num_proposals, 4, device=dev)
    props[: len(proposals)] = proposals.float()
    gt = torch.full((max_instances, 4), -1.0, device=dev)
    gt[: len(gt_boxes)] = gt_boxes.float()
    classes = torch.full((max_instances,), -1, dtype=torch.int64, device=dev)
    classes[: len(gt_classes)] = gt_classes.long() + 1
    boxes = torch.cat([props, gt])

    iou = bbox_overlap(boxes, gt)
    matched_iou, argmax = iou.max(dim=1)  # first maximum, as tf.argmax
    unmatched = matched_iou <= 0.0
    matched_boxes = torch.where(unmatched[:, None], torch.zeros_like(boxes), gt[argmax])
    matched_classes = torch.where(unmatched, torch.zeros_like(argmax), classes[argmax])
    matched_indices = torch.where(unmatched, torch.full_like(argmax, -1), argmax)
    positive = matched_iou > fg_thresh
    negative = (matched_iou >= bg_lo) & (matched_iou < bg_hi)
    ignored = matched_iou < 0.0
    matched_classes = torch.where(negative, torch.zeros_like(matched_classes), matched_classes)
    matched_indices = torch.where(negative, torch.zeros_like(matched_indices), matched_indices)
    candidates = (positive | negative) & ~ignored
    sampled = static_balanced_subsample(candidates, positive, num_samples, fg_fraction, shuffle)
    idx = first_true(sampled, num_samples)
    return SampledRois(
        boxes[idx], matched_boxes[idx], matched_classes[idx], matched_indices[idx], idx
    )


def first_true(flags: torch.Tensor, k: int) -> torch.Tensor:
    """``tf.nn.top_k`` of a 0/1 vector: the True indices ascending, then the False ones."""
    order = torch.sort((~flags).to(torch.uint8), stable=True).indices
    return order[:k]


def first_foreground(gt_classes: torch.Tensor, k: int = 128) -> torch.Tensor:
    """(K,) sampled classes -> (k,) indices of the masks' RoIs: the first ``k`` foreground RoIs
    in sampled order (background ones after them when there are fewer)."""
    return first_true(gt_classes > 0, k)
