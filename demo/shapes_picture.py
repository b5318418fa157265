"""What a trained model found on the shapes world's val images: a picture of its detections
(the LVIS evaluator's saved predictions, so exactly what was scored) and, per novel category,
how many val objects it found and what its false positives lie on; and how good the distillation
targets are (:func:`target_quality`, :func:`distill_boxes`).
"""

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, nms

from detectron2.structures import BoxMode
from detectron2.utils.visualizer import Visualizer
from vild_d2.engine import detections

__all__ = [
    "load_predictions",
    "draw_prediction_grid",
    "novel_recall",
    "novel_detections",
    "training_objects",
    "target_quality",
    "distill_boxes",
]

# Novel categories (never seen with a box) in the library's magenta, as floats for overlays.
NOVEL_COLOR = tuple(c / 255 for c in detections.NOVEL_COLOR)
BASE_COLOR = (0.95, 0.95, 0.95)


def load_predictions(inference_dir: Path) -> Dict[int, List[dict]]:
    """image id -> the LVIS evaluator's predictions for it (``lvis_instances_results.json``),
    highest score first."""
    path = Path(inference_dir) / "lvis_instances_results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: evaluate the model first")
    by_image = defaultdict(list)
    for p in json.loads(path.read_text()):
        by_image[p["image_id"]].append(p)
    for preds in by_image.values():
        preds.sort(key=lambda p: -p["score"])
    return by_image


def _xyxy(xywh: Sequence[Sequence[float]]) -> torch.Tensor:
    """(N, 4) float64 XYXY boxes from XYWH ones (the LVIS json's and results' format)."""
    return BoxMode.convert(
        torch.tensor(xywh, dtype=torch.float64).view(-1, 4), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS
    )


# What a box lies on, from its best IoU with any object: an index into KINDS.
KINDS = ("background", "part", "object")


def _kind(best_iou: torch.Tensor) -> torch.Tensor:
    return (best_iou >= 0.1).long() + (best_iou >= 0.5).long()


def novel_recall(
    gt_json: Path, predictions: Dict[int, List[dict]], score_thresh: float = 0.3
) -> Dict[str, Dict[str, int]]:
    """Per novel ("r") category: its val objects, and how many of them a prediction of that
    category with score >= ``score_thresh`` covers at IoU >= 0.5."""
    gt = json.loads(Path(gt_json).read_text())
    novel = {c["id"]: c["name"] for c in gt["categories"] if c["frequency"] == "r"}
    out = {name: {"objects": 0, "found": 0} for name in novel.values()}
    anns = defaultdict(list)
    for ann in gt["annotations"]:
        if ann["category_id"] in novel:
            anns[ann["image_id"]].append(ann)
    for image_id, objects in anns.items():
        preds = [p for p in predictions.get(image_id, []) if p["score"] >= score_thresh]
        ious = box_iou(_xyxy([a["bbox"] for a in objects]), _xyxy([p["bbox"] for p in preds]))
        same = torch.tensor(
            [[a["category_id"] == p["category_id"] for p in preds] for a in objects],
            dtype=torch.bool,
        ).view(ious.shape)
        for ann, found in zip(objects, ((ious >= 0.5) & same).any(1).tolist()):
            row = out[novel[ann["category_id"]]]
            row["objects"] += 1
            row["found"] += found
    return out


def _one_per_object(preds: List[dict], iou: float) -> List[dict]:
    """Greedy class-agnostic suppression (predictions sorted by score): the evaluator keeps a
    box per class, which would stack several labels on one object in a picture."""
    if not preds:
        return []
    scores = torch.tensor([p["score"] for p in preds], dtype=torch.float64)
    return [preds[i] for i in nms(_xyxy([p["bbox"] for p in preds]), scores, iou).tolist()]


def draw_prediction_grid(
    gt_json: Path,
    image_root: Path,
    predictions: Dict[int, List[dict]],
    out_path: Path,
    *,
    num_images: int = 8,
    columns: int = 4,
    score_thresh: float = 0.4,
    scale: float = 4.0,
) -> Path:
    """
    A grid of the first ``num_images`` val images with their predictions above
    ``score_thresh`` (the best one per object), each a box labelled "<name> <score>"; novel
    categories are drawn in magenta and marked "*", base ones in white. Masks are left out so
    that the objects' own colours stay visible.
    """
    gt = json.loads(Path(gt_json).read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    novel = {c["id"] for c in gt["categories"] if c["frequency"] == "r"}
    tiles = []
    for img in gt["images"][:num_images]:
        split_folder, file_name = img["coco_url"].split("/")[-2:]
        bgr = cv2.imread(str(Path(image_root) / split_folder / file_name))
        if bgr is None:
            raise FileNotFoundError(f"cannot read val image {Path(image_root) / split_folder}")
        preds = [p for p in predictions.get(img["id"], []) if p["score"] >= score_thresh]
        preds = _one_per_object(preds, iou=0.3)
        vis = Visualizer(bgr[:, :, ::-1], scale=scale)
        if preds:
            boxes = np.array(
                [BoxMode.convert(p["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for p in preds]
            )
            labels = [
                f"{names[p['category_id']]}{'*' if p['category_id'] in novel else ''} "
                f"{p['score']:.2f}"
                for p in preds
            ]
            colors = [NOVEL_COLOR if p["category_id"] in novel else BASE_COLOR for p in preds]
            vis.overlay_instances(
                boxes=boxes,
                labels=labels,
                assigned_colors=colors,
            )
        tiles.append(vis.output.get_image()[:, :, ::-1])
    h, w = tiles[0].shape[:2]
    rows = []
    for start in range(0, len(tiles), columns):
        row = tiles[start : start + columns]
        row += [np.full((h, w, 3), 255, np.uint8)] * (columns - len(row))
        rows.append(
            np.hstack([cv2.copyMakeBorder(t, 2, 2, 2, 2, cv2.BORDER_CONSTANT) for t in row])
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), np.vstack(rows))
    return out_path


def training_objects(world_root: Path) -> List[Tuple[int, List[str], torch.Tensor]]:
    """(image id, names, (n, 4) XYXY boxes) of every training image's drawn objects, base and
    novel (novel ones are unannotated: their boxes come from re-drawing the deterministic
    scenes); boxes are the visible pixels' extent, as in the annotations. Re-drawing takes a
    few seconds: compute it once for :func:`target_quality` and :func:`distill_boxes`."""
    from vild_d2.data.datasets.shapes import draw_scene, load_world_spec, visible_box

    spec = load_world_spec(world_root)
    rng = np.random.default_rng([spec.seed, 100])  # the training split's stream
    out = []
    for k in range(spec.num_train):
        _, objects = draw_scene(rng, spec)
        objects = [(n, visible_box(m)) for n, _, m in objects if m.any()]
        boxes = torch.tensor([b for _, b in objects], dtype=torch.float32).view(-1, 4)
        out.append((k + 1, [n for n, _ in objects], boxes))
    return out


def target_quality(
    objects, novel: Sequence[str], proposals, targets, vocabulary
) -> Dict[str, Dict[str, float]]:
    """
    For base and novel objects of the training images: the fraction covered by a stored
    proposal at IoU >= 0.5 ("recall"), and the fraction whose best-matching target embedding is
    closest to its own category's text embedding ("teacher_top1").

    Args:
        objects: :func:`training_objects` of the world.
        novel: the world's novel categories.
        proposals, targets: :class:`vild_d2.distill.DistillStore` of the training images.
        vocabulary: :class:`vild_d2.text.Vocabulary` of all the world's categories.
    """
    novel = set(novel)
    text = vocabulary.embeddings.numpy()
    counts = {k: {"objects": 0, "covered": 0, "correct": 0} for k in ("base", "novel")}
    for image_id, names, gt in objects:
        if not names:
            continue
        target = targets[image_id]
        # (objects, proposals) IoUs; the targets' boxes are the first proposals, in order.
        ious = box_iou(gt, torch.from_numpy(np.array(proposals[image_id]["boxes"], np.float32)))
        best_target = box_iou(gt, torch.from_numpy(np.array(target["boxes"], np.float32))).argmax(1)
        predicted = (np.asarray(target["embeddings"], np.float32) @ text.T).argmax(1)
        for i, name in enumerate(names):
            row = counts["novel" if name in novel else "base"]
            row["objects"] += 1
            if ious.shape[1] == 0 or ious[i].max() < 0.5:
                continue
            row["covered"] += 1
            row["correct"] += vocabulary.names[predicted[best_target[i]]] == name
    return {
        k: {
            "recall": r["covered"] / max(1, r["objects"]),
            "teacher_top1": r["correct"] / max(1, r["covered"]),
        }
        for k, r in counts.items()
    }


def distill_boxes(objects, targets, vocabulary, temperature: float = 0.01):
    """
    What the distillation boxes of the training images lie on, by their best IoU with any drawn
    object (base or novel): "object" (>= 0.5), "part" (0.1 to 0.5: a part of an object, or a
    box spanning several) or "background" (< 0.1); for each kind, its fraction of the boxes and
    the teacher's mean confidence on them (the largest class probability of the target embedding
    under the text classifier of all categories, softmax at ``temperature``, no background).
    ViLD pulls every one of these boxes towards its target; see docs/SHAPES.md.

    Args:
        objects: :func:`training_objects` of the world.
        targets: :class:`vild_d2.distill.DistillStore` of the training images.
        vocabulary: :class:`vild_d2.text.Vocabulary` of all the world's categories.

    Returns:
        {kind: {"fraction": f, "confidence": c}} for the three kinds.
    """
    text = F.normalize(vocabulary.embeddings.float(), dim=1)
    count, confidence_sum = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for image_id, _, gt in objects:
        target = targets[image_id]
        boxes = torch.from_numpy(np.array(target["boxes"], np.float32)).view(-1, 4)
        if len(boxes) == 0:
            continue
        best = box_iou(boxes, gt).max(1).values if len(gt) else torch.zeros(len(boxes))
        kind = _kind(best)
        emb = F.normalize(torch.from_numpy(np.array(target["embeddings"], np.float32)), dim=1)
        confidence = (emb @ text.T / temperature).softmax(1).max(1).values
        count += torch.bincount(kind, minlength=3)
        confidence_sum += torch.bincount(kind, weights=confidence.double(), minlength=3)
    total = max(1.0, count.sum().item())
    return {
        k: {
            "fraction": count[i].item() / total,
            "confidence": (confidence_sum[i] / count[i].clamp(min=1)).item(),
        }
        for i, k in enumerate(KINDS)
    }


def novel_detections(
    gt_json: Path, predictions: Dict[int, List[dict]], score_thresh: float = 0.3
) -> Dict[str, int]:
    """
    The val predictions of novel ("r") categories with score >= ``score_thresh``, counted by what
    they lie on: "correct" (an object of that category at IoU >= 0.5), "other_class" (another
    category's object at IoU >= 0.5), "part" (best IoU with any object 0.1 to 0.5) or
    "background" (< 0.1). Missed novel objects show in :func:`novel_recall`; these are the false
    positives that lower APr besides them.
    """
    gt = json.loads(Path(gt_json).read_text())
    novel = {c["id"] for c in gt["categories"] if c["frequency"] == "r"}
    objects = defaultdict(list)
    for ann in gt["annotations"]:
        objects[ann["image_id"]].append(ann)
    # Indices into ("background", "part", "other_class", "correct").
    counts = torch.zeros(4, dtype=torch.long)
    for image_id, preds in predictions.items():
        preds = [p for p in preds if p["category_id"] in novel and p["score"] >= score_thresh]
        if not preds:
            continue
        anns = objects[image_id]
        ious = box_iou(_xyxy([p["bbox"] for p in preds]), _xyxy([a["bbox"] for a in anns]))
        best = ious.max(1).values if anns else torch.zeros(len(preds), dtype=ious.dtype)
        same = torch.tensor(
            [[p["category_id"] == a["category_id"] for a in anns] for p in preds], dtype=torch.bool
        ).view(ious.shape)
        kind = _kind(best)  # "object" = on another category's object, unless ...
        kind[((ious >= 0.5) & same).any(1)] = 3  # ... one of its own: correct
        counts += torch.bincount(kind, minlength=4)
    background, part, other_class, correct = counts.tolist()
    return {"correct": correct, "other_class": other_class, "part": part, "background": background}
