"""The training dataset dicts: detectron2's, joined to their distillation stores where the
trainer builds its loader (the data layer knows nothing of stores)."""

from typing import List

from detectron2.data import get_detection_dataset_dicts

from ..distill.targets import distill_stores_from_config, load_distill_targets_into_dataset

__all__ = ["get_training_dicts"]


def get_training_dicts(cfg) -> List[dict]:
    """
    detectron2's ``get_detection_dataset_dicts`` for ``cfg.DATASETS.TRAIN`` (empty-image
    filter, keypoint minimum, precomputed proposals as the config says); when the model distils
    and ``MODEL.VILD.DISTILL.STORES`` names a store per dataset, each dataset's dicts are
    joined to its store as they are loaded, like detectron2's proposal files
    (:func:`vild_d2.distill.targets.load_distill_targets_into_dataset`).
    """
    names = list(cfg.DATASETS.TRAIN)
    proposal_files = list(cfg.DATASETS.PROPOSAL_FILES_TRAIN) if cfg.MODEL.LOAD_PROPOSALS else None
    kwargs = dict(
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
    )
    stores = distill_stores_from_config(cfg)
    if stores is None:
        return get_detection_dataset_dicts(names, proposal_files=proposal_files, **kwargs)
    dicts = []
    for i, (name, store) in enumerate(zip(names, stores)):
        one = get_detection_dataset_dicts(
            [name], proposal_files=proposal_files[i : i + 1] if proposal_files else None, **kwargs
        )
        dicts.extend(load_distill_targets_into_dataset(one, store, cfg, name))
    return dicts
