"""The official TensorFlow ViLD as a test reference: its checkpoint layout, seeded weights, and a
TensorFlow-free checkpoint reader. See docs/OFFICIAL.md.
"""

from .random_weights import CLASSIFIER_KEY, random_classifier, random_official_weights
from .tf_checkpoint import CheckpointError, list_tf_checkpoint, read_tf_checkpoint
from .variables import official_variables, resnet_variables

__all__ = [
    "CLASSIFIER_KEY",
    "CheckpointError",
    "list_tf_checkpoint",
    "read_tf_checkpoint",
    "official_variables",
    "random_classifier",
    "random_official_weights",
    "resnet_variables",
]

# The official architecture as detectron2 modules (registered on import; its config node,
# cfg.MODEL.VILD.OFFICIAL, is in vild_d2/config.py) and the weight converter.
from .anchors import OfficialAnchorGenerator  # noqa: E402
from .backbone import TFFPN, build_tf_resnet, build_tf_resnet_fpn_backbone  # noqa: E402
from .box_coding import OfficialBox2BoxTransform, clip_boxes_official  # noqa: E402
from .convert import convert_official_weights, official_vocabulary  # noqa: E402
from .heads import OfficialBoxHead, OfficialMaskHead  # noqa: E402
from .meta_arch import OfficialViLDRCNN  # noqa: E402
from .poolers import OfficialROIPooler, official_roi_levels  # noqa: E402
from .roi_heads import OfficialViLDROIHeads, official_detections  # noqa: E402
from .rpn import OfficialRPN, OfficialRPNHead  # noqa: E402

__all__ += [
    "OfficialAnchorGenerator",
    "TFFPN",
    "build_tf_resnet",
    "build_tf_resnet_fpn_backbone",
    "OfficialBox2BoxTransform",
    "clip_boxes_official",
    "convert_official_weights",
    "official_vocabulary",
    "OfficialBoxHead",
    "OfficialMaskHead",
    "OfficialViLDRCNN",
    "OfficialROIPooler",
    "official_roi_levels",
    "OfficialViLDROIHeads",
    "official_detections",
    "OfficialRPN",
    "OfficialRPNHead",
]
