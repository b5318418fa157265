"""The models the benchmarks compare, made to do alike work, and :class:`BenchmarkSetup`, the
options and inputs every task shares.

All models share one architecture (backbone, RPN, box head, mask head, class-agnostic box
regression and masks, 1203 LVIS classes) and the same weights where they have the same parts;
they differ only in the classifier: stock = a learned linear layer over 1203+1 classes,
ViLD = cosine similarity to 1203 text embeddings + a background embedding. Weights are random
(nothing can be downloaded here): speed does not depend on them, but the score- and
proposal-dependent work does, so :func:`build_models` makes it alike for all models.
"""

from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from vild_d2.config import load_config
from vild_d2.text import Vocabulary, build_clip, builtin_vocabulary

from .common import EMBED_DIM, NUM_CLASSES, NUM_DISTILL, PHOTOS, inference_input, photos

__all__ = ["BenchmarkSetup", "build_models", "QUICK_OPTS", "TINY_CLIP_LABEL"]

# A tiny text and image tower with ViT-B/32's 512-d output, so its vocabularies fit the models.
TINY_CLIP = dict(
    embed_dim=EMBED_DIM,
    image_resolution=32,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=16,
    transformer_width=64,
    transformer_layers=1,
)
TINY_CLIP_LABEL = "tiny random CLIP (1 layer, width 64)"

FULL_CONFIG = "configs/Base-ViLD-RCNN-FPN.yaml"
FULL_MODEL = "R50-FPN Mask R-CNN (configs/Base-ViLD-RCNN-FPN.yaml)"
QUICK_CONFIG = "configs/Shapes/Base-Shapes-R18-FPN.yaml"
QUICK_MODEL = "shapes R18-FPN, tiny heads (configs/Shapes/Base-Shapes-R18-FPN.yaml + QUICK_OPTS)"
# The shapes model at the tests' size (tests/tiny_world.py: TINY_OPTS): small heads and few
# test proposals, so that --quick stays a smoke run of a few seconds.
QUICK_OPTS = [
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "400",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "100",
    # Enough training proposals for the same-RoI-count stock run (64 + 300 RoIs per image).
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "1000",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "500",
    "MODEL.ROI_BOX_HEAD.NUM_CONV",
    "1",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "128",
    "MODEL.ROI_MASK_HEAD.NUM_CONV",
    "1",
    "TEST.DETECTIONS_PER_IMAGE",
    "50",
]


# ---------------------------------------------------------------------------------------------
# Files the configs point at
def save_clip(path, seed: int = 0, **dims) -> str:
    """A random-weight CLIP of ``dims`` (see :func:`vild_d2.text.build_clip`) saved where
    ``clip.load`` reads it, as the configs and the text encoder want a checkpoint path."""
    torch.manual_seed(seed)
    torch.save(build_clip(**dims).state_dict(), str(path))
    return str(path)


def save_random_vocabulary(path, names: Sequence[str], dim: int = EMBED_DIM) -> str:
    """A vocabulary of ``names`` with random unit (dim,) embeddings, saved: the models'
    training and test vocabulary, so that building them encodes nothing."""
    g = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(len(names), dim, generator=g), dim=1)
    Vocabulary(names, embeddings).save(str(path))
    return str(path)


def model_opts(
    quick: bool,
    device: str,
    size: int,
    score_thresh: float,
    clip_path: str,
    vocabulary: str,
    cache_dir: str,
) -> List[str]:
    """The config overrides every model of the benchmark shares: the tiny CLIP, ``vocabulary``
    (a saved file) for training and test, test images of short side ``size``."""
    opts = [
        "MODEL.DEVICE",
        device,
        "MODEL.WEIGHTS",
        "",
        "MODEL.VILD.CLIP_MODEL",
        clip_path,
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        cache_dir,
        "MODEL.VILD.TRAIN_VOCABULARY",
        vocabulary,
        "MODEL.VILD.TEST_VOCABULARY",
        vocabulary,
        # Inputs are made here, not loaded: no datasets, no distillation stores.
        "MODEL.VILD.DISTILL.STORES",
        "()",
        "DATASETS.TRAIN",
        "()",
        "DATASETS.TEST",
        "()",
        "INPUT.MIN_SIZE_TEST",
        str(size),
        "INPUT.MAX_SIZE_TEST",
        str(size * 2),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        str(score_thresh),
    ]
    if quick:
        return opts + QUICK_OPTS
    return opts + ["MODEL.BACKBONE.FREEZE_AT", "2"]  # detectron2's default for R50 training


# ---------------------------------------------------------------------------------------------
# Models
def build_vild(config_file: str, opts: Sequence[str], variant: str = "vild"):
    """A ViLD model (eval mode) of ``variant``, seeded so every build starts alike."""
    torch.manual_seed(0)
    model = build_model(load_config(config_file, [*opts, "MODEL.VILD.VARIANT", variant]))
    return model.eval()


def build_stock(config_file: str, opts: Sequence[str]):
    """detectron2's own Mask R-CNN (eval mode) of the same config, over NUM_CLASSES + 1."""
    stock_opts = [
        *opts,
        "MODEL.META_ARCHITECTURE",
        "GeneralizedRCNN",
        "MODEL.ROI_HEADS.NAME",
        "StandardROIHeads",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        str(NUM_CLASSES),
    ]
    torch.manual_seed(0)
    return build_model(load_config(config_file, stock_opts)).eval()


@torch.no_grad()
def zero_rpn_deltas(model) -> None:
    """Random RPN deltas on a randomly initialised ResNet are huge: the proposals collapse to a
    few dozen clipped boxes and the RoI heads get almost no work. With zero deltas the
    proposals are the anchors, as many as a trained RPN gives."""
    model.proposal_generator.rpn_head.anchor_deltas.weight.zero_()
    model.proposal_generator.rpn_head.anchor_deltas.bias.zero_()


@torch.no_grad()
def copy_text_branch_to_image_branch(ensemble) -> None:
    """ViLD-ensemble's image branch := its text branch, so its scores are as peaked as ViLD's
    (a random image branch gives ~1/K everywhere and nearly no detections to process)."""
    heads = ensemble.roi_heads
    heads.image_box_head.load_state_dict(heads.box_head.state_dict())
    heads.image_projection.load_state_dict(heads.box_predictor.cls_score.projection.state_dict())


@torch.no_grad()
def match_stock_classifier(stock, vild, inputs: List[dict]) -> None:
    """
    Set stock's linear classifier to the linear map closest to ViLD's cosine classifier, so
    both give similar score distributions and their score-dependent post-processing (NMS, mask
    head on the detections) does similar work: W = E P / (T s), b = E p / (T s), with E the unit
    (K+1, D) class embeddings (background last), P, p ViLD's projection, T its temperature and
    s the mean norm of P x + p over the RoI features x of ``inputs``. ``vild`` in eval mode.
    """
    classifier = vild.roi_heads.box_predictor.cls_score
    heads = vild.roi_heads
    images = vild.preprocess_image(inputs)
    features = vild.backbone(images.tensor)
    proposals, _ = vild.proposal_generator(images, features)
    pooled = heads.box_pooler(
        [features[f] for f in heads.box_in_features], [p.proposal_boxes for p in proposals]
    )
    projection = classifier.projection
    scale = classifier.temperature * projection(heads.box_head(pooled)).norm(dim=1).mean()
    classes = F.normalize(classifier.class_embeddings(), dim=1)  # eval: test vocabulary + bg
    stock_score = stock.roi_heads.box_predictor.cls_score
    stock_score.weight.copy_(classes @ projection.weight / scale)
    stock_score.bias.copy_(classes @ projection.bias / scale)


def build_models(config_file: str, opts: Sequence[str], vild, image: np.ndarray) -> dict:
    """``{"stock", "vild", "vild_ensemble"}`` in eval mode, alike where they can be (see the
    functions called); ``vild`` from :func:`build_vild`, whose RPN deltas are zeroed here."""
    zero_rpn_deltas(vild)
    ensemble = build_vild(config_file, opts, "ensemble")
    ensemble.load_state_dict(vild.state_dict(), strict=False)
    copy_text_branch_to_image_branch(ensemble)
    stock = build_stock(config_file, opts)
    # Same weights where the parts are the same (backbone, RPN, box head, box deltas, masks).
    ours = stock.state_dict()
    stock.load_state_dict({k: v for k, v in vild.state_dict().items() if k in ours}, strict=False)
    match_stock_classifier(stock, vild, [inference_input(image)])
    return {"stock": stock, "vild": vild, "vild_ensemble": ensemble}


# ---------------------------------------------------------------------------------------------
# What the tasks share
class BenchmarkSetup:
    """
    The options and inputs every task shares: the photos, a random tiny CLIP and a random
    1203-class vocabulary saved under ``workdir``, and the models, built on first use (the
    crops task needs none, the vocabulary task only ViLD).
    """

    def __init__(
        self,
        workdir,
        *,
        quick: bool = False,
        device: str = "cpu",
        size: int = 512,
        repeats: int = 3,
        score_thresh: float = 0.05,
        skip_vit: bool = False,
    ):
        """
        Args:
            workdir: an empty folder for the CLIP, the vocabulary and the embedding cache.
            quick: the small shapes model and no ViT-B/32 (a smoke run of a few seconds).
            size: short side of the photos.
            repeats: timed rounds per measure.
            score_thresh: test score threshold of all models.
            skip_vit: no ViT-B/32 (random weights) measures.
        """
        workdir = Path(workdir)
        self.quick, self.device, self.size, self.repeats = quick, device, size, repeats
        # ViT-B/32 is slow on a CPU: the quick run uses the tiny CLIP everywhere.
        self.use_vit = not (quick or skip_vit)
        self.images = photos(size)
        self.clip_path = save_clip(workdir / "tiny_clip.pt", **TINY_CLIP)
        vocabulary = save_random_vocabulary(
            workdir / "lvis_random.pth", builtin_vocabulary("lvis").names
        )
        self.config_file = QUICK_CONFIG if quick else FULL_CONFIG
        self.opts = model_opts(
            quick, device, size, score_thresh, self.clip_path, vocabulary, str(workdir / "cache")
        )
        self._vild = None
        self._models = None

    @property
    def vild(self):
        """The ViLD model (eval mode)."""
        if self._vild is None:
            self._vild = build_vild(self.config_file, self.opts)
        return self._vild

    @property
    def models(self) -> dict:
        """``{"stock", "vild", "vild_ensemble"}`` (eval mode), see :func:`build_models`."""
        if self._models is None:
            self._models = build_models(self.config_file, self.opts, self.vild, self.images[0])
        return self._models

    def describe(self) -> dict:
        """The report's ``setup`` entries every task shares."""
        out = {"model": QUICK_MODEL if self.quick else FULL_MODEL}
        if self._vild is not None:
            out["parameters_vild"] = sum(p.numel() for p in self._vild.parameters())
        out.update(
            image_short_side=self.size,
            images=PHOTOS,
            classes=NUM_CLASSES,
            distill_boxes_per_image=NUM_DISTILL,
            repeats=self.repeats,
            quick=self.quick,
            torch=torch.__version__,
        )
        return out
