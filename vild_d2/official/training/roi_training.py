"""The official training pass of the RoI heads (projects/vild/modeling/vild_model.py
``_build_outputs`` in TRAIN mode, ``build_losses``): RoI sampling, box/class/mask/distillation
losses, with the official batch composition:

* ViLD ("vild"): the box head (and its batch norms) sees, per image, the 512 sampled RoIs AND
  the distillation boxes padded to ``max_distill`` with -1 boxes; class and box outputs come
  from the sampled rows, region embeddings from the distillation rows;
* ViLD-ensemble: the text head sees the sampled RoIs, the image head the padded distillation
  boxes;
* the mask head sees 128 RoIs per image (foreground first; background fillers carry weight 0).

Shape shorthand: B = images, S = samples per image (512), Q = distillation slots (300),
M = mask samples per image (128), K + 1 = training classes with the background (last).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from ...modeling.text_classifier import NORM_EPS
from .losses import distillation_loss, fast_rcnn_box_loss, fast_rcnn_class_loss, mask_loss
from .mask_targets import crop_gt_masks, crop_mask_in_target_box
from .roi_sampling import first_foreground, official_sample_rois
from .sampling import Shuffler

__all__ = ["OfficialRoISettings", "official_roi_losses", "gt_mask_crops", "pad_distillation"]


@dataclass
class OfficialRoISettings:
    """The official sampling settings (cfg keys in :meth:`from_config`)."""

    num_proposals: int = 1000
    max_instances: int = 300
    num_samples: int = 512
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    num_masks: int = 128
    mask_crop_size: int = 112
    max_distill: int = 300
    mask_rare: bool = False

    @classmethod
    def from_config(cls, cfg) -> "OfficialRoISettings":
        o = cfg.MODEL.VILD.OFFICIAL
        return cls(
            num_proposals=cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN,
            max_instances=o.MAX_INSTANCES,
            num_samples=cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
            fg_fraction=cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION,
            fg_thresh=cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[-1],
            num_masks=o.NUM_MASK_SAMPLES,
            mask_crop_size=o.MASK_CROP_SIZE,
            max_distill=o.MAX_DISTILL_ROIS,
            mask_rare=o.MASK_RARE,
        )


def gt_mask_crops(targets: Instances, size: int) -> torch.Tensor:
    """(G, size, size) the parser's soft crops: the ``gt_mask_crops`` field when the inputs
    carry it (the parity test's), else cropped from ``gt_masks``."""
    if targets.has("gt_mask_crops"):
        return targets.gt_mask_crops.float()
    masks = targets.gt_masks
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, *targets.image_size)
    return crop_gt_masks(masks, targets.gt_boxes.tensor, size)


def pad_distillation(distill: Instances, slots: int, dim: int):
    """The parser's ``clip_or_pad_to_fixed_size``: the first ``slots`` boxes (Q, 4) and
    embeddings (Q, D), padded with -1."""
    boxes = distill.boxes.tensor[:slots].float()
    emb = distill.embeddings[:slots].float() if len(distill) else boxes.new_zeros(0, dim)
    out_b = boxes.new_full((slots, 4), -1.0)
    out_e = boxes.new_full((slots, dim), -1.0)
    out_b[: len(boxes)] = boxes
    out_e[: len(boxes)] = emb
    return out_b, out_e


def official_roi_losses(
    heads,
    features: Dict[str, torch.Tensor],
    proposals: List[Instances],
    targets: List[Instances],
    distill: Optional[List[Instances]],
    settings: OfficialRoISettings,
    shuffle: Shuffler,
) -> Dict[str, torch.Tensor]:
    """The losses of :class:`OfficialViLDROIHeads` ``heads`` in official training."""
    s = settings
    feats = [features[f] for f in heads.box_in_features]
    predictor = heads.box_predictor
    classifier = predictor.cls_score
    num_classes = predictor.num_classes  # K: the background's index
    samples = []
    for p, t in zip(proposals, targets):
        out = official_sample_rois(
            p.proposal_boxes.tensor,
            t.gt_boxes.tensor,
            t.gt_classes,
            shuffle,
            num_proposals=s.num_proposals,
            max_instances=s.max_instances,
            num_samples=s.num_samples,
            fg_fraction=s.fg_fraction,
            fg_thresh=s.fg_thresh,
            bg_hi=s.fg_thresh,
        )
        shuffle.log("roi_indices", out.indices)
        samples.append(out)
    rois = [x.rois for x in samples]
    official_classes = torch.cat([x.gt_classes for x in samples])
    foreground = official_classes > 0
    classes = torch.where(
        foreground, official_classes - 1, torch.full_like(official_classes, num_classes)
    )
    box_targets = predictor.box2box_transform.get_deltas(
        torch.cat(rois), torch.cat([x.gt_boxes for x in samples])
    )
    box_targets = torch.where(foreground[:, None], box_targets, torch.zeros_like(box_targets))

    variant = heads.variant
    use_distill = variant != "text"
    if use_distill:
        dim = classifier.embed_dim
        padded = [pad_distillation(d, s.max_distill, dim) for d in distill]
        distill_boxes = [b for b, _ in padded]
        distill_targets = torch.cat([e for _, e in padded])
        valid = torch.cat([b.amax(dim=1) > 0 for b in distill_boxes])
    if use_distill and variant != "ensemble":
        boxes = [Boxes(torch.cat([r, b])) for r, b in zip(rois, distill_boxes)]
        box_features = heads.box_head(heads.box_pooler(feats, boxes))
        per_image = box_features.split(s.num_samples + s.max_distill)
        sampled = torch.cat([x[: s.num_samples] for x in per_image])
        embeddings = classifier.embed(torch.cat([x[s.num_samples :] for x in per_image]))
    else:
        sampled = heads.box_head(heads.box_pooler(feats, [Boxes(r) for r in rois]))
        if use_distill:
            pooled = heads.box_pooler(feats, [Boxes(b) for b in distill_boxes])
            x = heads.image_projection(heads.image_box_head(pooled).flatten(1))
            embeddings = F.normalize(x, dim=1, eps=NORM_EPS)
    logits, deltas = predictor(sampled)
    losses = {}
    if variant != "image":
        rare = None
        novel = classifier.train_vocabulary.novel
        if s.mask_rare and novel is None:
            raise ValueError(
                "MODEL.VILD.OFFICIAL.MASK_RARE = True needs a training vocabulary that marks its "
                "novel (rare) classes; MODEL.VILD.TRAIN_VOCABULARY's has no novel flags"
            )
        if s.mask_rare:
            rare = torch.cat([novel.to(logits.device), novel.new_zeros(1).to(logits.device)])
        losses["loss_cls"] = fast_rcnn_class_loss(logits, classes, rare)
    losses["loss_box_reg"] = fast_rcnn_box_loss(
        deltas, box_targets, foreground, predictor.smooth_l1_beta
    )
    if variant == "image":  # no class loss; DDP still waits for the background's gradient
        losses["loss_box_reg"] = losses["loss_box_reg"] + classifier.background.sum() * 0.0
    if heads.mask_on:
        losses["loss_mask"] = _mask_loss(heads, features, targets, samples, s, shuffle)
    if use_distill:
        loss = distillation_loss(embeddings, distill_targets, valid)
        losses["loss_distill"] = heads.distill_weight * loss
    shuffle.keep("class_logits", logits)
    shuffle.keep("box_deltas", deltas)
    if use_distill:
        shuffle.keep("region_embeddings", embeddings)
    return losses


def _mask_loss(heads, features, targets, samples, s: OfficialRoISettings, shuffle: Shuffler):
    mask_rois, mask_targets, mask_fg = [], [], []
    size = 2 * heads.mask_pooler.output_size
    for t, x in zip(targets, samples):
        idx = first_foreground(x.gt_classes, s.num_masks)
        shuffle.log("mask_indices", idx)
        rois, gt_boxes, gt_idx = x.rois[idx], x.gt_boxes[idx], x.gt_indices[idx]
        crops = gt_mask_crops(t, s.mask_crop_size).to(rois.device)
        if len(crops):
            chosen = crops[gt_idx.clamp(0, len(crops) - 1)]
        else:
            chosen = rois.new_zeros(len(idx), s.mask_crop_size, s.mask_crop_size)
        mask_targets.append(crop_mask_in_target_box(chosen, gt_boxes, rois, size))
        mask_rois.append(rois)
        mask_fg.append(x.gt_classes[idx] > 0)
    feats = [features[f] for f in heads.mask_in_features]
    pooled = heads.mask_pooler(feats, [Boxes(r) for r in mask_rois])
    logits = heads.mask_head.layers(pooled)[:, 0]
    shuffle.keep("mask_logits", logits)
    return mask_loss(logits, torch.cat(mask_targets), torch.cat(mask_fg))
