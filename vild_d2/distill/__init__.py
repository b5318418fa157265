"""ViLD-image data pipeline: proposal crops in CLIP's input format, the CLIP teacher, the
on-disk store of targets, the precompute jobs and the training-time join."""

from .crops import fast_crops, reference_crops
from .store import DistillStore, StoreError, StoreWriter
from .targets import DistillTargets
from .teacher import CLIPTeacher, encode_crops

__all__ = [
    "fast_crops",
    "reference_crops",
    "encode_crops",
    "CLIPTeacher",
    "DistillStore",
    "StoreWriter",
    "StoreError",
    "DistillTargets",
]
