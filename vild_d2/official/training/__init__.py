"""The official ViLD training path (MODEL.VILD.OFFICIAL.TRAINING): anchor labelling, RoI and
mask sampling, losses, optimiser settings; the random choices injectable
(:class:`RecordedShuffles`). See docs/OFFICIAL.md "Training"."""

from .anchor_labels import official_anchor_match, official_iou, official_rpn_targets
from .losses import (
    distillation_loss,
    fast_rcnn_box_loss,
    fast_rcnn_class_loss,
    mask_loss,
    rpn_box_loss,
    rpn_score_loss,
    sum_by_nonzero_weights,
)
from .mask_targets import crop_gt_masks, crop_mask_in_target_box
from .optimizer import official_decay_parameters, official_l2_loss, official_learning_rate
from .roi_sampling import SampledRois, bbox_overlap, first_foreground, official_sample_rois
from .sampling import (
    RecordedShuffles,
    Shuffler,
    balanced_subsample,
    static_balanced_subsample,
    subsample_indicator,
)

__all__ = [
    "official_anchor_match",
    "official_iou",
    "official_rpn_targets",
    "distillation_loss",
    "fast_rcnn_box_loss",
    "fast_rcnn_class_loss",
    "mask_loss",
    "rpn_box_loss",
    "rpn_score_loss",
    "sum_by_nonzero_weights",
    "crop_gt_masks",
    "crop_mask_in_target_box",
    "official_decay_parameters",
    "official_l2_loss",
    "official_learning_rate",
    "SampledRois",
    "bbox_overlap",
    "first_foreground",
    "official_sample_rois",
    "RecordedShuffles",
    "Shuffler",
    "balanced_subsample",
    "static_balanced_subsample",
    "subsample_indicator",
]
