"""ViLD's box predictor: detectron2's Fast R-CNN output layers with the text classifier as
``cls_score`` and class-agnostic box regression.

Shape shorthand: N = RoIs, C = box-head feature channels, D = CLIP embedding width,
K = classes of the active vocabulary.
"""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances

from ..text import TextEncoder, Vocabulary, build_text_encoder, build_vocabularies
from .postprocess import per_class_detections
from .text_classifier import TextClassifier

__all__ = ["ViLDOutputLayers"]


class ViLDOutputLayers(FastRCNNOutputLayers):
    """
    :class:`FastRCNNOutputLayers` whose ``cls_score`` is a :class:`TextClassifier` (region
    embedding vs frozen text embeddings + a learned background) and whose box regression is
    class-agnostic. ``losses`` and ``inference`` are detectron2's: softmax cross-entropy over
    K+1 and smooth-L1 in training; at test time softmax over K+1 with the background column
    dropped WITHOUT renormalising, which is exactly ViLD's rule (its per-class NMS as
    :func:`.postprocess.per_class_detections`, which also exports). ``num_classes`` is the training
    vocabulary's size (the background index of ``gt_classes``).
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        train_vocabulary: Vocabulary,
        test_vocabulary: Vocabulary = None,
        temperature: float = 0.01,
        text_encoder: TextEncoder = None,
        **kwargs,
    ):
        """
        Args:
            train_vocabulary, test_vocabulary, temperature: as :class:`TextClassifier`.
            text_encoder: the encoder that made the vocabularies, kept for the model's
                run-time vocabulary switches (so CLIP is loaded at most once).
            kwargs: as :class:`FastRCNNOutputLayers` (``num_classes`` and
                ``cls_agnostic_bbox_reg`` are set here).
        """
        super().__init__(
            input_shape,
            num_classes=len(train_vocabulary),
            cls_agnostic_bbox_reg=True,
            **kwargs,
        )
        # Replaces the parent's learned (K+1)-way Linear.
        self.cls_score = TextClassifier(
            self.cls_score.in_features, train_vocabulary, test_vocabulary, temperature
        )
        self.text_encoder = text_encoder

    def inference(self, predictions, proposals: List[Instances]):
        """As detectron2's, with the exportable per-class NMS: (instances, kept indices)."""
        probs = torch.cat(self.predict_probs(predictions, proposals))[:, :-1]  # background out
        return self._detections(predictions, proposals, probs)

    def inference_with_scores(
        self, predictions, proposals: List[Instances], scores: torch.Tensor
    ) -> List[Instances]:
        """
        Inference with the box deltas of ``predictions`` and class ``scores`` (R, K) that have
        no background column (ViLD-ensemble's, ViLD-image's): per-class NMS and top-k.
        """
        return self._detections(predictions, proposals, scores)[0]

    def _detections(self, predictions, proposals, scores):
        """:func:`.postprocess.per_class_detections` of the (R, K) ``scores`` over all images."""
        return per_class_detections(
            self.predict_boxes(predictions, proposals),
            scores.split([len(p) for p in proposals]),
            [p.image_size for p in proposals],
            self.test_score_thresh,
            self.test_nms_thresh,
            self.test_topk_per_image,
        )

    @classmethod
    def _build_text_encoder(cls, cfg) -> TextEncoder:
        """The encoder of the config's vocabularies (a subclass may answer names without CLIP)."""
        return build_text_encoder(cfg)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        encoder = cls._build_text_encoder(cfg)
        train_vocabulary, test_vocabulary = build_vocabularies(cfg, encoder)
        ret.update(
            box2box_transform=Box2BoxTransform(weights=cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),
            train_vocabulary=train_vocabulary,
            test_vocabulary=test_vocabulary,
            temperature=cfg.MODEL.VILD.TEMPERATURE,
            text_encoder=encoder,
        )
        for key in (
            "num_classes",
            "cls_agnostic_bbox_reg",
            "use_fed_loss",
            "use_sigmoid_ce",
            "get_fed_loss_cls_weights",
            "fed_loss_num_classes",
        ):
            ret.pop(key, None)  # ours, or newer detectron2 options ViLD's softmax CE never uses
        return ret
