"""The official RPN (modeling/architecture/heads.py RpnHead, ops/roi_ops.py).

Head: two 3x3 convs (with bias) shared by all levels, each followed by a batch norm OF ITS
LEVEL and a ReLU, then 1x1 convs for A objectness logits and 4A deltas (dy, dx, dh, dw per
anchor). Proposals, per level: sigmoid, decode (official coding), clip to [0, size - 1], top
``pre_nms_topk`` by score, NMS, at most ``post_nms_topk`` kept; then the top ``post_nms_topk`` of
all levels. No minimum box size, and no empty-box filter (detectron2 drops empty boxes).
"""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, nms
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
from detectron2.structures import Boxes, Instances
from torch import nn

from .box_coding import OfficialBox2BoxTransform, clip_boxes_official
from .layers import norm_from_config
from .training.anchor_labels import official_rpn_targets
from .training.losses import rpn_box_loss, rpn_score_loss
from .training.sampling import Shuffler

__all__ = ["OfficialRPNHead", "OfficialRPN", "official_rpn_proposals"]


@RPN_HEAD_REGISTRY.register()
class OfficialRPNHead(nn.Module):
    """Shared convs, per-level norms (MODEL.RPN.HEAD_NAME "OfficialRPNHead")."""

    @configurable
    def __init__(self, *, in_channels: int, num_anchors: int, num_levels: int, norm,
                 num_convs: int = 2):  # fmt: skip
        """
        Args:
            in_channels: FPN width C.
            num_anchors: A, anchors per location.
            num_levels: feature maps (P2..P6: 5), one set of norms each.
            norm: ``channels -> module`` factory (:func:`official_norm`).
            num_convs: shared 3x3 convs (2).
        """
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(num_convs)
        )
        # norms[level][conv]: the official names rpn-l{level}-bn, rpn-l{level}-bn-{i}.
        self.norms = nn.ModuleList(
            nn.ModuleList(norm(in_channels) for _ in range(num_convs)) for _ in range(num_levels)
        )
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for layer in [*self.convs, self.objectness_logits, self.anchor_deltas]:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"RPN inputs must have equal channels, got {channels}")
        anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        return {
            "in_channels": channels.pop(),
            "num_anchors": anchors[0],
            "num_levels": len(input_shape),
            "norm": norm_from_config(cfg),
        }

    def forward(
        self, features: List[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per level (N, C, H, W) -> objectness (N, A, H, W) and deltas (N, 4A, H, W)."""
        logits, deltas = [], []
        for x, norms in zip(features, self.norms):
            for conv, norm in zip(self.convs, norms):
                x = F.relu(norm(conv(x)))
            logits.append(self.objectness_logits(x))
            deltas.append(self.anchor_deltas(x))
        return logits, deltas


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores``, ties in index order (tf.nn.top_k's)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def official_rpn_proposals(
    proposals: List[torch.Tensor],
    logits: List[torch.Tensor],
    clip_sizes: List[Tuple[int, int]],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
) -> List[Instances]:
    """
    Args:
        proposals: per level (N, Hi*Wi*A, 4) decoded XYXY boxes.
        logits: per level (N, Hi*Wi*A) objectness logits.
        clip_sizes: per image (H, W): boxes are clipped to [0, W - 1] x [0, H - 1].
    Returns:
        per image Instances (``proposal_boxes``, ``objectness_logits``), sorted by score, at
        most ``post_nms_topk``.
    """
    results = []
    for i, size in enumerate(clip_sizes):
        boxes_all, logits_all = [], []
        for boxes_l, logits_l in zip(proposals, logits):
            boxes = clip_boxes_official(boxes_l[i], size)
            # The official order: by sigmoid score (float32; saturated scores tie), ties by
            # index, as tf.nn.top_k; NMS then visits the boxes in exactly that order.
            idx = _stable_top(torch.sigmoid(logits_l[i]), pre_nms_topk)
            boxes = boxes[idx]
            rank = torch.arange(len(idx), 0, -1, dtype=torch.float32, device=boxes.device)
            keep = nms(boxes, rank, nms_thresh)
            # The official padded NMS takes a box whose coordinates are all <= 0 for padding.
            keep = keep[(boxes[keep] > 0).any(dim=1)][:post_nms_topk]
            boxes_all.append(boxes[keep])
            logits_all.append(logits_l[i][idx[keep]])
        boxes, image_logits = torch.cat(boxes_all), torch.cat(logits_all)
        idx = _stable_top(torch.sigmoid(image_logits), post_nms_topk)
        inst = Instances(size)
        inst.proposal_boxes = Boxes(boxes[idx])
        inst.objectness_logits = image_logits[idx]
        results.append(inst)
    return results


@PROPOSAL_GENERATOR_REGISTRY.register()
class OfficialRPN(RPN):
    """detectron2's RPN with the official box coding and proposal selection
    (MODEL.PROPOSAL_GENERATOR.NAME "OfficialRPN"). Boxes are clipped to the ImageList's
    ``image_sizes``: the official meta-architecture gives the padded canvas there.

    With ``official_training`` (MODEL.VILD.OFFICIAL.TRAINING), the anchor targets and losses are
    the official ones (vild_d2/official/training: anchor_labels.py, losses.py), the sampler's
    random choices drawn from ``self.shuffler``; otherwise detectron2's."""

    @configurable
    def __init__(self, *, official_training: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.official_training = official_training
        self.shuffler = Shuffler()

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret["box2box_transform"] = OfficialBox2BoxTransform(cfg.MODEL.RPN.BBOX_REG_WEIGHTS)
        ret["official_training"] = cfg.MODEL.VILD.OFFICIAL.TRAINING
        return ret

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        if not self.official_training:
            return super().label_and_sample_anchors(anchors, gt_instances)
        anchors = Boxes.cat(anchors).tensor
        labels, targets = [], []
        for inst in gt_instances:
            scores, deltas = official_rpn_targets(
                anchors, inst.gt_boxes.tensor, self.shuffler,
                high=self.anchor_matcher.thresholds[-2], low=self.anchor_matcher.thresholds[1],
                batch_size=self.batch_size_per_image, positive_fraction=self.positive_fraction,
            )  # fmt: skip
            self.shuffler.log("rpn_score_targets", scores)
            labels.append(scores)
            targets.append(deltas)
        return labels, targets

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        if not self.official_training:
            return super().losses(
                anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes
            )
        sizes = [x.shape[1] for x in pred_objectness_logits]
        labels = torch.stack(gt_labels).split(sizes, dim=1)
        targets = torch.stack(gt_boxes).split(sizes, dim=1)  # the box targets (deltas)
        losses = {
            "loss_rpn_cls": rpn_score_loss(
                pred_objectness_logits, labels, self.batch_size_per_image
            ),  # fmt: skip
            "loss_rpn_loc": rpn_box_loss(pred_anchor_deltas, targets, self.smooth_l1_beta),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        with torch.no_grad():
            proposals = self._decode_proposals(anchors, pred_anchor_deltas)
            return official_rpn_proposals(
                proposals,
                pred_objectness_logits,
                image_sizes,
                self.nms_thresh,
                self.pre_nms_topk[self.training],
                self.post_nms_topk[self.training],
            )
