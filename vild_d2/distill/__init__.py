"""ViLD-image's distillation targets: proposal crops in CLIP's input format (``crops``), the
CLIP teacher (``teacher``), the on-disk store of targets (``store``), the offline jobs that fill
it (``precompute``) and the load-time join to the training dataset dicts (``targets``)."""

from .crops import fast_crops, reference_crops
from .store import DistillStore, StoreError, StoreWriter
from .targets import load_distill_targets_into_dataset
from .teacher import CLIPTeacher, encode_crops

__all__ = [
    "fast_crops",
    "reference_crops",
    "encode_crops",
    "CLIPTeacher",
    "DistillStore",
    "StoreWriter",
    "StoreError",
    "load_distill_targets_into_dataset",
]
