"""A tiny synthetic open-vocabulary world, in LVIS v1 format, for CPU smoke runs and tests.

Images hold a few coloured shapes ("red square", "blue circle", ...). Novel ("r") classes appear
in training images but are annotated only in val, as in ViLD's LVIS setting. Each training image
also gets class-agnostic distillation boxes with CLIP image embeddings of their crops, stored in
``distill_train.pth`` and joined by image id when the dataset is loaded.

Layout under ``root``: ``images/*.png``, ``train.json`` (base categories only),
``val.json`` (all categories), ``distill_train.pth``.
"""

import json
import logging
import os
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json

__all__ = [
    "TOY_CLASSES",
    "TOY_NOVEL",
    "generate_toy_world",
    "compute_toy_distillation",
    "register_toy_world",
]

logger = logging.getLogger(__name__)

_COLOURS = {
    "red": (40, 40, 220),
    "green": (40, 200, 40),
    "blue": (220, 60, 40),
    "yellow": (30, 220, 230),
}  # BGR
_SHAPES = ("square", "circle", "triangle")
TOY_CLASSES = [f"{c} {s}" for s in _SHAPES for c in _COLOURS]
TOY_NOVEL = ["yellow circle", "green triangle"]
_CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
_CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def _shape_polygon(shape, x0, y0, size):
    if shape == "square":
        pts = [(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size)]
    elif shape == "triangle":
        pts = [(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)]
    else:
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        r = size / 2
        pts = list(zip(x0 + r + r * np.cos(t), y0 + r + r * np.sin(t)))
    return np.asarray(pts, dtype=np.float64)


def _draw_image(rng, height, width, objects_per_image):
    image = rng.integers(90, 150, size=(height, width, 3), dtype=np.uint8)
    objects = []
    for _ in range(objects_per_image):
        name = TOY_CLASSES[rng.integers(len(TOY_CLASSES))]
        colour, shape = name.split(" ")
        size = int(rng.integers(min(height, width) // 4, min(height, width) // 2))
        x0 = float(rng.integers(0, width - size))
        y0 = float(rng.integers(0, height - size))
        poly = _shape_polygon(shape, x0, y0, size)
        cv2.fillPoly(image, [np.round(poly).astype(np.int32)], _COLOURS[colour])
        objects.append((name, poly))
    return image, objects


def _lvis_json(images, annotations, class_names):
    categories = [
        {
            "id": i + 1,
            "name": n,
            "synonyms": [n],
            "frequency": "r" if n in TOY_NOVEL else "f",
            "image_count": 0,
            "instance_count": 0,
        }
        for i, n in enumerate(class_names)
    ]
    return {
        "info": {"description": "vild_d2 toy world"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def generate_toy_world(
    root: str,
    *,
    num_train: int = 8,
    num_val: int = 4,
    height: int = 64,
    width: int = 80,
    objects_per_image: int = 3,
    seed: int = 0,
) -> Path:
    """Write images and LVIS v1 jsons under ``root`` (deterministic in ``seed``)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = [n for n in TOY_CLASSES if n not in TOY_NOVEL]
    for split, count, names in (("train", num_train, base), ("val", num_val, TOY_CLASSES)):
        cat_id = {n: i + 1 for i, n in enumerate(names)}
        images, annotations = [], []
        for k in range(count):
            image_id = len(images) + 1 + (0 if split == "train" else 100000)
            image, objects = _draw_image(rng, height, width, objects_per_image)
            file_name = f"{split}_{k:05d}.png"
            cv2.imwrite(str(root / "images" / file_name), image)
            # LVIS v1 locates images by the last two parts of coco_url: <split folder>/<file>.
            images.append(
                {
                    "id": image_id,
                    "coco_url": f"toy/images/{file_name}",
                    "file_name": file_name,
                    "height": height,
                    "width": width,
                    "neg_category_ids": [],
                    "not_exhaustive_category_ids": [],
                }
            )
            for name, poly in objects:
                if name not in cat_id:  # novel objects stay unannotated in training images
                    continue
                x0, y0 = poly.min(0)
                x1, y1 = poly.max(0)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat_id[name],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(cv2.contourArea(poly.astype(np.float32))),
                        "segmentation": [poly.flatten().tolist()],
                    }
                )
        with open(root / f"{split}.json", "w") as f:
            json.dump(_lvis_json(images, annotations, names), f)
    return root


@torch.no_grad()
def compute_toy_distillation(root: str, clip_model, *, boxes_per_image: int = 8, seed: int = 0):
    """
    Class-agnostic boxes for each training image (every drawn object, annotated or not, plus
    random boxes) and the CLIP image embedding of each: 1x and 1.5x crops, summed, normalised.
    Writes ``root/distill_train.pth`` = {image_id: {"boxes": (M, 4), "embeddings": (M, D)}}.
    """
    root = Path(root)
    with open(root / "train.json") as f:
        images = json.load(f)["images"]
    size = clip_model.visual.input_resolution
    rng = np.random.default_rng(seed)
    out = {}
    for img in images:
        bgr = cv2.imread(str(root / "images" / img["file_name"]))
        h, w = bgr.shape[:2]
        # Foreground-ish boxes: connected components of saturated pixels (all objects).
        sat = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[..., 1] > 100
        n, _, stats, _ = cv2.connectedComponentsWithStats(sat.astype(np.uint8))
        boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh, area in stats[1:] if area > 4]
        while len(boxes) < boxes_per_image:
            x0, y0 = rng.uniform(0, w - 8), rng.uniform(0, h - 8)
            boxes.append([x0, y0, rng.uniform(x0 + 4, w), rng.uniform(y0 + 4, h)])
        boxes = torch.tensor(boxes[:boxes_per_image], dtype=torch.float32)
        rgb = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float()[None] / 255.0
        centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        crops = torch.cat([torch.cat([centre - s * half, centre + s * half], 1) for s in (1, 1.5)])
        crops[:, 0::2] = crops[:, 0::2].clamp(0, w)
        crops[:, 1::2] = crops[:, 1::2].clamp(0, h)
        pixels = roi_align(rgb, [crops], output_size=size, aligned=True)
        pixels = (pixels - _CLIP_MEAN[:, None, None]) / _CLIP_STD[:, None, None]
        dtype = next(clip_model.visual.parameters()).dtype
        emb = F.normalize(clip_model.encode_image(pixels.to(dtype)).float(), dim=1)
        emb = F.normalize(emb[: len(boxes)] + emb[len(boxes) :], dim=1)
        out[img["id"]] = {"boxes": boxes, "embeddings": emb.half()}
    torch.save(out, root / "distill_train.pth")
    return out


def _load_split(root: Path, split: str, dataset_name: str) -> List[Dict]:
    json_file = root / f"{split}.json"
    if not json_file.is_file():
        raise FileNotFoundError(
            f"{dataset_name}: {json_file} not found. Generate the toy world with "
            f"`python tools/make_toy_world.py --root {root} --clip <clip checkpoint>`."
        )
    dicts = load_lvis_json(str(json_file), f"{root}{os.sep}")
    if split == "train":
        distill_file = root / "distill_train.pth"
        if not distill_file.is_file():
            raise FileNotFoundError(
                f"{dataset_name}: {distill_file} not found (distillation "
                "targets); rerun tools/make_toy_world.py"
            )
        distill = torch.load(distill_file)
        for d in dicts:
            d["distill_boxes"] = distill[d["image_id"]]["boxes"].numpy()
            d["distill_embeddings"] = distill[d["image_id"]]["embeddings"].float().numpy()
    return dicts


def register_toy_world(root: str, prefix: str = "vild_toy"):
    """Register ``<prefix>_train`` (base classes) and ``<prefix>_val`` (all) for ``root``."""
    root = Path(os.path.expanduser(root))
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda s=split, n=name: _load_split(root, s, n))
        classes = (
            [c for c in TOY_CLASSES if c not in TOY_NOVEL] if split == "train" else TOY_CLASSES
        )
        MetadataCatalog.get(name).set(
            thing_classes=classes,
            novel_classes=[c for c in TOY_NOVEL if c in classes],
            json_file=str(root / f"{split}.json"),
            image_root=str(root / "images"),
            evaluator_type="lvis",
        )
