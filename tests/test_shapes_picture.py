"""What the shapes pipeline reports about a model's val predictions, on hand-made data."""

import json

import cv2
import numpy as np

from vild_d2.shapes.picture import _one_per_object, draw_detections, novel_recall


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
    out = draw_detections(_gt(tmp_path), tmp_path, preds, tmp_path / "p.png", num_images=1)
    image = cv2.imread(str(out))
    assert image.shape[:2] == (64 * 4 + 4, 64 * 4 * 4 + 16)  # 4x scale, 4 columns, borders
