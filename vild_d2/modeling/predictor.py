"""ViLD's box predictor: region embeddings classified by frozen CLIP text embeddings.

Shape shorthand: N = RoIs, C = box-head feature channels (1024), D = CLIP embedding width,
K = classes of the active vocabulary (training or test), K+1 = with background (last column).
"""

import functools
import logging
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from ..text import (
    TextEncoder,
    Vocabulary,
    check_same_width,
    load_templates,
    resolve_vocabulary,
)

__all__ = [
    "ViLDOutputLayers",
    "cosine_logits",
    "distillation_loss",
    "ensemble_scores",
    "build_text_encoder",
    "vocabulary_specs",
]

logger = logging.getLogger(__name__)

_NORM_EPS = 1e-8


def cosine_logits(embeddings, classifier, temperature):
    """
    Args:
        embeddings: (N, D) region embeddings, already L2-normalised.
        classifier: (K, D) class embeddings, any norm (each row is divided by its norm here).
        temperature: logits = cosine / temperature.
    Returns:
        (N, K) logits.
    """
    classifier = F.normalize(classifier.to(embeddings.dtype), dim=1, eps=_NORM_EPS)
    return embeddings @ classifier.t() / temperature


def distillation_loss(region_embeddings, clip_embeddings):
    """
    L1 distance between region embeddings and CLIP image embeddings, summed over D and
    averaged over the boxes (ViLD-image).

    Args:
        region_embeddings: (M, D), L2-normalised.
        clip_embeddings: (M, D) targets, any norm (normalised here).
    Returns:
        scalar; 0 (with a graph) when M == 0.
    """
    if region_embeddings.shape[0] == 0:
        return region_embeddings.sum() * 0.0
    # float32 even under autocast: a sum over D of small differences.
    targets = F.normalize(clip_embeddings.float(), dim=1, eps=_NORM_EPS)
    return (region_embeddings.float() - targets).abs().sum(dim=1).mean()


def ensemble_scores(text_probs, image_probs, is_base, ensemble_lambda):
    """
    ViLD-ensemble's geometric mean: base classes lean on the text branch, novel on the image one.

    Args:
        text_probs: (N, K) text-branch probabilities (background dropped, not renormalised).
        image_probs: (N, K) image-branch probabilities (softmax over the K classes).
        is_base: (K,) bool.
        ensemble_lambda: the exponent lambda (2/3 in the paper).
    Returns:
        (N, K) scores.
    """
    lam = ensemble_lambda
    base = text_probs.pow(lam) * image_probs.pow(1 - lam)
    novel = text_probs.pow(1 - lam) * image_probs.pow(lam)
    return torch.where(is_base, base, novel)


def build_text_encoder(cfg):
    """
    The CLIP text encoder described by ``cfg.MODEL.VILD`` (CLIP itself loads lazily). The
    predictor (building the vocabularies) and the meta-architecture (``set_vocabulary``) share
    one instance per setting, so CLIP is loaded at most once.
    """
    vild = cfg.MODEL.VILD
    return _shared_text_encoder(
        vild.CLIP_MODEL, vild.PROMPT_TEMPLATES, vild.EMBEDDING_CACHE_DIR, cfg.MODEL.DEVICE
    )


@functools.lru_cache(maxsize=4)
def _shared_text_encoder(clip_model, templates_file, cache_dir, device):
    return TextEncoder(
        clip_model,
        templates=load_templates(templates_file or None),
        cache_dir=cache_dir or None,
        device=device,
    )


def vocabulary_specs(cfg) -> Tuple[str, str]:
    """(training, test) vocabulary specs of ``cfg`` with their dataset defaults filled in."""
    vild = cfg.MODEL.VILD
    train = vild.TRAIN_VOCABULARY or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "")
    test = vild.TEST_VOCABULARY or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "") or train
    if not train:
        raise ValueError(
            "MODEL.VILD.TRAIN_VOCABULARY is empty and DATASETS.TRAIN names no dataset: "
            "the model needs a training vocabulary (a saved vocabulary file or a dataset name)."
        )
    return train, test


class ViLDOutputLayers(FastRCNNOutputLayers):
    """
    ViLD-text predictor: ``Linear(C, D)`` projection + L2 norm gives the region embedding,
    classified by cosine similarity against frozen text embeddings plus one learned background
    embedding, with class-agnostic box regression from the C-d feature.

    It keeps two vocabularies: the training one (base classes, indexes ``gt_classes``) is used in
    ``train()`` mode, the test one in ``eval()`` mode; :meth:`set_vocabulary` swaps the latter.
    ``losses`` and ``inference`` are detectron2's (softmax CE over K+1, class-agnostic smooth-L1;
    at test time softmax over K+1 and the background column dropped WITHOUT renormalising, which
    is exactly ViLD's rule). Both vocabularies are non-persistent buffers: the learned weights
    do not depend on the vocabulary, and :class:`vild_d2.ViLDCheckpointer` stores the test
    vocabulary beside them.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        box2box_transform,
        train_vocabulary: Vocabulary,
        test_vocabulary: Vocabulary,
        temperature: float = 0.01,
        test_score_thresh: float = 0.0,
        test_nms_thresh: float = 0.5,
        test_topk_per_image: int = 100,
        smooth_l1_beta: float = 0.0,
        box_reg_loss_type: str = "smooth_l1",
        loss_weight=1.0,
    ):
        # The parent's __init__ would build a learned (K+1)-way classifier that ViLD replaces by
        # text embeddings, so we set up the attributes its loss/inference methods read ourselves.
        nn.Module.__init__(self)
        if isinstance(input_shape, int):
            input_shape = ShapeSpec(channels=input_shape)
        input_size = input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
        check_same_width(test_vocabulary, train_vocabulary.dim, "test", train_vocabulary.clip_model)
        dim = train_vocabulary.dim

        self.projection = nn.Linear(input_size, dim)
        self.bbox_pred = nn.Linear(input_size, len(box2box_transform.weights))
        # Learned background embedding, N(0, 0.01) as in the official code.
        self.background = nn.Parameter(torch.randn(dim) * 0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.bbox_pred.bias, 0)

        self.temperature = temperature
        self.box2box_transform = box2box_transform
        self.smooth_l1_beta = smooth_l1_beta
        self.test_score_thresh = test_score_thresh
        self.test_nms_thresh = test_nms_thresh
        self.test_topk_per_image = test_topk_per_image
        self.box_reg_loss_type = box_reg_loss_type
        if isinstance(loss_weight, float):
            loss_weight = {"loss_cls": loss_weight, "loss_box_reg": loss_weight}
        self.loss_weight = loss_weight
        # Newer detectron2 releases read these in losses(); ViLD uses a plain softmax CE.
        self.use_fed_loss = False
        self.use_sigmoid_ce = False

        self.train_vocabulary = train_vocabulary
        self.register_buffer("train_embeddings", train_vocabulary.embeddings.float(), False)
        self.test_vocabulary = test_vocabulary
        self.register_buffer("test_embeddings", test_vocabulary.embeddings.float(), False)
        self.register_buffer("test_is_base", self._is_base(test_vocabulary), False)

    @classmethod
    def from_config(cls, cfg, input_shape):
        train_vocabulary, test_vocabulary = cls.build_vocabularies(cfg)
        return {
            "input_shape": input_shape,
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),
            "train_vocabulary": train_vocabulary,
            "test_vocabulary": test_vocabulary,
            "temperature": cfg.MODEL.VILD.TEMPERATURE,
            "smooth_l1_beta": cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA,
            "test_score_thresh": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "test_nms_thresh": cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "box_reg_loss_type": cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE,
            "loss_weight": {"loss_box_reg": cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT},
        }

    @staticmethod
    def build_vocabularies(cfg) -> Tuple[Vocabulary, Vocabulary]:
        """The config's (training, test) vocabularies, encoding names with CLIP if needed."""
        encoder = build_text_encoder(cfg)
        use_synonyms = cfg.MODEL.VILD.USE_SYNONYMS
        train_spec, test_spec = vocabulary_specs(cfg)
        train = resolve_vocabulary(train_spec, encoder, use_synonyms=use_synonyms)
        test = (
            train
            if test_spec == train_spec
            else resolve_vocabulary(test_spec, encoder, use_synonyms=use_synonyms)
        )
        return train, test

    # ----------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.background.shape[0]

    @property
    def num_classes(self) -> int:
        """K of the vocabulary in use: training classes in train mode, test classes in eval."""
        return len(self.train_vocabulary if self.training else self.test_vocabulary)

    def _is_base(self, vocabulary: Vocabulary):
        return vocabulary.is_base_for(self.train_vocabulary.names).bool()

    def set_vocabulary(self, vocabulary: Vocabulary):
        """Use ``vocabulary`` (K', D) at test time; D must match this model's embedding width."""
        ours = self.train_vocabulary.clip_model
        check_same_width(vocabulary, self.embed_dim, "new test", ours)
        if vocabulary.clip_model and ours and vocabulary.clip_model != ours:
            logger.warning(
                f"The new vocabulary was encoded by CLIP {vocabulary.clip_model}, this model's "
                f"training vocabulary by {ours}: same width, but possibly another embedding space."
            )
        self.test_vocabulary = vocabulary
        # Assigning to a registered buffer keeps it a buffer (with the new shape); follow the
        # model's device and dtype (e.g. after model.half()).
        bg = self.background
        self.test_embeddings = vocabulary.embeddings.to(device=bg.device, dtype=bg.dtype)
        self.test_is_base = self._is_base(vocabulary).to(bg.device)

    def classifier(self):
        """(K+1, D) active class embeddings with the background last (rows not normalised)."""
        embeddings = self.train_embeddings if self.training else self.test_embeddings
        return torch.cat([embeddings, self.background[None]], dim=0)

    def embed(self, x):
        """(N, C) box features -> (N, D) L2-normalised region embeddings."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return F.normalize(self.projection(x), dim=1, eps=_NORM_EPS)

    def forward(self, x):
        """
        Args:
            x: (N, C) box features.
        Returns:
            (N, K+1) logits (background last) and (N, 4) class-agnostic box deltas.
        """
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        scores = cosine_logits(self.embed(x), self.classifier(), self.temperature)
        return scores, self.bbox_pred(x)

    def image_probs(self, image_embeddings):
        """(N, D) image-branch embeddings -> (N, K) softmax over the test classes (no bg)."""
        return cosine_logits(image_embeddings, self.test_embeddings, self.temperature).softmax(-1)
