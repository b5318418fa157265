"""The detectron2 Trainer for ViLD, and ``setup(args)`` shared by the tools."""

import logging
import os
import weakref

from detectron2.config import get_cfg
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator

from ..checkpoint import ViLDCheckpointer
from ..compat import has_compiled_ops
from ..config import add_vild_config
from ..data import ViLDDatasetMapper

__all__ = ["Trainer", "setup"]

logger = logging.getLogger(__name__)


def setup(args):
    """Config from ``args.config_file`` + ``args.opts`` with the ViLD node; detectron2's setup."""
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


class Trainer(DefaultTrainer):
    """DefaultTrainer with ViLD's mapper, evaluators and vocabulary-saving checkpointer."""

    def build_hooks(self):
        # DefaultTrainer.__init__ made a plain DetectionCheckpointer; swap in ours before the
        # checkpoint hook captures it, so checkpoints record the vocabulary.
        self.checkpointer = ViLDCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        _check_training_vocabulary(cfg, model)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=ViLDDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=ViLDDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The evaluator named by the dataset's metadata ``evaluator_type``."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "lvis":
            return LVISEvaluator(
                dataset_name,
                output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            )
        if evaluator_type == "coco":
            # The fast COCOeval needs detectron2's compiled ops.
            return COCOEvaluator(
                dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
            )
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise NotImplementedError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; vild_d2 evaluates "
            "'lvis', 'coco' and 'pascal_voc' datasets"
        )


def _check_training_vocabulary(cfg, model):
    """The training classifier's rows are indexed by the datasets' ``gt_classes``: its names
    must be each training dataset's ``thing_classes``, in order."""
    names = model.roi_heads.box_predictor.train_vocabulary.names
    for dataset in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(dataset).get("thing_classes", None)
        if classes is not None and list(classes) != list(names):
            diff = next(
                (i for i, (a, b) in enumerate(zip(classes, names)) if a != b),
                min(len(classes), len(names)),
            )
            raise ValueError(
                f"training vocabulary ({len(names)} classes, MODEL.VILD.TRAIN_VOCABULARY="
                f"{cfg.MODEL.VILD.TRAIN_VOCABULARY!r}) does not match the thing_classes of "
                f"training dataset {dataset!r} ({len(classes)} classes); first difference at "
                f"index {diff}. Its rows must be the dataset's classes, in order."
            )
