"""The project's config node, ``cfg.MODEL.VILD``."""

import ast
import math
import re
from typing import Any, Callable, Dict, Sequence, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .config_files import find_relative_paths, merge_config_file

__all__ = ["add_vild_config", "check_vild_config", "load_config", "needs_distillation"]

VARIANTS = ("text", "image", "vild", "ensemble")


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """A frozen config: detectron2's defaults + the ViLD node + ``config_file`` + ``opts``
    (``KEY VALUE ...`` overrides). The one way the tools and the predictor build a config; it
    registers the datasets of ``MODEL.VILD.DATASET_FILES``."""
    cfg = get_cfg()
    add_vild_config(cfg)
    merge_config_file(cfg, config_file)
    find_relative_paths(cfg, config_file)  # before opts: a path typed in them is the cwd's
    cfg.merge_from_list(numbers_in_opts(cfg, opts))  # "-1" for a float key: the range says
    cfg.freeze()
    check_vild_config(cfg)
    if cfg.MODEL.VILD.DATASET_FILES:  # here, so that every tool registers them
        from .data import register_dataset_files

        register_dataset_files(cfg.MODEL.VILD.DATASET_FILES)
    return cfg


def needs_distillation(cfg) -> bool:
    """Whether the model of ``cfg`` trains with distillation targets (a ViLD model whose
    variant is not ViLD-text; not e.g. the supervised baseline sharing a config base)."""
    vild_arch = cfg.MODEL.META_ARCHITECTURE in ("ViLDRCNN", "OfficialViLDRCNN")
    return vild_arch and cfg.MODEL.VILD.VARIANT != "text"


def add_vild_config(cfg):
    """Add ``cfg.MODEL.VILD`` (ViLD's options, with their paper/official defaults) to ``cfg``."""
    _C = cfg
    _C.MODEL.VILD = CN()
    # "text": ViLD-text (text classifier only); "image": ViLD-image (distillation only, the
    # paper's ablation); "vild": ViLD (text classifier + distillation boxes through the same
    # head); "ensemble": ViLD-ensemble (separate image-branch head).
    _C.MODEL.VILD.VARIANT = "vild"
    # CLIP teacher: a name for clip.load ("ViT-B/32", needs internet once) or a local checkpoint.
    _C.MODEL.VILD.CLIP_MODEL = "ViT-B/32"
    # Classifier used in training: a saved vocabulary file (tools/build_text_classifier.py) or a
    # registered dataset name (its thing_classes are encoded). "" = DATASETS.TRAIN[0].
    # Its names must be the training dataset's thing_classes, in order (they index gt_classes).
    _C.MODEL.VILD.TRAIN_VOCABULARY = ""
    # Classifier used at test time, same forms as above. "" = DATASETS.TEST[0], else the
    # training vocabulary. The model can switch it at run time (model.set_vocabulary).
    _C.MODEL.VILD.TEST_VOCABULARY = ""
    # Prompt templates file ("{}" = class name, "{article}" = a/an). "" = the 63 ViLD templates.
    _C.MODEL.VILD.PROMPT_TEMPLATES = ""
    # Your own datasets: YAML dataset files (docs/OWN_DATA.md), each registering
    # <name>_train_base and <name>_val when the config is loaded (vild_d2.config.load_config,
    # which every tool calls), e.g. ("my_parts.yaml",).
    _C.MODEL.VILD.DATASET_FILES = ()
    # Average each class's synonyms (dataset metadata "class_synonyms") into its embedding.
    _C.MODEL.VILD.USE_SYNONYMS = False
    # Where text embeddings are cached (under <it>/text), keyed by (CLIP model, templates,
    # names). "auto" = $VILD_D2_CACHE, default ~/.cache/vild_d2 (the dataset cache's folder too);
    # "" = no cache.
    _C.MODEL.VILD.EMBEDDING_CACHE_DIR = "auto"
    # Softmax temperature on cosine similarities (logits = cos / T; 0.01 = x100).
    _C.MODEL.VILD.TEMPERATURE = 0.01
    # Weight w of the L1 distillation loss (0.5 for R50; the paper used 1.0/2.0 for R152).
    _C.MODEL.VILD.DISTILL_WEIGHT = 0.5
    # Where the distillation targets come from (vild_d2/distill, docs/DISTILLATION.md).
    _C.MODEL.VILD.DISTILL = CN()
    # Stores made by tools/precompute_clip_embeddings.py, one per DATASETS.TRAIN entry, in order;
    # the mapper joins them by image id. () = the dataset dicts carry "distill_boxes" and
    # "distill_embeddings" themselves (or none, for ViLD-text).
    _C.MODEL.VILD.DISTILL.STORES = ()
    # An image absent from its store: "error", or "skip" (it trains without targets; counted
    # and logged when the loader is built).
    _C.MODEL.VILD.DISTILL.MISSING = "error"
    # Use the first (highest-objectness) MAX_BOXES boxes of each image.
    _C.MODEL.VILD.DISTILL.MAX_BOXES = 300
    # Context scales of the crops; must be those the stores were made with.
    _C.MODEL.VILD.DISTILL.CROP_SCALES = (1.0, 1.5)
    # Online mode, for small datasets: STORES are proposal stores (tools/precompute_proposals.py)
    # and the mapper computes the targets with CLIP_MODEL on the original image (same crops,
    # same numbers as the offline store). CLIP then runs in every dataloader worker.
    _C.MODEL.VILD.DISTILL.ONLINE = False
    _C.MODEL.VILD.DISTILL.ONLINE_DEVICE = "cpu"
    # Fine-tuning that keeps the open vocabulary (docs/OWN_DATA.md, issue 32): WEIGHT x L1
    # between the region embeddings and those of a frozen copy of the starting model (the
    # checkpoint START_WEIGHTS, built from this config) on the same sampled RoIs
    # (vild_d2/modeling/self_distill.py). 0 = off.
    _C.MODEL.VILD.SELF_DISTILL = CN()
    _C.MODEL.VILD.SELF_DISTILL.WEIGHT = 0.0
    _C.MODEL.VILD.SELF_DISTILL.START_WEIGHTS = ""
    # ViLD-ensemble: score = p_t^l * p_i^(1-l) on base classes, p_t^(1-l) * p_i^l on novel ones.
    _C.MODEL.VILD.ENSEMBLE_LAMBDA = 2.0 / 3.0
    # Classifiers without a trained background (CLIP on crops, ViLD-image) score a box by their
    # class probabilities times sigmoid(RPN objectness) ** OBJECTNESS_WEIGHT (0 = the class
    # probabilities alone): only the RPN can tell a whole object from a part or from background.
    _C.MODEL.VILD.OBJECTNESS_WEIGHT = 0.5
    # The "CLIP on cropped regions" baseline (META_ARCHITECTURE "CLIPOnCropsRCNN"): how many
    # top RPN proposals per image CLIP classifies.
    _C.MODEL.VILD.CLIP_ON_CROPS = CN()
    _C.MODEL.VILD.CLIP_ON_CROPS.NUM_PROPOSALS = 300

    # Large-scale jitter (official recipe): flip, resize by a random factor of IMAGE_SIZE, then
    # crop/pad to IMAGE_SIZE x IMAGE_SIZE. Replaces INPUT.MIN_SIZE_TRAIN resizing in training.
    _C.MODEL.VILD.LSJ = CN()
    _C.MODEL.VILD.LSJ.ENABLED = False
    _C.MODEL.VILD.LSJ.IMAGE_SIZE = 1024
    _C.MODEL.VILD.LSJ.MIN_SCALE = 0.1
    _C.MODEL.VILD.LSJ.MAX_SCALE = 2.0
    # Training from MODEL.WEIGHTS that fit only in part (another head, depth or CLIP width): the
    # tensors that do not fit are logged and left as initialised instead of being an error
    # (vild_d2/checkpoint.py). Evaluation always needs every tensor; NaN/inf is always an error.
    _C.MODEL.VILD.ALLOW_PARTIAL_WEIGHTS = False

    # The official (TensorFlow) ViLD architecture's options that detectron2's config has no key
    # for (META_ARCHITECTURE "OfficialViLDRCNN"; vild_d2/official, docs/OFFICIAL.md).
    _C.MODEL.VILD.OFFICIAL = CN()
    # Norm of every official module: "BN" (batch statistics in training), "SyncBN" (the
    # official TPU recipe; CUDA only), "NaiveSyncBN" (synchronised over any backend, gloo on a
    # CPU too), "FrozenBN" (fine-tuning / inference only).
    _C.MODEL.VILD.OFFICIAL.NORM = "BN"
    # tf.layers.batch_normalization's settings: epsilon 1e-4, TF momentum 0.997, i.e.
    # PyTorch momentum 1 - 0.997 (PyTorch weighs the new batch, TF the running value).
    _C.MODEL.VILD.OFFICIAL.BN_EPS = 1e-4
    _C.MODEL.VILD.OFFICIAL.BN_MOMENTUM = 0.003
    # Test-time input: the image's longer side is resized to IMAGE_SIZE (TF's legacy bilinear
    # resize, no half-pixel centres) and the image padded to IMAGE_SIZE x IMAGE_SIZE; boxes are
    # clipped to that canvas, [0, IMAGE_SIZE - 1], as the official code does. In training the
    # mapper's image (e.g. large-scale jitter) is padded to IMAGE_SIZE x IMAGE_SIZE.
    _C.MODEL.VILD.OFFICIAL.IMAGE_SIZE = 1024
    # Anchor size in units of the level's stride (anchor side = ANCHOR_SIZE * 2^level); the
    # ratios are MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS, read as width / height.
    _C.MODEL.VILD.OFFICIAL.ANCHOR_SIZE = 8.0
    # Post-processing (postprocess.pre_nms_num_boxes): per class, the top-scoring boxes kept
    # before its NMS; then MODEL.ROI_HEADS.NMS_THRESH_TEST and TEST.DETECTIONS_PER_IMAGE.
    _C.MODEL.VILD.OFFICIAL.PRE_NMS_TOPK_PER_CLASS = 1000
    # Detections mapped back to the input image (evaluation, --json, pictures): "official"
    # pastes masks as the official evaluation (utils/mask_utils.py: paste_instance_masks),
    # "detectron2" with paste_masks_in_image; CLIP_BOXES_TO_IMAGE clips boxes to the image and
    # drops the ones left empty, as detectron2 does (the official evaluation does neither).
    # The official configs set "official" and False (vild_d2/official/masks.py).
    _C.MODEL.VILD.OFFICIAL.PASTE_MASKS = "detectron2"
    _C.MODEL.VILD.OFFICIAL.CLIP_BOXES_TO_IMAGE = True
    # Training as the official code (vild_d2/official/training, docs/OFFICIAL.md "Training"):
    # its anchor labelling, RoI and mask sampling, losses and reductions. False = detectron2's
    # samplers and losses on the official architecture.
    _C.MODEL.VILD.OFFICIAL.TRAINING = False
    # Ground-truth slots per image (vild_parser max_num_instances): the -1 padding is appended to
    # the proposals and sampled as background, as officially.
    _C.MODEL.VILD.OFFICIAL.MAX_INSTANCES = 300
    # Distillation boxes per image (architecture.max_num_rois), padded with -1 boxes that the box
    # head's batch norms see.
    _C.MODEL.VILD.OFFICIAL.MAX_DISTILL_ROIS = 300
    # Mask RoIs per image (mask_sampling.num_mask_samples_per_image) and the parser's soft crop
    # of each ground-truth mask (vild_parser.mask_crop_size).
    _C.MODEL.VILD.OFFICIAL.NUM_MASK_SAMPLES = 128
    _C.MODEL.VILD.OFFICIAL.MASK_CROP_SIZE = 112
    # frcnn_class_loss.mask_rare: multiply the logits of the training vocabulary's novel classes
    # by 0 in the class loss (they stay in the softmax as logit 0). Only meaningful with a
    # training vocabulary that includes the novel classes (the official one: all 1203 LVIS
    # classes); with vild_d2's base-only training vocabulary there is nothing to mask.
    _C.MODEL.VILD.OFFICIAL.MASK_RARE = False
    # vild_parser's flip: the distillation boxes get their own coin, independent of the image's
    # (the official double flip, VILD_SPEC.md's known bug). False = one flip for everything.
    _C.MODEL.VILD.OFFICIAL.DOUBLE_FLIP = False


# --- what each MODEL.VILD value may be ------------------------------------------------------


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v) -> bool:
    return isinstance(v, str)


def _texts(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _flag(v) -> bool:
    return isinstance(v, bool)


# Every leaf of cfg.MODEL.VILD: (what it may be, the test). tests/config/test_config_ranges.py
# checks that no key is left without a rule.
RULES: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "VARIANT": (f"one of {', '.join(VARIANTS)}", lambda v: v in VARIANTS),
    "CLIP_MODEL": ("a CLIP name or checkpoint path", lambda v: _text(v) and bool(v.strip())),
    "TRAIN_VOCABULARY": ("a vocabulary file, dataset name or ''", _text),
    "TEST_VOCABULARY": ("a vocabulary file, dataset name or ''", _text),
    "PROMPT_TEMPLATES": ("a templates file or ''", _text),
    "USE_SYNONYMS": ("True or False", _flag),
    "EMBEDDING_CACHE_DIR": ("a folder, 'auto' or ''", _text),
    "TEMPERATURE": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "DISTILL_WEIGHT": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "DISTILL.STORES": ("a list of store folders", _texts),
    "DISTILL.MISSING": ("'error' or 'skip'", lambda v: v in ("error", "skip")),
    "DISTILL.MAX_BOXES": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "DISTILL.CROP_SCALES": (
        "one or more numbers > 0",
        lambda v: isinstance(v, (list, tuple))
        and len(v) > 0
        and all(_number(s) and s > 0 for s in v),
    ),
    "DISTILL.ONLINE": ("True or False", _flag),
    "DISTILL.ONLINE_DEVICE": (
        "'cpu', 'cuda' or 'cuda:N'",
        lambda v: _text(v) and re.fullmatch(r"cpu|cuda(:\d+)?", v) is not None,
    ),
    "SELF_DISTILL.WEIGHT": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "SELF_DISTILL.START_WEIGHTS": ("a checkpoint file or ''", _text),
    "ENSEMBLE_LAMBDA": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    "OBJECTNESS_WEIGHT": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "CLIP_ON_CROPS.NUM_PROPOSALS": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "LSJ.ENABLED": ("True or False", _flag),
    "LSJ.IMAGE_SIZE": ("an integer >= 32", lambda v: _integer(v) and v >= 32),
    "LSJ.MIN_SCALE": ("a number > 0", lambda v: _number(v) and v > 0),
    "LSJ.MAX_SCALE": ("a number >= LSJ.MIN_SCALE", _number),
    "DATASET_FILES": ("a list of dataset files", _texts),
    "ALLOW_PARTIAL_WEIGHTS": ("True or False", _flag),
    "OFFICIAL.NORM": (
        "'BN', 'SyncBN', 'NaiveSyncBN' or 'FrozenBN'",
        lambda v: v in ("BN", "SyncBN", "NaiveSyncBN", "FrozenBN"),
    ),
    "OFFICIAL.BN_EPS": ("a number > 0", lambda v: _number(v) and v > 0),
    "OFFICIAL.BN_MOMENTUM": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    "OFFICIAL.IMAGE_SIZE": ("an integer >= 32", lambda v: _integer(v) and v >= 32),
    "OFFICIAL.ANCHOR_SIZE": ("a number > 0", lambda v: _number(v) and v > 0),
    "OFFICIAL.PRE_NMS_TOPK_PER_CLASS": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "OFFICIAL.PASTE_MASKS": (
        "'official' or 'detectron2'",
        lambda v: v in ("official", "detectron2"),
    ),
    "OFFICIAL.CLIP_BOXES_TO_IMAGE": ("True or False", _flag),
    "OFFICIAL.TRAINING": ("True or False", _flag),
    "OFFICIAL.MAX_INSTANCES": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "OFFICIAL.MAX_DISTILL_ROIS": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "OFFICIAL.NUM_MASK_SAMPLES": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "OFFICIAL.MASK_CROP_SIZE": ("an integer >= 2", lambda v: _integer(v) and v >= 2),
    "OFFICIAL.MASK_RARE": ("True or False", _flag),
    "OFFICIAL.DOUBLE_FLIP": ("True or False", _flag),
}


def _positive_integer(v) -> bool:
    return _integer(v) and v >= 1


def _numbers(v, ok=lambda x: True) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_number(x) and ok(x) for x in v)


# detectron2's own keys that vild_d2's model, predictor, tools and exporter read: out of range,
# they fail far from the config (a division by a zero PIXEL_STD, a resize to 0 px, no box).
D2_RULES: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "INPUT.MIN_SIZE_TEST": ("an integer >= 0 (0 = no resize)", lambda v: _integer(v) and v >= 0),
    "INPUT.MAX_SIZE_TEST": ("an integer >= 1", _positive_integer),
    "MODEL.PIXEL_MEAN": ("finite numbers, one per channel", _numbers),
    "MODEL.PIXEL_STD": (
        "numbers > 0, one per channel (the image is divided by them)",
        lambda v: _numbers(v, lambda x: x > 0),
    ),
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": ("an integer >= 1", _positive_integer),
    "MODEL.RPN.PRE_NMS_TOPK_TEST": ("an integer >= 1", _positive_integer),
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": ("an integer >= 1", _positive_integer),
    "MODEL.RPN.POST_NMS_TOPK_TEST": ("an integer >= 1", _positive_integer),
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": ("an integer >= 1", _positive_integer),
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": ("an integer >= 1", _positive_integer),
    # Below 0 keeps every box, also probabilities that underflow to 0 (an untrained model).
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": ("a number <= 1", lambda v: _number(v) and v <= 1),
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    "TEST.DETECTIONS_PER_IMAGE": ("an integer >= 1", _positive_integer),
}


def _leaves(node: CN, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(cfg, full_key: str):
    """The value of a dotted key; KeyError if there is none."""
    node = cfg
    for part in full_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(full_key)
        node = node[part]
    return node


def _has_rule(full_key: str) -> bool:
    vild = "MODEL.VILD."
    return full_key in D2_RULES or (full_key.startswith(vild) and full_key[len(vild) :] in RULES)


def numbers_in_opts(cfg, opts: Sequence[Any]) -> list:
    """
    ``opts`` (``KEY VALUE ...``) for ``cfg.merge_from_list``, with the values that yacs would
    refuse for their type alone turned into the number they spell, so that the range check
    names them instead of yacs's "Type mismatch": an integer for a float key (``TEMPERATURE
    -1`` -> -1.0), and ``nan`` / ``inf`` for a range-checked float key (other keys keep
    yacs's refusal of them).
    """
    opts = list(opts)
    for i in range(0, len(opts) - 1, 2):
        key, value = opts[i], opts[i + 1]
        if not isinstance(key, str) or not isinstance(value, str):
            continue
        try:
            default = _get(cfg, key)
        except KeyError:  # yacs names an unknown key
            continue
        if not isinstance(default, float):
            continue
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        if isinstance(parsed, int) and not isinstance(parsed, bool):
            opts[i + 1] = float(parsed)
        elif isinstance(parsed, str) and _has_rule(key):
            try:
                opts[i + 1] = float(parsed)  # "nan", "inf", "-Infinity"
            except ValueError:
                pass  # not a number at all: yacs's message says so
    return opts


def check_vild_config(cfg) -> None:
    """
    Range-check every ``cfg.MODEL.VILD`` value (:data:`RULES`) and detectron2's keys that
    vild_d2 reads (:data:`D2_RULES`).

    Raises:
        ValueError: naming each key out of range, its value and what it may be.
    """
    problems = []
    values = dict(_leaves(cfg.MODEL.VILD))
    for key, value in values.items():
        if key not in RULES:  # (tests/config/test_config_ranges.py keeps every key covered)
            continue
        allowed, ok = RULES[key]
        if not ok(value):
            problems.append(f"MODEL.VILD.{key} = {value!r}: must be {allowed}")
    lsj_min, lsj_max = values.get("LSJ.MIN_SCALE"), values.get("LSJ.MAX_SCALE")
    if _number(lsj_min) and _number(lsj_max) and lsj_max < lsj_min:
        problems.append(
            f"MODEL.VILD.LSJ.MAX_SCALE = {lsj_max!r}: must be >= LSJ.MIN_SCALE ({lsj_min!r})"
        )
    weight, start = values.get("SELF_DISTILL.WEIGHT"), values.get("SELF_DISTILL.START_WEIGHTS")
    if _number(weight) and weight > 0 and start == "":
        problems.append(
            f"MODEL.VILD.SELF_DISTILL.WEIGHT = {weight!r} needs MODEL.VILD.SELF_DISTILL."
            "START_WEIGHTS: the starting model's checkpoint (the MODEL.WEIGHTS being fine-tuned)"
        )
    for key, (allowed, ok) in D2_RULES.items():
        try:
            value = _get(cfg, key)
        except KeyError:  # a config without that node (e.g. a test's)
            continue
        if not ok(value):
            problems.append(f"{key} = {value!r}: must be {allowed}")
    mean, std = cfg.MODEL.get("PIXEL_MEAN"), cfg.MODEL.get("PIXEL_STD")
    if _numbers(mean) and _numbers(std) and len(mean) != len(std):
        problems.append(
            f"MODEL.PIXEL_STD = {list(std)!r}: must have one number per channel, as "
            f"MODEL.PIXEL_MEAN ({len(mean)})"
        )
    if problems:
        raise ValueError("config values out of range:\n  " + "\n  ".join(problems))
