"""ViLD's meta-architecture: Mask R-CNN that feeds distillation targets to its RoI heads and
can change its vocabulary at run time."""

import logging
from typing import Dict, List, Sequence, Union

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils.events import get_event_storage

from ..text import TextEncoder, Vocabulary, resolve_vocabulary
from .roi_heads import ViLDROIHeads

__all__ = ["ViLDRCNN"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class ViLDRCNN(GeneralizedRCNN):
    """
    :class:`GeneralizedRCNN` whose training inputs may carry ``"distill"`` (an Instances with
    ``boxes`` and ``embeddings``, made by :class:`vild_d2.data.ViLDDatasetMapper`), handed to
    :class:`ViLDROIHeads`; :meth:`set_vocabulary` switches the classes it detects at test time.
    """

    @configurable
    def __init__(self, *, text_encoder: TextEncoder = None, use_synonyms: bool = False, **kwargs):
        """
        Args:
            text_encoder: encodes class names for :meth:`set_vocabulary` (CLIP loads lazily);
                from a config, the one that made the box predictor's vocabularies.
            use_synonyms: average dataset synonyms into class embeddings when switching to a
                dataset's vocabulary.
            kwargs: as :class:`GeneralizedRCNN`; ``roi_heads`` must be a :class:`ViLDROIHeads`.
        """
        super().__init__(**kwargs)
        if not isinstance(self.roi_heads, ViLDROIHeads):
            raise TypeError(
                f"ViLDRCNN needs MODEL.ROI_HEADS.NAME 'ViLDROIHeads', got {type(self.roi_heads)}"
            )
        self.text_encoder = text_encoder
        self.use_synonyms = use_synonyms

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(
            text_encoder=ret["roi_heads"].box_predictor.text_encoder,
            use_synonyms=cfg.MODEL.VILD.USE_SYNONYMS,
        )
        return ret

    @property
    def vocabulary(self) -> Vocabulary:
        """The test-time vocabulary (names, embeddings, novel mask)."""
        return self.roi_heads.box_predictor.cls_score.test_vocabulary

    def set_vocabulary(self, vocabulary: Union[Vocabulary, str, Sequence[str]]) -> Vocabulary:
        """
        Detect ``vocabulary`` from now on (at test time). No weights change.

        Args:
            vocabulary: a :class:`Vocabulary`, a list of class names (encoded with this model's
                CLIP, cached on disk), a saved vocabulary file, or a registered dataset's name.
        Returns:
            the resolved Vocabulary.
        """
        if self.text_encoder is None and not isinstance(vocabulary, Vocabulary):
            raise ValueError("this model has no text encoder: pass a Vocabulary")
        vocab = resolve_vocabulary(vocabulary, self.text_encoder, use_synonyms=self.use_synonyms)
        self.roi_heads.box_predictor.cls_score.set_vocabulary(vocab)
        logger.info(f"Vocabulary set to {len(vocab)} classes: {vocab.names[:5]}...")
        return vocab

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        distill = None
        if self.roi_heads.variant != "text":
            missing = [
                x.get("file_name", i) for i, x in enumerate(batched_inputs) if "distill" not in x
            ]
            if missing:
                raise ValueError(
                    f"MODEL.VILD.VARIANT={self.roi_heads.variant!r} needs distillation boxes, but "
                    f"these inputs have none: {missing[:5]} (name a store per training dataset in "
                    "MODEL.VILD.DISTILL.STORES, or give the dataset dicts 'distill_boxes' and "
                    "'distill_embeddings'; VARIANT 'text' trains without them)"
                )
            distill = [x["distill"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        if self.proposal_generator is not None:
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        else:  # MODEL.LOAD_PROPOSALS: precomputed proposals from the dataset
            proposals = [x["proposals"].to(self.device) for x in batched_inputs]
            proposal_losses = {}
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances, distill)
        if self.vis_period > 0:
            storage = get_event_storage()
            if storage.iter % self.vis_period == 0:
                self.visualize_training(batched_inputs, proposals)
        return {**detector_losses, **proposal_losses}
