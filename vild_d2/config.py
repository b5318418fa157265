"""The project's config node, ``cfg.MODEL.VILD``."""

from typing import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_vild_config", "load_config", "needs_distillation"]

VARIANTS = ("text", "image", "vild", "ensemble")


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """A frozen config: detectron2's defaults + the ViLD node + ``config_file`` + ``opts``
    (``KEY VALUE ...`` overrides). The one way the tools and the predictor build a config; it
    registers the datasets of ``MODEL.VILD.DATASET_FILES``."""
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    if cfg.MODEL.VILD.DATASET_FILES:  # here, so that every tool registers them
        from .data import register_dataset_files

        register_dataset_files(cfg.MODEL.VILD.DATASET_FILES)
    return cfg


def needs_distillation(cfg) -> bool:
    """Whether the model of ``cfg`` trains with distillation targets (a ViLD model whose
    variant is not ViLD-text; not e.g. the supervised baseline sharing a config base)."""
    return cfg.MODEL.META_ARCHITECTURE == "ViLDRCNN" and cfg.MODEL.VILD.VARIANT != "text"


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
    from .official.config import add_official_config; add_official_config(_C)  # noqa: E702
