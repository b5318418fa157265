"""The "CLIP on cropped regions" baseline of the ViLD paper: proposals from an RPN trained on
base classes, each classified by the CLIP teacher from its 1x and 1.5x crops against the text
classifier of the vocabulary; masks from the detector's class-agnostic mask head."""

import logging
from typing import Dict, List, Sequence, Union

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from ..distill.teacher import CLIPTeacher
from ..text import (
    TextEncoder,
    Vocabulary,
    build_text_encoder,
    check_same_width,
    resolve_vocabulary,
    vocabulary_specs,
)
from .postprocess import per_class_detections

__all__ = ["CLIPOnCropsRCNN"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class CLIPOnCropsRCNN(GeneralizedRCNN):
    """
    Inference only. Per image: the top ``num_proposals`` RPN proposals; the teacher's embedding
    of each (the same crops and numbers as the distillation targets); class probabilities
    ``softmax(cos(embedding, text) / T)`` over the vocabulary, times ``sigmoid(objectness) **
    objectness_weight`` (CLIP alone cannot tell a whole object from a part or from background);
    per-class NMS and top-k as detectron2's box head. Weights: a base-trained Mask R-CNN (its
    RPN, and its mask head, which must be class-agnostic). Box and RoI classifier heads are
    unused.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher: CLIPTeacher,
        text_encoder: TextEncoder,
        vocabulary: Vocabulary,
        temperature: float,
        num_proposals: int,
        objectness_weight: float,
        score_thresh: float,
        nms_thresh: float,
        topk_per_image: int,
        use_synonyms: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.text_encoder = text_encoder
        self.use_synonyms = use_synonyms
        self.temperature = temperature
        self.num_proposals = num_proposals
        self.objectness_weight = objectness_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.topk_per_image = topk_per_image
        self.set_vocabulary(vocabulary)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        if cfg.MODEL.MASK_ON and not cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK:
            raise ValueError(
                "CLIPOnCropsRCNN labels boxes with classes the mask head never saw: it needs "
                "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True (a class-agnostic mask head)"
            )
        vild = cfg.MODEL.VILD
        encoder = build_text_encoder(cfg)
        _, test_spec = vocabulary_specs(cfg)
        ret.update(
            teacher=CLIPTeacher(
                vild.CLIP_MODEL, scales=vild.DISTILL.CROP_SCALES, device=cfg.MODEL.DEVICE
            ),
            text_encoder=encoder,
            vocabulary=resolve_vocabulary(test_spec, encoder, use_synonyms=vild.USE_SYNONYMS),
            temperature=vild.TEMPERATURE,
            num_proposals=vild.CLIP_ON_CROPS.NUM_PROPOSALS,
            objectness_weight=vild.OBJECTNESS_WEIGHT,
            score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            nms_thresh=cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            use_synonyms=vild.USE_SYNONYMS,
        )
        return ret

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def set_vocabulary(self, vocabulary: Union[Vocabulary, str, Sequence[str]]) -> Vocabulary:
        """Classify crops into ``vocabulary`` (same forms as ``ViLDRCNN.set_vocabulary``)."""
        vocab = resolve_vocabulary(vocabulary, self.text_encoder, use_synonyms=self.use_synonyms)
        check_same_width(
            vocab, self.teacher.embed_dim, "CLIP-on-crops vocabulary", self.teacher.clip_model
        )
        self._vocabulary = vocab
        return vocab

    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            raise RuntimeError(
                "CLIPOnCropsRCNN is an inference-only baseline: evaluate it with --eval-only "
                "and the weights of a base-trained Mask R-CNN"
            )
        return self.inference(batched_inputs)

    @torch.no_grad()
    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        assert detected_instances is None, "CLIPOnCropsRCNN makes its own detections"
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        text = self._vocabulary.embeddings.to(self.device)  # (K, D)
        boxes, scores = [], []
        for x, p in zip(batched_inputs, proposals):
            p = p[: self.num_proposals]  # sorted by objectness
            rgb = x["image"] if self.input_format == "RGB" else x["image"].flip(0)
            # The crops come from the network's input image (resized like the boxes).
            emb = self.teacher(rgb.to(torch.uint8), p.proposal_boxes.tensor).to(self.device)
            probs = (emb @ text.t() / self.temperature).softmax(dim=1)  # (M, K)
            probs = probs * torch.sigmoid(p.objectness_logits)[:, None] ** self.objectness_weight
            scores.append(probs)
            boxes.append(p.proposal_boxes.tensor)
        instances, _ = per_class_detections(
            boxes,
            scores,
            images.image_sizes,
            self.score_thresh,
            self.nms_thresh,
            self.topk_per_image,
        )
        if self.roi_heads.mask_on:
            instances = self.roi_heads.forward_with_given_boxes(features, instances)
        if do_postprocess:
            return GeneralizedRCNN._postprocess(instances, batched_inputs, images.image_sizes)
        return instances
