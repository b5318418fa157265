"""The "CLIP on cropped regions" baseline: its scores are the teacher's crop classification,
worked out here independently, and its configuration errors are named."""

import vild_d2  # noqa: F401  (compat bridges first)

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from vild_d2.distill import CLIPTeacher
from vild_d2.config import load_config


def _cfg(clip_path, tmp_path, *opts):
    return load_config(
        "configs/Shapes/clip_on_crops.yaml",
        [
            "MODEL.VILD.CLIP_MODEL",
            clip_path,
            "MODEL.VILD.EMBEDDING_CACHE_DIR",
            str(tmp_path / "cache"),
            "MODEL.VILD.TEST_VOCABULARY",
            "",
            "DATASETS.TEST",
            "()",
            "DATASETS.TRAIN",
            "()",
            "MODEL.VILD.TRAIN_VOCABULARY",
            "voc",
            "MODEL.WEIGHTS",
            "",
            *opts,
        ],
    )


def test_scores_are_the_teachers_crop_probabilities(tiny_clip_path, tmp_path):
    cfg = _cfg(tiny_clip_path, tmp_path, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    model = build_model(cfg).eval()
    model.set_vocabulary(["red star", "blue cross", "green heart"])
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 76.0, 60.0]])
    logits = torch.tensor([1.5, -0.5])

    # Replace the RPN's output with these two proposals; everything after it is the model's.
    def rpn(images, features, gt):
        inst = Instances(images.image_sizes[0])
        inst.proposal_boxes = Boxes(boxes)
        inst.objectness_logits = logits
        return [inst], {}

    model.proposal_generator.forward = rpn
    # BGR input (INPUT.FORMAT): the model must give the teacher RGB.
    out = model([{"image": image.flip(0), "height": 64, "width": 80}])[0]["instances"]

    teacher = CLIPTeacher(tiny_clip_path)
    emb = teacher(image, boxes).double()  # (2, D), the distillation targets' embedding
    text = model.vocabulary.embeddings.double()
    probs = F.softmax(emb @ text.t() / cfg.MODEL.VILD.TEMPERATURE, dim=1)
    probs = probs * torch.sigmoid(logits.double())[:, None] ** 0.5  # OBJECTNESS_WEIGHT
    # Every (box, class) pair survives (NMS is per class; two boxes of IoU < 0.5).
    assert len(out) == 6
    for b, c, s in zip(out.pred_boxes.tensor, out.pred_classes, out.scores):
        i = int((boxes - b).abs().sum(1).argmin())
        assert s.item() == pytest.approx(probs[i, c].item(), rel=1e-4)
    assert out.pred_masks.shape == (6, 64, 80)


def test_configuration_errors_are_named(tiny_clip_path, tmp_path):
    cfg = _cfg(tiny_clip_path, tmp_path, "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "False")
    with pytest.raises(ValueError, match="CLS_AGNOSTIC_MASK True"):
        build_model(cfg)
    model = build_model(_cfg(tiny_clip_path, tmp_path))
    with pytest.raises(RuntimeError, match="inference-only baseline"):
        model.train()([{"image": torch.zeros(3, 8, 8)}])
