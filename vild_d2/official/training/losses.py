"""The official ViLD losses and their reductions (modeling/losses.py,
projects/vild/modeling/vild_losses.py, projects/vild/modeling/vild_model.py ``build_losses``).

``SUM_BY_NONZERO_WEIGHTS`` (tf.losses) divides the weighted sum by the number of non-zero
weight ELEMENTS (0 when there are none). TF's huber loss is 0.5 x^2 inside delta and
delta (|x| - delta / 2) outside (torch's ``huber_loss``; ``smooth_l1_loss`` is it / delta).

Shape shorthand: B = images, R = sampled RoIs of all images, M = mask samples of all images,
D = CLIP width, K + 1 = classes with the background (vild_d2's layout: background last).
"""

from typing import List

import torch
import torch.nn.functional as F

__all__ = [
    "sum_by_nonzero_weights",
    "rpn_score_loss",
    "rpn_box_loss",
    "fast_rcnn_class_loss",
    "fast_rcnn_box_loss",
    "mask_loss",
    "distillation_loss",
]


def sum_by_nonzero_weights(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(losses * weights) / count_nonzero(weights broadcast to losses), 0 if none."""
    weights = weights.to(losses.dtype).expand_as(losses)
    total = (losses * weights).sum()
    count = (weights != 0).sum()
    return total / count.clamp(min=1).to(losses.dtype) if count > 0 else total * 0.0


def rpn_score_loss(
    logits: List[torch.Tensor], targets: List[torch.Tensor], batch_size_per_image: int = 256
) -> torch.Tensor:
    """``RpnScoreLoss``: per level, sigmoid CE summed over the sampled anchors (targets 1 / 0;
    -1 ignored) / (B x ``batch_size_per_image``); summed over levels.
    logits, targets: per level (B, A_l)."""
    total = 0.0
    for x, t in zip(logits, targets):
        weights = (t == 1) | (t == 0)
        ce = F.binary_cross_entropy_with_logits(x, t.clamp(min=0).to(x.dtype), reduction="none")
        total = total + (ce * weights).sum() / float(x.shape[0] * batch_size_per_image)
    return total


def rpn_box_loss(
    deltas: List[torch.Tensor], targets: List[torch.Tensor], delta: float = 1.0 / 9
) -> torch.Tensor:
    """``RpnBoxLoss``: per level, huber(``delta``) over the coordinates whose target is not 0
    (every matched anchor, sampled or not), ``SUM_BY_NONZERO_WEIGHTS``; summed over levels.
    deltas, targets: per level (B, A_l, 4)."""
    total = 0.0
    for d, t in zip(deltas, targets):
        t = t.to(d.dtype)
        loss = F.huber_loss(d, t, reduction="none", delta=delta)
        total = total + sum_by_nonzero_weights(loss, t != 0)
    return total


def fast_rcnn_class_loss(
    logits: torch.Tensor, classes: torch.Tensor, rare: torch.Tensor = None
) -> torch.Tensor:
    """``FastrcnnClassLoss`` (ViLD's): softmax CE, mean over all sampled RoIs. ``rare``: (K+1,)
    bool, the logits multiplied by 0 (``mask_rare``: they stay in the softmax as logit 0).
    logits: (R, K+1); classes: (R,) in 0..K (K = background)."""
    if rare is not None and rare.any():
        logits = logits * (~rare).to(logits.dtype)[None]
    return F.cross_entropy(logits, classes, reduction="mean") if len(classes) else logits.sum() * 0


def fast_rcnn_box_loss(
    deltas: torch.Tensor, targets: torch.Tensor, foreground: torch.Tensor, delta: float = 1.0
) -> torch.Tensor:
    """``FastrcnnBoxLoss``: huber(``delta``) over the foreground RoIs' 4 coordinates,
    ``SUM_BY_NONZERO_WEIGHTS`` (/ 4 x foreground). (R, 4) deltas and targets, (R,) bool."""
    loss = F.huber_loss(deltas, targets.to(deltas.dtype), reduction="none", delta=delta)
    return sum_by_nonzero_weights(loss, foreground[:, None])


def mask_loss(
    logits: torch.Tensor, targets: torch.Tensor, foreground: torch.Tensor
) -> torch.Tensor:
    """``MaskrcnnLoss``: sigmoid CE with soft targets, mean over the foreground masks' pixels.
    (M, S, S) logits and targets, (M,) bool."""
    ce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return sum_by_nonzero_weights(ce, foreground[:, None, None])


def distillation_loss(
    embeddings: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``build_losses``' feature distillation (before its weight): L1 between the region
    embeddings and the L2-normalised targets, ``SUM_BY_NONZERO_WEIGHTS`` over the valid boxes'
    D elements, x D (= the mean over valid boxes of the L1 distance).
    (N, D) embeddings (normalised) and targets (raw), (N,) bool."""
    norm = targets.norm(dim=1, keepdim=True)
    safe = torch.where(norm.abs() <= 1e-8, torch.ones_like(norm), norm)
    targets = torch.where(norm.abs() <= 1e-8, torch.zeros_like(targets), targets / safe)
    loss = (embeddings - targets.to(embeddings.dtype)).abs()
    return sum_by_nonzero_weights(loss, valid[:, None]) * embeddings.shape[1]
