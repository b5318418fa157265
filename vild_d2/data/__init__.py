"""Data loading for ViLD: the datasets registered on import, the training dicts joined to their
distillation stores, and the mapper that carries distillation boxes through the augmentations."""

from . import builtin  # noqa: F401  (registers datasets)
from .datasets import register_dataset_files, register_ovd_dataset
from .mapper import LazyTarget, ViLDDatasetMapper, build_lsj_augmentation

__all__ = [
    "LazyTarget",
    "ViLDDatasetMapper",
    "build_lsj_augmentation",
    "register_dataset_files",
    "register_ovd_dataset",
]
