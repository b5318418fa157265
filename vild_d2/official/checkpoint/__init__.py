"""Official (TensorFlow) ViLD checkpoints, without TensorFlow: the variable layout
(:mod:`.variables`), a TensorBundle reader (:mod:`.tf_checkpoint`), the weight mapping onto
vild_d2's modules (:mod:`.convert`) and the file-level converter with its checks
(:mod:`.convert_checkpoint`, behind ``tools/convert_official_checkpoint.py``). docs/OFFICIAL.md.
"""

from .convert import convert_official_weights, official_vocabulary
from .convert_checkpoint import convert_official_checkpoint
from .tf_checkpoint import CheckpointError, list_tf_checkpoint, read_tf_checkpoint
from .variables import official_variables, resnet_variables

__all__ = [
    "CheckpointError",
    "convert_official_checkpoint",
    "convert_official_weights",
    "list_tf_checkpoint",
    "official_variables",
    "official_vocabulary",
    "read_tf_checkpoint",
    "resnet_variables",
]
