"""Self-distillation from the starting model (``MODEL.VILD.SELF_DISTILL``, issue 32).

Fine-tuning on one's own data pulls the region embeddings towards the new base classes and away
from the embedding space the open vocabulary lives in. Here a frozen copy of the starting model
(the teacher) embeds the same sampled RoIs as the student, and ``loss_self_distill`` keeps the
student's embeddings near the teacher's (LwF-style, on embeddings rather than on class
distributions: the test vocabulary is not known in training, and every class a user may name
later is scored against these embeddings).

The distance is ViLD's own (:func:`.losses.distillation_loss`): L1 between L2-normalised
embeddings, summed over D and averaged over the RoIs. Both sides are unit vectors, so only their
directions count, which is all the cosine classifier reads; and the loss is on the same scale as
``loss_distill``, so the two weights compare. The teacher's side is not normalised a second time:
a student equal to its teacher has a loss of exactly 0.

Shape shorthand: R = sampled RoIs (all images), D = embedding width.
"""

import logging
import os
from typing import List

import torch
from detectron2.structures import Instances
from torch.nn.parallel import DistributedDataParallel

from .losses import distillation_loss


__all__ = ["SelfDistillation", "attach_self_distillation", "check_start_weights"]

logger = logging.getLogger(__name__)


class SelfDistillation:
    """
    The teacher and the loss weight, held by :class:`.roi_heads.ViLDROIHeads` as
    ``self_distill``. Deliberately not an ``nn.Module``: the teacher is then no submodule of the
    student, so it is not in its ``state_dict`` (checkpoints), ``parameters()`` (optimizer,
    DDP) nor switched to training by ``model.train()``. The heads' ``_apply`` moves it with the
    model (``.to(device)``, ``.double()``).
    """

    def __init__(self, teacher: torch.nn.Module, weight: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = weight

    @torch.no_grad()
    def add_targets(self, images, proposals: List[Instances]) -> None:
        """The teacher's embeddings of each image's sampled RoIs, as the fields
        ``self_distill_text`` (R_i, D) and, for ViLD-ensemble, ``self_distill_image`` (its
        image branch) of ``proposals``."""
        heads = self.teacher.roi_heads
        features = self.teacher.backbone(images.tensor)
        features = [features[f] for f in heads.box_in_features]
        pooled = heads.box_pooler(features, [p.proposal_boxes for p in proposals])
        sizes = [len(p) for p in proposals]
        text = heads.box_predictor.cls_score.embed(heads.box_head(pooled))
        for p, t in zip(proposals, text.split(sizes)):
            p.self_distill_text = t
        if heads.variant == "ensemble":
            for p, t in zip(proposals, heads.embed_image_branch(pooled).split(sizes)):
                p.self_distill_image = t

    def loss(self, heads, box_features, pooled, proposals: List[Instances]) -> torch.Tensor:
        """
        ``weight`` x (L1 of the student's text-branch embeddings to the teacher's, + for
        ViLD-ensemble the same for the image branch, which scores the novel classes).

        Args:
            heads: the student's :class:`.roi_heads.ViLDROIHeads`.
            box_features: (R, C) the student's box-head output of the sampled RoIs.
            pooled: (R, C_in, S, S) their pooled features (the image branch's input).
            proposals: the sampled RoIs, with :meth:`add_targets`' fields.
        """
        student = heads.box_predictor.cls_score.embed(box_features)
        teacher = torch.cat([p.self_distill_text for p in proposals])  # unit already
        loss = distillation_loss(student, teacher, normalize_targets=False)
        if heads.variant == "ensemble":
            image = heads.embed_image_branch(pooled)
            if image is not None:  # None: too few RoIs for a batch-norm image head
                teacher = torch.cat([p.self_distill_image for p in proposals])
                loss = loss + distillation_loss(image, teacher, normalize_targets=False)
        return self.weight * loss


def check_start_weights(cfg) -> None:
    """A FileNotFoundError naming ``MODEL.VILD.SELF_DISTILL.START_WEIGHTS`` when
    self-distillation is on and that file does not exist (checked before a run writes)."""
    path = cfg.MODEL.VILD.SELF_DISTILL.START_WEIGHTS
    if cfg.MODEL.VILD.SELF_DISTILL.WEIGHT > 0 and not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(f"MODEL.VILD.SELF_DISTILL.START_WEIGHTS {path}: no such file")


def attach_self_distillation(model, cfg) -> None:
    """
    With ``MODEL.VILD.SELF_DISTILL.WEIGHT`` > 0, build the teacher from ``cfg`` on the
    student's device, load ``START_WEIGHTS`` into it (every tensor must fit, as for an
    evaluation) and hand it to the student's RoI heads. Training only (the trainer calls it):
    evaluation and the predictor never build a teacher, whatever the config says.

    Raises:
        ValueError: a model whose RoI heads cannot self-distil.
        FileNotFoundError: no ``START_WEIGHTS`` file.
        IncompatibleCheckpointError: ``START_WEIGHTS`` does not fit this config's model
            (another variant, CLIP width, backbone or head), naming the file.
    """
    weight = cfg.MODEL.VILD.SELF_DISTILL.WEIGHT
    if weight <= 0:
        return
    from detectron2.modeling import build_model

    from ..checkpoint import IncompatibleCheckpointError, ViLDCheckpointer
    from .roi_heads import ViLDROIHeads

    student = model.module if isinstance(model, DistributedDataParallel) else model
    heads = getattr(student, "roi_heads", None)
    if not isinstance(heads, ViLDROIHeads) or cfg.MODEL.VILD.OFFICIAL.TRAINING:
        raise ValueError(
            "MODEL.VILD.SELF_DISTILL.WEIGHT > 0 needs ViLD's RoI heads (MODEL.ROI_HEADS.NAME "
            "ViLDROIHeads or OfficialViLDROIHeads) with detectron2's training "
            f"(MODEL.VILD.OFFICIAL.TRAINING False); this model has {type(heads).__name__}"
        )
    check_start_weights(cfg)
    path = cfg.MODEL.VILD.SELF_DISTILL.START_WEIGHTS
    teacher_cfg = cfg.clone()
    teacher_cfg.defrost()
    teacher_cfg.MODEL.VILD.SELF_DISTILL.WEIGHT = 0.0
    teacher_cfg.MODEL.DEVICE = str(next(student.parameters()).device)
    teacher = build_model(teacher_cfg)
    try:
        # complete: a teacher with a tensor left at random would distil noise. The stored
        # vocabulary is not loaded: the teacher only embeds regions.
        ViLDCheckpointer(teacher, complete=True).load(os.path.expanduser(path), checkpointables=[])
    except IncompatibleCheckpointError as e:
        raise IncompatibleCheckpointError(
            f"MODEL.VILD.SELF_DISTILL.START_WEIGHTS: {e} (the teacher is this config's model, "
            "so the starting model must be one of the same variant, CLIP width and backbone)"
        ) from None
    heads.self_distill = SelfDistillation(teacher, weight)
    logger.info(f"Self-distillation from {path} with weight {weight}")
