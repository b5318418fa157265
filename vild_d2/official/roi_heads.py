"""The official ViLD RoI heads: ``OfficialViLDROIHeads`` (MODEL.ROI_HEADS.NAME).

Shape shorthand: R = RoIs (all images), K = classes of the test vocabulary, D = CLIP width.

As :class:`vild_d2.modeling.ViLDROIHeads` (the same variants, losses and text classifier) with
the official pieces: RoI pooling over P2..P6 (:class:`OfficialROIPooler`), the official box
coding with weights (10, 10, 5, 5), and the official post-processing: softmax over background
+ K (background dropped after, not renormalised), ViLD-ensemble's geometric mean, boxes clipped
to [0, size - 1], per class the top ``pre_nms_topk_per_class`` scores, NMS, then the top
``topk_per_image`` over all classes. The official classifier's column 0 is the background
(vild_d2's is its last): :meth:`official_class_logits` gives the official layout.
"""

from typing import List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.structures import Boxes, Instances
from torch import nn

from ..modeling import ViLDOutputLayers, ViLDROIHeads, ensemble_scores
from .box_coding import OfficialBox2BoxTransform, clip_boxes_official
from .poolers import OfficialROIPooler
from .training.roi_training import OfficialRoISettings, official_roi_losses
from .training.sampling import Shuffler
from .vocabulary import official_text_encoder

__all__ = ["OfficialViLDOutputLayers", "OfficialViLDROIHeads", "official_detections"]


class OfficialViLDOutputLayers(ViLDOutputLayers):
    """:class:`ViLDOutputLayers` with the official box coding ((dy, dx, dh, dw) deltas, "+1")."""

    @classmethod
    def _build_text_encoder(cls, cfg):
        # A converted official checkpoint (MODEL.WEIGHTS) answers the names it holds (the LVIS
        # vocabularies of the official configs) without CLIP.
        return official_text_encoder(cfg)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box2box_transform"] = OfficialBox2BoxTransform(cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS)
        return ret


def official_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    clip_size: Tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    pre_nms_topk_per_class: int,
    topk: int,
) -> Instances:
    """
    One image's official post-processing (projects/vild/ops/postprocess_ops.py, nms v1).

    Args:
        boxes: (R, 4) decoded class-agnostic XYXY boxes.
        scores: (R, K) class scores (no background column).
        clip_size: (H, W): boxes are clipped to [0, W - 1] x [0, H - 1].
    Returns:
        Instances of ``clip_size`` with ``pred_boxes``, ``scores``, ``pred_classes`` (0..K-1),
        at most ``topk``, by decreasing score.
    """
    boxes = clip_boxes_official(boxes.float(), clip_size)
    scores = scores.float()
    num_rois, num_classes = scores.shape
    keep_mask = scores > score_thresh
    # The official padded NMS takes a box whose coordinates are all <= 0 for padding: never kept.
    keep_mask &= (boxes > 0).any(dim=1)[:, None]
    if num_rois > pre_nms_topk_per_class:  # per class, only its top-k boxes enter its NMS
        kth = scores.topk(pre_nms_topk_per_class, dim=0).values[-1]
        keep_mask &= scores >= kth[None]
    # Class-major candidates, then a stable sort: ties in the official order (tf.nn.top_k over
    # the classes' concatenated NMS outputs: lower class, then lower RoI index, first).
    classes, rois = keep_mask.t().nonzero(as_tuple=True)
    cand_scores = scores[rois, classes]
    order = torch.sort(cand_scores, descending=True, stable=True).indices
    rois, classes, cand_scores = rois[order], classes[order], cand_scores[order]
    # NMS decides a box from the higher-scored boxes of its class only, so the survivors among
    # the n best candidates are exact; the first n that yields topk survivors gives the answer
    # (1.2M candidates for 1000 RoIs x 1203 classes: NMS on all of them is slow on a CPU).
    # Its IoU reads each box with its corners sorted (a decoded box narrower than 1 px ends
    # before it starts: x2 = x1 + w - 1 < x1); the boxes themselves are returned as decoded.
    corners = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]),
                         torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)  # fmt: skip
    n = min(len(cand_scores), 8 * topk)
    while True:
        rank = torch.arange(n, 0, -1, dtype=torch.float32, device=boxes.device)
        keep = batched_nms(corners[rois[:n]], rank, classes[:n], nms_thresh)
        if len(keep) >= topk or n == len(cand_scores):
            break
        n = min(len(cand_scores), 4 * n)
    keep = keep[:topk]
    result = Instances(clip_size)
    result.pred_boxes = Boxes(boxes[rois[keep]])
    result.scores = cand_scores[keep]
    result.pred_classes = classes[keep]
    return result


@ROI_HEADS_REGISTRY.register()
class OfficialViLDROIHeads(ViLDROIHeads):
    """ViLD RoI heads with the official pooling, box coding and post-processing."""

    @configurable
    def __init__(self, *, pre_nms_topk_per_class: int = 1000,
                 official_training: Optional[OfficialRoISettings] = None, **kwargs):  # fmt: skip
        """
        Args:
            pre_nms_topk_per_class: per class, boxes kept before its NMS (official 1000).
            official_training: the official RoI sampling and losses in training
                (vild_d2/official/training/roi_training.py; MODEL.VILD.OFFICIAL.TRAINING);
                None = detectron2's. Random choices come from ``self.shuffler``.
            kwargs: as :class:`ViLDROIHeads`.
        """
        super().__init__(**kwargs)
        self.pre_nms_topk_per_class = pre_nms_topk_per_class
        self.official_training = official_training
        self.shuffler = Shuffler()

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["pre_nms_topk_per_class"] = cfg.MODEL.VILD.OFFICIAL.PRE_NMS_TOPK_PER_CLASS
        if cfg.MODEL.VILD.OFFICIAL.TRAINING:
            ret["official_training"] = OfficialRoISettings.from_config(cfg)
        return ret

    def forward(self, images, features, proposals, targets=None, distill=None):
        if self.training and self.official_training is not None:
            losses = official_roi_losses(self, features, proposals, targets, distill,
                                         self.official_training, self.shuffler)  # fmt: skip
            return proposals, losses
        return super().forward(images, features, proposals, targets, distill)

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # ViLDROIHeads._init_box_head's parts with the official pooler and predictor (not
        # built there and replaced: the predictor's vocabularies would be built twice).
        features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        channels = {input_shape[f].channels for f in features}
        if len(channels) != 1:
            raise ValueError(f"RoI features {features} must have equal channels, got {channels}")
        size = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        pooled = ShapeSpec(channels=channels.pop(), height=size, width=size)
        box_head = build_box_head(cfg, pooled)
        predictor = OfficialViLDOutputLayers(cfg, box_head.output_shape)
        ret = {
            "box_in_features": features,
            "box_pooler": OfficialROIPooler(size, [1.0 / input_shape[f].stride for f in features]),
            "box_head": box_head,
            "box_predictor": predictor,
        }
        if cfg.MODEL.VILD.VARIANT == "ensemble":  # the official "double_branch" image head
            ret["image_box_head"] = build_box_head(cfg, pooled)
            ret["image_projection"] = nn.Linear(
                box_head.output_shape.channels, predictor.cls_score.embed_dim
            )
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if cfg.MODEL.MASK_ON:
            features = cfg.MODEL.ROI_HEADS.IN_FEATURES
            ret["mask_pooler"] = OfficialROIPooler(
                cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION,
                [1.0 / input_shape[f].stride for f in features],
            )
        return ret

    def official_class_logits(self, box_features: torch.Tensor) -> torch.Tensor:
        """(R, C) box-head features -> (R, 1 + K) logits in the official layout: background
        first, then the test classes, cosine x (1 / temperature)."""
        logits = self.box_predictor.cls_score(box_features)
        return torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)

    def _forward_box(self, features, proposals: List[Instances], distill=None):
        if self.training:
            return super()._forward_box(features, proposals, distill)
        features = [features[f] for f in self.box_in_features]
        pooled = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        predictions = self.box_predictor(self.box_head(pooled))
        scores = self._class_scores(pooled, predictions, proposals)
        boxes = self.box_predictor.predict_boxes(predictions, proposals)
        sizes = [len(p) for p in proposals]
        return [
            official_detections(
                b,
                s,
                p.image_size,
                self.box_predictor.test_score_thresh,
                self.box_predictor.test_nms_thresh,
                self.pre_nms_topk_per_class,
                self.box_predictor.test_topk_per_image,
            )  # fmt: skip
            for b, s, p in zip(boxes, scores.split(sizes), proposals)
        ]

    def _class_scores(self, pooled, predictions, proposals) -> torch.Tensor:
        """(R, K) scores of the variant, no background column."""
        logits = predictions[0]
        if self.variant == "image":  # the untrained background is left out (ViLDROIHeads)
            probs = logits[:, :-1].softmax(-1)
            objectness = torch.cat([p.objectness_logits for p in proposals]).sigmoid()
            return probs * objectness[:, None].to(probs.dtype) ** self.objectness_weight
        text_probs = logits.softmax(-1)[:, :-1]  # background dropped, not renormalised
        if self.variant != "ensemble":
            return text_probs
        classifier = self.box_predictor.cls_score
        image_probs = classifier.image_probs(self.embed_image_branch(pooled))
        return ensemble_scores(
            text_probs, image_probs, classifier.test_is_base, self.ensemble_lambda
        )
