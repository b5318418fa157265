"""The open-vocabulary benchmarks and transfer targets, registered the detectron2 way.

:func:`register_all_ovd` (run on ``import vild_d2`` for ``$DETECTRON2_DATASETS``) registers:

- ``vild_lvis_v1_train_base`` (866 classes): LVIS v1 train, rare classes' annotations removed; lvis.
- ``vild_lvis_v1_train`` (1203): LVIS v1 train, the supervised reference; lvis.
- ``vild_lvis_v1_val`` (1203): novel = the 337 rare classes; lvis (APr = novel AP).
- ``vild_coco_2017_ov_train_base`` (48): COCO 2017 train, base classes' annotations only; coco.
- ``vild_coco_2017_ov_val`` (65): novel = the 17 novel classes; coco_ovd (box AP50 novel/base/all).
- ``vild_coco_2017_val`` (80), ``vild_voc_2007_test`` (20, readable vocabulary names; pascal_voc),
  ``vild_objects365_v2_val`` (365): transfer targets; coco unless said.

Registration reads no file; a missing file is reported, with the expected layout, when the
dataset is loaded.

Your own data: :func:`register_ovd_dataset` (one call) or :func:`register_dataset_files` (the
YAML dataset files of ``MODEL.VILD.DATASET_FILES``), docs/OWN_DATA.md.
"""

from .coco_ovd import prepare_coco_ovd_json, register_coco_ovd
from .common import dataset_cache_dir
from .lvis_ovd import register_lvis_v1_ovd
from .register_ovd import register_dataset_files, register_ovd_dataset
from .transfer import (
    register_coco_2017_val,
    register_objects365_v2_val,
    register_transfer_datasets,
    register_voc_2007_test,
)

__all__ = [
    "dataset_cache_dir",
    "prepare_coco_ovd_json",
    "register_all_ovd",
    "register_coco_2017_val",
    "register_coco_ovd",
    "register_lvis_v1_ovd",
    "register_dataset_files",
    "register_objects365_v2_val",
    "register_ovd_dataset",
    "register_transfer_datasets",
    "register_voc_2007_test",
]


def register_all_ovd(root: str) -> list:
    """Register every dataset above for the datasets root ``root``; returns their names."""
    return register_lvis_v1_ovd(root) + register_coco_ovd(root) + register_transfer_datasets(root)
