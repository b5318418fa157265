from .box_head import ViLDConvFCHead
from .clip_on_crops import CLIPOnCropsRCNN
from .meta_arch import ViLDRCNN
from .predictor import ViLDOutputLayers, cosine_logits, distillation_loss, ensemble_scores
from .roi_heads import ViLDROIHeads

__all__ = [
    "CLIPOnCropsRCNN",
    "ViLDRCNN",
    "ViLDROIHeads",
    "ViLDOutputLayers",
    "ViLDConvFCHead",
    "cosine_logits",
    "distillation_loss",
    "ensemble_scores",
]
