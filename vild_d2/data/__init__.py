"""Data loading for ViLD: the dataset mapper with distillation boxes and large-scale jitter,
and the datasets registered on import."""

from . import builtin  # noqa: F401  (registers datasets)
from .mapper import ViLDDatasetMapper, build_lsj_augmentation

__all__ = ["ViLDDatasetMapper", "build_lsj_augmentation"]
