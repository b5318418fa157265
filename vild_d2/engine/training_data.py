"""The dataset dicts of training and evaluation: detectron2's, joined to their precomputed
proposals (read as data only, :mod:`vild_d2.data.proposals`) and, for training, to their
distillation stores, where the trainer builds its loaders (the data layer knows nothing of
stores)."""

from typing import List, Optional, Sequence

from detectron2.data import get_detection_dataset_dicts

from ..data.proposals import load_proposals_into_dataset
from ..distill.targets import distill_stores_from_config, load_distill_targets_into_dataset

__all__ = ["get_test_dicts", "get_training_dicts"]


def _proposal_files(cfg, names: Sequence[str], files: Sequence[str], key: str) -> Optional[list]:
    """One proposal file per dataset when ``MODEL.LOAD_PROPOSALS``, else None."""
    if not cfg.MODEL.LOAD_PROPOSALS:
        return None
    if len(files) != len(names):
        raise ValueError(
            f"DATASETS.{key} names {len(files)} file(s) for {len(names)} dataset(s) "
            f"{tuple(names)}; MODEL.LOAD_PROPOSALS needs one per dataset, in order"
        )
    return list(files)


def get_training_dicts(cfg) -> List[dict]:
    """
    detectron2's ``get_detection_dataset_dicts`` for ``cfg.DATASETS.TRAIN`` (empty-image
    filter, keypoint minimum); precomputed proposals when the config says so, joined to each
    dataset's dicts like detectron2's proposal files but never unpickling anything but data;
    when the model distils and ``MODEL.VILD.DISTILL.STORES`` names a store per dataset, each
    dataset's dicts are joined to its store as they are loaded
    (:func:`vild_d2.distill.targets.load_distill_targets_into_dataset`).
    """
    names = list(cfg.DATASETS.TRAIN)
    proposal_files = _proposal_files(
        cfg, names, cfg.DATASETS.PROPOSAL_FILES_TRAIN, "PROPOSAL_FILES_TRAIN"
    )
    kwargs = dict(
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
    )
    stores = distill_stores_from_config(cfg)
    if stores is None and proposal_files is None:
        return get_detection_dataset_dicts(names, **kwargs)
    dicts = []
    for i, name in enumerate(names):
        one = get_detection_dataset_dicts([name], **kwargs)
        if proposal_files is not None:
            one = load_proposals_into_dataset(one, proposal_files[i])
        if stores is not None:
            one = load_distill_targets_into_dataset(one, stores[i], cfg, name)
        dicts.extend(one)
    return dicts


def get_test_dicts(cfg, dataset_name: str) -> List[dict]:
    """The dicts of one test dataset, as detectron2's test loader reads them (no filter), with
    its ``DATASETS.PROPOSAL_FILES_TEST`` entry joined when ``MODEL.LOAD_PROPOSALS``."""
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    tests = list(cfg.DATASETS.TEST)
    files = _proposal_files(cfg, tests, cfg.DATASETS.PROPOSAL_FILES_TEST, "PROPOSAL_FILES_TEST")
    if files is not None and dataset_name in tests:
        dicts = load_proposals_into_dataset(dicts, files[tests.index(dataset_name)])
    elif files is not None:
        raise ValueError(
            f"{dataset_name} is not in DATASETS.TEST {tuple(tests)}, so it has no entry in "
            "DATASETS.PROPOSAL_FILES_TEST"
        )
    return dicts
