"""The official TensorFlow ViLD (tensorflow/tpu projects/vild) as detectron2 modules, registered
on import (its config node, cfg.MODEL.VILD.OFFICIAL, is in vild_d2/config.py): the architecture
and post-processing (this folder), the official training path (:mod:`.training`), and its
checkpoints read and converted without TensorFlow (:mod:`.checkpoint`). See docs/OFFICIAL.md.
"""

from .anchors import OfficialAnchorGenerator
from .backbone import TFFPN, build_tf_resnet, build_tf_resnet_fpn_backbone
from .box_coding import OfficialBox2BoxTransform, clip_boxes_official
from .checkpoint import (
    CheckpointError,
    convert_official_checkpoint,
    convert_official_weights,
    list_tf_checkpoint,
    official_variables,
    official_vocabulary,
    read_tf_checkpoint,
    resnet_variables,
)
from .heads import OfficialBoxHead, OfficialMaskHead
from .meta_arch import OfficialViLDRCNN
from .poolers import OfficialROIPooler, official_roi_levels
from .roi_heads import OfficialViLDROIHeads, official_detections
from .rpn import OfficialRPN, OfficialRPNHead

__all__ = [
    "OfficialAnchorGenerator",
    "TFFPN",
    "build_tf_resnet",
    "build_tf_resnet_fpn_backbone",
    "OfficialBox2BoxTransform",
    "clip_boxes_official",
    "CheckpointError",
    "convert_official_checkpoint",
    "convert_official_weights",
    "list_tf_checkpoint",
    "official_variables",
    "official_vocabulary",
    "read_tf_checkpoint",
    "resnet_variables",
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
