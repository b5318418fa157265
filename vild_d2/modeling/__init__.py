"""ViLD's model: meta-architecture, RoI heads, box predictor with the text classifier, losses."""

from .box_head import ViLDConvFCHead
from .clip_on_crops import CLIPOnCropsRCNN
from .losses import distillation_loss, ensemble_scores
from .meta_arch import ViLDRCNN
from .roi_heads import ViLDROIHeads
from .text_classifier import TextClassifier, cosine_logits
from .vild_fast_rcnn import ViLDOutputLayers

__all__ = [
    "CLIPOnCropsRCNN",
    "ViLDRCNN",
    "ViLDROIHeads",
    "ViLDOutputLayers",
    "TextClassifier",
    "ViLDConvFCHead",
    "cosine_logits",
    "distillation_loss",
    "ensemble_scores",
]
