"""What the shapes pipeline reports about a model's val predictions, on hand-made data."""

import json

import cv2
import numpy as np
import pytest
import torch

from shapes_picture import (
    _one_per_object,
    distill_boxes,
    draw_prediction_grid,
    novel_detections,
    novel_recall,
    training_objects,
)
from vild_d2.data.datasets.shapes import SHAPES_CLASSES, WorldSpec, generate_shapes_world
from vild_d2.text import Vocabulary


def _gt(tmp_path):
    cats = [
        {"id": 1, "name": "red star", "frequency": "r"},
        {"id": 2, "name": "blue cross", "frequency": "f"},
    ]
    images = [{"id": 7, "coco_url": "shapes/val/000000.png", "height": 64, "width": 64}]
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 20, 20]},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [30, 30, 20, 20]},
        {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 40, 10, 10]},
    ]
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_novel_recall_counts_matching_confident_predictions(tmp_path):
    preds = {
        7: [
            # IoU with object 1: 16*16 / (400 + 256 - 256) = 0.64 -> found.
            {"image_id": 7, "category_id": 1, "bbox": [2, 2, 16, 16], "score": 0.9},
            # On object 2 but score below 0.3 -> not found; a base-class box there neither.
            {"image_id": 7, "category_id": 1, "bbox": [30, 30, 20, 20], "score": 0.2},
            {"image_id": 7, "category_id": 2, "bbox": [30, 30, 20, 20], "score": 0.9},
        ]
    }
    assert novel_recall(_gt(tmp_path), preds) == {"red star": {"objects": 2, "found": 1}}
    # IoU 0.36 (12*12 / 400) is not a match at 0.5.
    low = {7: [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 12, 12], "score": 0.9}]}
    assert novel_recall(_gt(tmp_path), low)["red star"]["found"] == 0


def test_one_label_per_object_keeps_the_best():
    preds = [
        {"bbox": [0, 0, 10, 10], "score": 0.9, "category_id": 1},
        {"bbox": [1, 1, 10, 10], "score": 0.8, "category_id": 2},  # IoU 0.68 with the first
        {"bbox": [20, 20, 10, 10], "score": 0.5, "category_id": 2},
    ]
    assert [p["score"] for p in _one_per_object(preds, iou=0.3)] == [0.9, 0.5]


def test_picture_is_written(tmp_path):
    (tmp_path / "val").mkdir()
    cv2.imwrite(str(tmp_path / "val" / "000000.png"), np.zeros((64, 64, 3), np.uint8))
    preds = {7: [{"image_id": 7, "category_id": 1, "bbox": [2, 2, 16, 16], "score": 0.9}]}
    out = draw_prediction_grid(_gt(tmp_path), tmp_path, preds, tmp_path / "p.png", num_images=1)
    image = cv2.imread(str(out))
    assert image.shape[:2] == (64 * 4 + 4, 64 * 4 * 4 + 16)  # 4x scale, 4 columns, borders


def test_novel_detections_say_what_false_positives_lie_on(tmp_path):
    box = {"image_id": 7, "category_id": 1, "score": 0.9}
    preds = {
        7: [
            {**box, "bbox": [2, 2, 16, 16]},  # IoU 0.64 with a red star -> correct
            {**box, "bbox": [0, 40, 10, 10]},  # exactly the blue cross -> other_class
            {**box, "bbox": [30, 30, 10, 10]},  # 100 / 400 = 0.25 of the 2nd star -> part
            {**box, "bbox": [55, 0, 8, 8]},  # touches nothing -> background
            {**box, "bbox": [0, 0, 20, 20], "score": 0.2},  # below 0.3: not counted
            {**box, "bbox": [55, 0, 8, 8], "category_id": 2},  # a base category: not counted
        ]
    }
    expected = {"correct": 1, "other_class": 1, "part": 1, "background": 1}
    assert novel_detections(_gt(tmp_path), preds) == expected


def _iou64(a, b):
    """Float64 IoU of two XYXY boxes (the reference)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_distill_boxes_composition_and_teacher_confidence(tmp_path):
    spec = WorldSpec(seed=5, num_train=3, num_val=1, image_size=96)
    root = generate_shapes_world(tmp_path / "shapes", spec)
    train = json.loads((root / "annotations" / "train.json").read_text())
    objects = training_objects(root)
    # The re-drawn objects are the written annotations, plus the unannotated novel ones.
    for image_id, names, boxes in objects:
        anns = [a["bbox"] for a in train["annotations"] if a["image_id"] == image_id]
        base = [b.tolist() for n, b in zip(names, boxes) if n not in spec.novel]
        assert base == [[x, y, x + w, y + h] for x, y, w, h in anns]

    # One-hot class embeddings: a target equal to class 0's has confidence
    # 1 / (1 + 35 exp(-100)) = 1; one halfway between classes 0 and 1 has logits 100/sqrt(2)
    # for both, so 1 / (2 + 34 exp(-70.7)) = 0.5.
    vocab = Vocabulary(SHAPES_CLASSES, torch.eye(36, 64))
    sure, torn = np.eye(64)[0], (np.eye(64)[0] + np.eye(64)[1]) / np.sqrt(2)
    _, _, gt = objects[0]
    x0, y0, x1, y1 = gt[0].tolist()
    boxes = [[x0, y0, x1, y1], [x0, y0, (x0 + x1) / 2, (y0 + y1) / 2], [0, 0, 1, 1]]
    targets = {
        1: {"boxes": np.array(boxes), "embeddings": np.stack([sure, torn, sure])},
        2: {"boxes": np.zeros((0, 4)), "embeddings": np.zeros((0, 64))},
        3: {"boxes": np.array([[0.0, 0.0, 1.0, 1.0]]), "embeddings": np.stack([torn])},
    }
    expected = {k: [] for k in ("object", "part", "background")}
    for image_id, _, gt in objects:
        for box, emb in zip(targets[image_id]["boxes"], targets[image_id]["embeddings"]):
            best = max(_iou64(box, g.tolist()) for g in gt)
            kind = "object" if best >= 0.5 else "part" if best >= 0.1 else "background"
            expected[kind].append(1.0 if emb[1] == 0 else 0.5)
    assert all(expected.values())  # the boxes cover the three kinds
    result = distill_boxes(objects, targets, vocab)
    for kind, confidences in expected.items():
        assert result[kind]["fraction"] == pytest.approx(len(confidences) / 4)
        assert result[kind]["confidence"] == pytest.approx(np.mean(confidences), abs=1e-6)
