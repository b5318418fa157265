"""ViLD RoI heads: ViLD-text, ViLD (distillation through the same head) and ViLD-ensemble.

Shape shorthand: R = sampled RoIs (all images), M = distillation boxes (all images),
C = box-head output channels, D = CLIP embedding width, K = classes.
"""

import logging
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from ..config import VARIANTS
from .losses import distillation_loss, ensemble_scores
from .text_classifier import NORM_EPS
from .vild_fast_rcnn import ViLDOutputLayers

__all__ = ["ViLDROIHeads"]

logger = logging.getLogger(__name__)


@ROI_HEADS_REGISTRY.register()
class ViLDROIHeads(StandardROIHeads):
    """
    :class:`StandardROIHeads` with ViLD's text classifier and, in training, the image
    distillation loss on precomputed boxes (``distill``: per image an Instances with ``boxes``
    and ``embeddings``, see :class:`vild_d2.data.ViLDDatasetMapper`; the meta-architecture
    checks that every input carries one).

    * ``"text"``: no distillation.
    * ``"image"``: ViLD-image, as "vild" without the text cross-entropy (box regression and
      masks train as usual). Its background embedding never trains, so at test time a box is
      scored by its softmax over the test classes times sigmoid(RPN objectness) **
      ``objectness_weight``, like CLIP on crops.
    * ``"vild"``: distillation boxes are pooled together with the sampled RoIs and go through the
      same box head and projection; their box outputs are discarded.
    * ``"ensemble"``: a separate ``image_box_head`` + ``image_projection`` embeds the distillation
      boxes; at test time both branches score the same proposals (geometric mean).
    """

    @configurable
    def __init__(
        self,
        *,
        variant: str = "vild",
        distill_weight: float = 0.5,
        ensemble_lambda: float = 2.0 / 3.0,
        objectness_weight: float = 0.5,
        image_box_head: Optional[nn.Module] = None,
        image_projection: Optional[nn.Module] = None,
        **kwargs,
    ):
        """
        Args:
            variant: one of "text", "image", "vild", "ensemble" (:data:`vild_d2.config.VARIANTS`).
            distill_weight: weight w of the L1 distillation loss.
            ensemble_lambda: lambda of ViLD-ensemble's score.
            objectness_weight: ViLD-image's exponent of sigmoid(objectness) in its score.
            image_box_head, image_projection: the image branch (ensemble only).
            kwargs: as :class:`StandardROIHeads`; ``box_predictor`` is a :class:`ViLDOutputLayers`.
        """
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"MODEL.VILD.VARIANT must be one of {VARIANTS}, got {variant!r}")
        if (variant == "ensemble") != (image_box_head is not None and image_projection is not None):
            raise ValueError(
                "the image branch (image_box_head, image_projection) is needed "
                "exactly when variant == 'ensemble'"
            )
        if not isinstance(self.box_predictor, ViLDOutputLayers):
            raise TypeError(
                f"box_predictor must be ViLDOutputLayers, got {type(self.box_predictor)}"
            )
        self.variant = variant
        self.distill_weight = distill_weight
        self.ensemble_lambda = ensemble_lambda
        self.objectness_weight = objectness_weight
        self.image_box_head = image_box_head
        self.image_projection = image_projection
        # A synchronised batch norm (SyncBN) in the image branch runs collectives in forward.
        sync = (nn.SyncBatchNorm, NaiveSyncBatchNorm)
        self._image_branch_syncs = image_box_head is not None and any(
            isinstance(m, sync) for m in image_box_head.modules()
        )
        # MODEL.VILD.SELF_DISTILL's frozen starting model, set by the trainer
        # (self_distill.attach_self_distillation); None = off.
        self.self_distill = None

    def _apply(self, fn, *args, **kwargs):
        # The self-distillation teacher is no submodule (not in the state dict, the optimizer,
        # DDP, model.train()), but follows the model's moves and casts.
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "self_distill", None) is not None:
            self.self_distill.teacher._apply(fn, *args, **kwargs)
        return self

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(
            variant=cfg.MODEL.VILD.VARIANT,
            distill_weight=cfg.MODEL.VILD.DISTILL_WEIGHT,
            ensemble_lambda=cfg.MODEL.VILD.ENSEMBLE_LAMBDA,
            objectness_weight=cfg.MODEL.VILD.OBJECTNESS_WEIGHT,
        )
        if not (
            cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG
            and cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK
        ):
            raise ValueError(
                "ViLD's classes change between training and test, so box regression and masks "
                "must be class-agnostic: set MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG and "
                "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK to True"
            )
        # Background index of the sampled RoIs = number of training classes (not NUM_CLASSES).
        ret["num_classes"] = ret["box_predictor"].num_classes
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        pooler_resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        in_channels = {input_shape[f].channels for f in in_features}
        if len(in_channels) != 1:
            raise ValueError(
                f"RoI features {in_features} must have equal channels, got {in_channels}"
            )
        pooled_shape = ShapeSpec(
            channels=in_channels.pop(), height=pooler_resolution, width=pooler_resolution
        )
        box_head = build_box_head(cfg, pooled_shape)
        box_predictor = ViLDOutputLayers(cfg, box_head.output_shape)
        ret = {
            "box_in_features": in_features,
            "box_pooler": ROIPooler(
                output_size=pooler_resolution,
                scales=tuple(1.0 / input_shape[k].stride for k in in_features),
                sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
            ),
            "box_head": box_head,
            "box_predictor": box_predictor,
        }
        if cfg.MODEL.VILD.VARIANT == "ensemble":
            ret["image_box_head"] = build_box_head(cfg, pooled_shape)
            ret["image_projection"] = nn.Linear(
                box_head.output_shape.channels, box_predictor.cls_score.embed_dim
            )
        return ret

    # ----------------------------------------------------------------------------------------
    def forward(self, images, features, proposals, targets=None, distill=None):
        """
        As :meth:`StandardROIHeads.forward`, plus ``distill`` (training, variants "vild" and
        "ensemble"): list of Instances, one per image, with ``boxes`` (Boxes, M_i) and
        ``embeddings`` (M_i, D) in the network input's coordinates.
        """
        if not self.training:
            return super().forward(images, features, proposals)
        proposals = self.label_and_sample_proposals(proposals, targets)
        del targets
        if self.self_distill is not None:  # the starting model's embeddings of the same RoIs
            self.self_distill.add_targets(images, proposals)
        losses = self._forward_box(features, proposals, distill)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _forward_box(self, features, proposals: List[Instances], distill=None):
        features = [features[f] for f in self.box_in_features]
        if self.training and self.variant != "text":
            return self._forward_box_with_distillation(features, proposals, distill)
        pooled = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        box_features = self.box_head(pooled)
        predictions = self.box_predictor(box_features)
        if self.training:
            losses = self.box_predictor.losses(predictions, proposals)
            return {**losses, **self._self_distill_losses(box_features, pooled, proposals)}
        if self.variant == "ensemble":
            return self._ensemble_inference(pooled, predictions, proposals)
        if self.variant == "image":
            return self._image_only_inference(predictions, proposals)
        return self.box_predictor.inference(predictions, proposals)[0]

    def _forward_box_with_distillation(
        self, features, proposals, distill
    ) -> Dict[str, torch.Tensor]:
        # One RoIAlign call for the sampled RoIs and the distillation boxes of every image:
        # per image, its R_i RoIs then its M_i distillation boxes.
        boxes = [Boxes.cat([p.proposal_boxes, d.boxes]) for p, d in zip(proposals, distill)]
        pooled = self.box_pooler(features, boxes)
        counts = torch.tensor(
            [[len(p), len(d)] for p, d in zip(proposals, distill)], device=pooled.device
        ).flatten()
        is_distill = (
            (torch.arange(counts.numel(), device=pooled.device) % 2)
            .repeat_interleave(counts)
            .bool()
        )
        dim = self.box_predictor.cls_score.embed_dim
        # Images without boxes may carry (0, 0) embeddings (their width is unknown): skip them.
        targets = [d.embeddings for d in distill if len(d)]
        targets = torch.cat(targets) if targets else pooled.new_zeros(0, dim)
        if targets.shape[1] != dim:
            raise ValueError(
                f"distillation targets are {targets.shape[1]}-d but the model's region embeddings "
                f"are {dim}-d: the CLIP model that made them differs from MODEL.VILD.CLIP_MODEL"
            )

        if self.variant in ("vild", "image"):
            box_features = self.box_head(pooled)
            roi_features = box_features[~is_distill]
            region_embeddings = self.box_predictor.cls_score.embed(box_features[is_distill])
        else:  # ensemble: the text branch sees only RoIs, the image branch only distill boxes
            roi_features = self.box_head(pooled[~is_distill])
            region_embeddings = self.embed_image_branch(pooled[is_distill])
        predictions = self.box_predictor(roi_features)
        losses = self.box_predictor.losses(predictions, proposals)
        if self.self_distill is not None:  # (pooled RoIs: the ensemble's image branch input)
            losses.update(self._self_distill_losses(roi_features, pooled[~is_distill], proposals))
        # Parameters this step's loss does not reach still get a (zero) gradient through a
        # zero-weighted term: DDP (without find_unused_parameters, which costs a graph
        # traversal per step and hides real bugs) waits for every parameter's gradient, and
        # would hang or fail on a step where one process's loss skips some.
        unused = []
        if self.variant == "image":  # distillation only: no text cross-entropy
            del losses["loss_cls"]
            unused.append(self.box_predictor.cls_score.background)
        if region_embeddings is None:  # too few boxes for the image branch this step
            unused += [*self.image_box_head.parameters(), *self.image_projection.parameters()]
            loss = pooled.new_zeros(())
        else:
            loss = self.distill_weight * distillation_loss(region_embeddings, targets)
        losses["loss_distill"] = loss + sum(p.sum() for p in unused) * 0.0
        return losses

    def _self_distill_losses(self, box_features, pooled, proposals) -> Dict[str, torch.Tensor]:
        """``loss_self_distill`` of the sampled RoIs' (R, C) box features and (R, C_in, S, S)
        pooled features, when MODEL.VILD.SELF_DISTILL is on; else nothing."""
        if self.self_distill is None:
            return {}
        return {"loss_self_distill": self.self_distill.loss(self, box_features, pooled, proposals)}

    def embed_image_branch(self, pooled):
        """
        (N, C_in, S, S) pooled features -> (N, D) L2-normalised image-branch embeddings; None in
        training when too few boxes for a batch-norm head (the official SyncBN one): fewer than
        2, counted over all processes when its norm is synchronised.
        """
        if self.training:
            n = pooled.shape[0]
            if self._image_branch_syncs and comm.get_world_size() > 1:
                # SyncBN's collectives must run in every process or in none: decide together.
                total = torch.tensor([n], device=pooled.device)
                torch.distributed.all_reduce(total)
                n = int(total.item())
            if n < 2:
                return None
        x = self.image_box_head(pooled)
        return nn.functional.normalize(self.image_projection(x.flatten(1)), dim=1, eps=NORM_EPS)

    def _ensemble_inference(self, pooled, predictions, proposals):
        """Both branches on the same pooled proposals (R, C_in, S, S); boxes from the text one."""
        predictor = self.box_predictor
        classifier = predictor.cls_score
        text_probs = predictions[0].softmax(-1)[:, :-1]  # background dropped, not renormalised
        image_probs = classifier.image_probs(self.embed_image_branch(pooled))
        scores = ensemble_scores(
            text_probs, image_probs, classifier.test_is_base, self.ensemble_lambda
        )
        return predictor.inference_with_scores(predictions, proposals, scores)

    def _image_only_inference(self, predictions, proposals):
        """ViLD-image: softmax over the test classes (no background) x sigmoid(objectness)^w."""
        predictor = self.box_predictor
        # The logits' last column is the untrained background: drop it before the softmax.
        probs = predictions[0][:, :-1].softmax(-1)
        objectness = torch.cat([p.objectness_logits for p in proposals]).sigmoid()
        scores = probs * objectness[:, None].to(probs.dtype) ** self.objectness_weight
        return predictor.inference_with_scores(predictions, proposals, scores)
