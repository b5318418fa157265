"""The detectron2 Trainer for ViLD, and ``setup(args)`` shared by the tools."""

import contextlib
import json
import logging
import os
import weakref
from collections import OrderedDict

import torch
import yaml

from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
)
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import ViLDCheckpointer
from ..compat import has_compiled_ops
from ..config import load_config
from ..data import ViLDDatasetMapper
from ..evaluation import COCOOpenVocabularyEvaluator
from ..fileio import atomic_write
from ..modeling.self_distill import attach_self_distillation, check_start_weights
from .resume import (
    ResumeStateHook,
    build_resumable_train_loader,
    load_resume_state,
    preserved_rng_state,
    restore_rng_state,
    resume_state,
)
from .training_data import get_test_dicts, get_training_dicts

__all__ = ["Trainer", "setup", "check_device", "check_same_config", "check_weights"]

logger = logging.getLogger(__name__)


def setup(args, *, check_data: bool = False):
    """
    Config from ``args.config_file`` + ``args.opts`` with the ViLD node; detectron2's setup.
    With ``check_data``, the datasets the run reads (training, or the test ones with
    ``args.eval_only``) are loaded first (:meth:`Trainer.check_data`), so that a refused
    dataset leaves the output folder as it was: detectron2's setup writes ``config.yaml`` and
    ``log.txt`` there. What they log meanwhile goes to the log once it is set up. Before the
    datasets, :func:`check_device` and :func:`check_weights` (a GPU the machine lacks, weights
    it cannot read or download) give one clear error.
    """
    cfg = load_config(args.config_file, args.opts)
    check_same_config(cfg)
    held = []
    if check_data:
        # What the run needs from this machine, before the datasets load and anything is
        # written.
        check_device(cfg)
        check_weights(cfg, resume=getattr(args, "resume", False))
        if not getattr(args, "eval_only", False):
            check_start_weights(cfg)
        with _holding_log_records(held):
            Trainer.check_data(cfg, eval_only=getattr(args, "eval_only", False))
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers; ours report vocabulary
    # switches and distillation stores.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="vild_d2")
    for record in held:
        logging.getLogger(record.name).handle(record)
    return cfg


def check_device(cfg) -> None:
    """A ValueError naming ``MODEL.DEVICE cpu`` when the config asks for CUDA on a machine
    without it (torch's own error, "Found no NVIDIA driver", comes when the model is moved,
    after the output folder is written)."""
    device = cfg.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE is {device!r} but this machine has no CUDA GPU "
            "(torch.cuda.is_available() is False): add MODEL.DEVICE cpu to the command line "
            "(--num-gpus N then runs N CPU processes)"
        )


# detectron2's model-zoo prefix, as its PathManager handler resolves it.
_D2_PREFIX, _D2_URL = "detectron2://", "https://dl.fbaipublicfiles.com/detectron2/"


def check_weights(cfg, *, resume: bool = False) -> None:
    """``MODEL.WEIGHTS`` readable before the run starts: a local file that exists, or a URL
    fetched now into iopath's cache (where the checkpointer then finds it). Offline, a
    ValueError naming the key and what to give instead, not urllib's traceback. Skipped when
    the run resumes from its own ``last_checkpoint`` (it does not read ``MODEL.WEIGHTS``)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        return
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    if "://" not in weights:
        if not os.path.isfile(os.path.expanduser(weights)):
            raise FileNotFoundError(f"MODEL.WEIGHTS {weights}: no such file")
        return
    try:
        PathManager.get_local_path(weights)
    except OSError as e:  # urllib's URLError / HTTPError: offline, DNS, proxy, 404
        url = _D2_URL + weights[len(_D2_PREFIX) :] if weights.startswith(_D2_PREFIX) else weights
        name = os.path.basename(url) or "weights.pkl"
        raise ValueError(
            f"MODEL.WEIGHTS {weights} could not be downloaded ({type(e).__name__}: "
            f"{getattr(e, 'reason', e)}): offline, copy {url} from a machine online and give "
            f"its path (MODEL.WEIGHTS /path/to/{name}), or MODEL.WEIGHTS \"\" to train from "
            "scratch (docs/OWN_DATA.md, the CPU recipe)"
        ) from e


@contextlib.contextmanager
def _holding_log_records(held: list):
    """Within the block, INFO and higher log records of every logger are appended to ``held``
    instead of being emitted (no handler is set up yet)."""
    root = logging.getLogger()
    handler = logging.Handler(logging.INFO)
    handler.emit = held.append
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def check_same_config(cfg) -> None:
    """
    In a distributed job, every rank must run the same config (each machine parses its own
    command line): otherwise a ValueError on every rank, naming the keys that differ.
    """
    if comm.get_world_size() == 1:
        return
    dumps = comm.all_gather(cfg.dump())  # over gloo on any backend: strings of a few KB
    if all(d == dumps[0] for d in dumps):
        return
    ours = _flatten(yaml.safe_load(dumps[0]))
    lines = []
    for rank, dump in enumerate(dumps):
        theirs = _flatten(yaml.safe_load(dump))
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                a, b = ours.get(key), theirs.get(key)
                lines.append(f"{key}: {a!r} on rank 0, {b!r} on rank {rank}")
    shown = "\n  ".join(lines[:10])
    raise ValueError(
        f"the config differs across the {len(dumps)} ranks of this job (each machine must be "
        f"given the same --config-file and overrides):\n  {shown}"
    )


def _flatten(node, prefix=""):
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    flat = {}
    for key, child in node.items():
        flat.update(_flatten(child, f"{prefix}{key}."))
    return flat


class Trainer(DefaultTrainer):
    """DefaultTrainer with ViLD's mapper, evaluators and vocabulary-saving checkpointer; it
    trains data-parallel on CPU processes too (gloo; the ``create_ddp_model`` bridge in
    :mod:`vild_d2.compat`). Its checkpoints also hold the data stream's position and the RNG
    states (:mod:`vild_d2.engine.resume`): a resumed run ends as an uninterrupted one would."""

    def __init__(self, cfg):
        super().__init__(cfg)
        # Here, not in build_model (which evaluation shares): the frozen starting model of
        # MODEL.VILD.SELF_DISTILL, for training only.
        attach_self_distillation(self._trainer.model, cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ made a plain DetectionCheckpointer; swap in ours before the
        # checkpoint hook captures it, so checkpoints record the vocabulary. It saves on rank 0
        # only (save_to_disk defaults to comm.is_main_process()).
        self.checkpointer = ViLDCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            partial=self.cfg.MODEL.VILD.ALLOW_PARTIAL_WEIGHTS,
            trainer=weakref.proxy(self),
        )
        ret = super().build_hooks()
        if comm.get_world_size() > 1:
            # Only rank 0 saves: every rank's resume state is gathered just before it does.
            at = next(
                i
                for i, h in enumerate(ret + [None])
                if h is None or isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
            )
            ret.insert(at, ResumeStateHook(self.cfg.SOLVER.CHECKPOINT_PERIOD, self.max_iter))
        return ret

    def state_dict(self):
        ret = super().state_dict()
        # detectron2 0.6's DefaultTrainer leaves out its SimpleTrainer's state: the optimizer
        # (momentum), and AMP's grad scaler. Saved under the key later detectron2 releases use.
        ret["_trainer"] = self._trainer.state_dict()
        resume = resume_state(self)
        if resume is not None:
            ret["resume"] = resume
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning(
                "The checkpoint has no optimizer state (written by an older vild_d2): the "
                "optimizer's momentum starts again from zero."
            )
        # The RNGs are set when training starts: loading the rest of the checkpoint (e.g. the
        # vocabulary) must not move them.
        self._rng_to_restore = load_resume_state(self, state_dict.get("resume"))

    def train(self):
        rng = getattr(self, "_rng_to_restore", None)
        if rng is not None:
            restore_rng_state(rng)
            self._rng_to_restore = None
        return super().train()

    # Dataset dicts loaded by check_data, for the loader built next from the same config.
    _checked_dicts: dict = {}

    @classmethod
    def check_data(cls, cfg, *, eval_only: bool = False) -> None:
        """Load the training dataset dicts (or with ``eval_only`` the test datasets'), which
        raises if a dataset is refused; kept for the loaders built next from this config."""
        key = _data_key(cfg)
        cls._checked_dicts.clear()
        if eval_only:
            for name in cfg.DATASETS.TEST:
                cls._checked_dicts[(key, name)] = get_test_dicts(cfg, name)
        else:
            cls._checked_dicts[(key, None)] = get_training_dicts(cfg)

    @classmethod
    def _dicts(cls, cfg, dataset_name=None):
        dicts = cls._checked_dicts.pop((_data_key(cfg), dataset_name), None)
        if dicts is not None:
            return dicts
        if dataset_name is None:
            return get_training_dicts(cfg)
        return get_test_dicts(cfg, dataset_name)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        _check_training_vocabulary(cfg, model)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader, made resumable (:func:`build_resumable_train_loader`), with
        :class:`ViLDDatasetMapper`, over the training dicts joined to their distillation stores
        (:func:`vild_d2.engine.get_training_dicts`)."""
        mapper = ViLDDatasetMapper(cfg, is_train=True)
        return build_resumable_train_loader(cfg, mapper, cls._dicts(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # the dicts of vild_d2 (get_test_dicts): detectron2's would unpickle proposal files
        return build_detection_test_loader(
            cls._dicts(cfg, dataset_name),
            mapper=ViLDDatasetMapper(cfg, is_train=False),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """
        As :meth:`DefaultTrainer.test`, but each test dataset is evaluated with its own classes
        as the vocabulary (the evaluators read class indices as the dataset's; models without
        a vocabulary, e.g. the supervised baseline, are evaluated as they are); the model's
        vocabulary is restored afterwards. Each dataset's results are also written to
        ``OUTPUT_DIR/inference/<dataset>/results.json``.
        """
        vild = model.module if isinstance(model, DistributedDataParallel) else model
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(
                f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} test datasets "
                f"{tuple(cfg.DATASETS.TEST)}: give one per dataset"
            )
        switches = hasattr(vild, "set_vocabulary")
        previous = vild.vocabulary if switches else None
        results = OrderedDict()
        try:
            for i, name in enumerate(cfg.DATASETS.TEST):
                if switches:
                    _use_dataset_vocabulary(cfg, vild, name)
                one = cfg.clone()
                one.defrost()
                one.DATASETS.TEST = (name,)
                one_evaluator = None if evaluators is None else [evaluators[i]]
                # An evaluation during training (EvalHook) must not move the training's RNGs
                # (the test loader draws a seed from them): a resume would not be exact.
                with preserved_rng_state():
                    results[name] = super().test(one, model, one_evaluator)
                if comm.is_main_process():
                    path = os.path.join(cfg.OUTPUT_DIR, "inference", name, "results.json")
                    atomic_write(path, [json.dumps(results[name], indent=1).encode()])
        finally:
            if switches:
                vild.set_vocabulary(previous)
        return list(results.values())[0] if len(results) == 1 else results

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The evaluator named by the dataset's metadata ``evaluator_type``; COCO-style ones
        score only the metadata's ``evaluation_tasks`` when set (e.g. ("bbox",) for a dataset
        without mask annotations), else every task the predictions have."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        evaluator_type = meta.get("evaluator_type", None)
        tasks = meta.get("evaluation_tasks", None)
        tasks = tuple(tasks) if tasks else None
        if evaluator_type == "lvis":
            return LVISEvaluator(
                dataset_name,
                tasks,
                output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            )
        if evaluator_type == "coco":
            # The fast COCOeval needs detectron2's compiled ops.
            return COCOEvaluator(
                dataset_name, tasks, output_dir=output_folder, use_fast_impl=has_compiled_ops()
            )
        if evaluator_type == "coco_ovd":
            # Box AP50 on novel / base / all classes (COCO 48/17), besides COCO's metrics.
            return COCOOpenVocabularyEvaluator(
                dataset_name, tasks, output_dir=output_folder, use_fast_impl=has_compiled_ops()
            )
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise NotImplementedError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; vild_d2 evaluates "
            "'lvis', 'coco', 'coco_ovd' and 'pascal_voc' datasets"
        )


def _data_key(cfg) -> str:
    """The config as the data loaders read it (:meth:`Trainer.test` narrows DATASETS.TEST to
    one dataset at a time)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ()
    return cfg.dump()


def _check_training_vocabulary(cfg, model):
    """The training classifier's rows are indexed by the datasets' ``gt_classes``: its names
    must be each training dataset's ``thing_classes``, in order."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    vocabulary = getattr(getattr(predictor, "cls_score", None), "train_vocabulary", None)
    if vocabulary is None:  # not a ViLD model (e.g. the supervised baseline)
        return
    names = vocabulary.names
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


def _use_dataset_vocabulary(cfg, model, dataset_name):
    """Make ``model`` detect ``dataset_name``'s classes, in order, before evaluating it: their
    text names are the metadata's ``vocabulary_names`` if set (e.g. VOC's readable names), else
    its ``thing_classes``."""
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("vocabulary_names", None) or meta.get("thing_classes", None)
    names = model.vocabulary.names
    if classes is None or names == list(classes):
        return
    if cfg.MODEL.VILD.TEST_VOCABULARY:
        raise ValueError(
            f"MODEL.VILD.TEST_VOCABULARY={cfg.MODEL.VILD.TEST_VOCABULARY!r} gives {len(names)} "
            f"classes ({names[:3]}...) but test dataset {dataset_name!r} has {len(classes)} "
            f"thing_classes ({list(classes)[:3]}...): its evaluator reads class indices as the "
            "dataset's. Leave TEST_VOCABULARY empty to evaluate each dataset with its classes."
        )
    logger.info(f"Evaluating {dataset_name!r} with its {len(classes)} classes as vocabulary")
    model.set_vocabulary(dataset_name)
