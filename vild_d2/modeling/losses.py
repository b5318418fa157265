"""ViLD's two rules beyond detectron2's Fast R-CNN: the L1 distillation loss (ViLD-image) and
the ensemble's geometric mean of the two branches' scores (ViLD-ensemble).

Shape shorthand: M = distillation boxes, N = RoIs, D = CLIP embedding width, K = classes.
"""

import torch
import torch.nn.functional as F

from .text_classifier import NORM_EPS

__all__ = ["distillation_loss", "ensemble_scores"]


def distillation_loss(region_embeddings, clip_embeddings, normalize_targets: bool = True):
    """
    L1 distance between region embeddings and CLIP image embeddings, summed over D and
    averaged over the boxes (ViLD-image).

    Args:
        region_embeddings: (M, D), L2-normalised.
        clip_embeddings: (M, D) targets, any norm (normalised here unless
            ``normalize_targets`` is False: targets already unit, e.g. a teacher's embeddings,
            which a second normalisation would move by a rounding).
    Returns:
        scalar; 0 (with a graph) when M == 0.
    """
    if region_embeddings.shape[0] == 0:
        return region_embeddings.sum() * 0.0
    # float32 even under autocast: a sum over D of small differences.
    targets = clip_embeddings.float()
    if normalize_targets:
        targets = F.normalize(targets, dim=1, eps=NORM_EPS)
    return (region_embeddings.float() - targets).abs().sum(dim=1).mean()


def ensemble_scores(text_probs, image_probs, is_base, ensemble_lambda):
    """
    ViLD-ensemble's geometric mean: base classes lean on the text branch, novel on the image one.

    Args:
        text_probs: (N, K) text-branch probabilities (background dropped, not renormalised).
        image_probs: (N, K) image-branch probabilities (softmax over the K classes).
        is_base: (K,) bool.
        ensemble_lambda: the exponent lambda (2/3 in the paper).
    Returns:
        (N, K) scores.
    """
    lam = ensemble_lambda
    base = text_probs.pow(lam) * image_probs.pow(1 - lam)
    novel = text_probs.pow(1 - lam) * image_probs.pow(lam)
    return torch.where(is_base, base, novel)
