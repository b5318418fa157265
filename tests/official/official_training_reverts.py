"""Each official training rule turned back to detectron2's behaviour (issue 28, "the test can
fail"): contexts for :func:`official_training_harness.run_step`, which reruns the losses under
each of them and records the loss figure that broke."""

import contextlib
from typing import Dict, Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from official_training_harness import LOSSES, forward_losses
from vild_d2.official.rpn import OfficialRPN
from vild_d2.official.training import official_l2_loss, roi_training


# --- "the test can fail": each official rule turned back to detectron2's -----------------------
def _d2_box_loss(deltas, targets, foreground, delta=1.0):
    """detectron2's FastRCNNOutputLayers box loss: smooth L1 over the foreground / all RoIs."""
    loss = F.smooth_l1_loss(deltas[foreground], targets[foreground], beta=delta, reduction="sum")
    return loss / max(1, len(deltas))


def _d2_distillation(embeddings, targets, valid):
    """A plain mean absolute error over every element (no x 512, padded rows counted)."""
    return F.l1_loss(embeddings, F.normalize(targets, dim=1, eps=1e-8), reduction="mean")


def _d2_rpn_losses(original):
    def losses(self, anchors, logits, gt_labels, deltas, gt_boxes):
        out = original(self, anchors, logits, gt_labels, deltas, gt_boxes)
        positive = torch.stack(gt_labels) == 1
        d, t = torch.cat(deltas, dim=1), torch.stack(gt_boxes)
        # detectron2: the sampled positives only, / (images x 256).
        loss = F.smooth_l1_loss(d[positive], t[positive], beta=self.smooth_l1_beta, reduction="sum")
        out["loss_rpn_loc"] = loss / (self.batch_size_per_image * len(gt_labels))
        return out

    return losses


@contextlib.contextmanager
def revert(name: str, model) -> Iterator[None]:
    """A context in which the official rule ``name`` (one of :data:`REVERTS`) is detectron2's."""
    if name == "box_loss_reduction":
        with mock.patch.object(roi_training, "fast_rcnn_box_loss", _d2_box_loss):
            yield
    elif name == "rpn_normaliser":
        with mock.patch.object(OfficialRPN, "losses", _d2_rpn_losses(OfficialRPN.losses)):
            yield
    elif name == "rare_masking":
        with mock.patch.object(model.roi_heads.official_training, "mask_rare", False):
            yield
    elif name == "distillation_normalisation":
        with mock.patch.object(roi_training, "distillation_loss", _d2_distillation):
            yield
    else:
        raise KeyError(name)


REVERTS = (
    "box_loss_reduction",
    "rpn_normaliser",
    "rare_masking",
    "distillation_normalisation",
    "weight_decay_on_biases",
)


@torch.no_grad()
def reverted_figures(model, cfg, features, canvas, targets, distill, common, ref) -> Dict:
    """Per revert: the worst relative loss difference from the fixture (the model's buffers are
    restored after)."""
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    out = {}
    try:
        for name in REVERTS[:-1]:
            with revert(name, model):
                losses, _, _, _ = forward_losses(
                    model,
                    {k: f.detach() for k, f in features.items()},
                    canvas,
                    targets,
                    distill,
                    common,
                    ref,
                )
            worst = ("", 0.0)
            for key, ours_key, _ in LOSSES:
                ours = float(losses[ours_key])
                if key == "loss_distill":
                    ours /= model.roi_heads.distill_weight
                rel = abs(ours - float(ref[key])) / max(abs(float(ref[key])), 1e-30)
                worst = max(worst, (key, rel), key=lambda kv: kv[1])
            out[name] = worst
    finally:
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    # detectron2's default WEIGHT_DECAY_BIAS follows WEIGHT_DECAY: biases in the L2 term too.
    wd = cfg.SOLVER.WEIGHT_DECAY
    biases = [
        m.bias
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))
        and m.bias is not None
    ]
    l2 = float(official_l2_loss(model, wd)) + float(
        wd * sum((b.double() ** 2).sum() for b in biases) / 2
    )
    out["weight_decay_on_biases"] = (
        "loss_l2",
        abs(l2 - float(ref["loss_l2"])) / float(ref["loss_l2"]),
    )
    return out
