"""Detections as JSON records and as pictures: the layout of ``tools/demo.py --json`` and its
drawing, shared by the demo and the web page (``vild_d2.serve``)."""

from typing import List, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = [
    "MAX_DRAW_SIDE",
    "NOVEL_COLOR",
    "json_header",
    "detections_to_json",
    "shrink",
    "draw_detections",
]

MAX_DRAW_SIDE = 2000  # px, the longest side of a drawn picture
NOVEL_COLOR = (255, 26, 230)  # magenta, as in the shapes-world pictures (demo/shapes_picture.py)


def json_header(names: Sequence[str]) -> dict:
    """The first keys of a detections file: the vocabulary and how boxes and masks are coded."""
    return {
        "vocabulary": list(names),
        "bbox_mode": "XYWH_ABS",
        "segmentation": "COCO RLE (pycocotools), original image size",
    }


def detections_to_json(instances: Instances, names: Sequence[str]) -> List[dict]:
    """Instances (CPU, original image coordinates) -> list of JSON-ready detections."""
    dets = []
    boxes = instances.pred_boxes.tensor.tolist()
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cls = int(instances.pred_classes[i])
        det = {
            "category_id": cls,
            "category_name": names[cls],
            "score": round(float(instances.scores[i]), 5),
            "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        }
        if masks is not None:
            rle = mask_util.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        dets.append(det)
    return dets


def shrink(bgr: np.ndarray, instances: Instances, scale: float):
    """The image and its detections (CPU) resized by ``scale`` < 1, for drawing."""
    h, w = bgr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 order: (width, height)
    small = Instances((size[1], size[0]))
    for name, value in instances.get_fields().items():
        if name == "pred_boxes":
            value = value.clone()
            value.scale(size[0] / w, size[1] / h)
        elif name == "pred_masks":
            # One mask at a time: no second full-size copy of the whole stack.
            masks = [
                cv2.resize(m.numpy().astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
                for m in value
            ]
            if masks:
                value = torch.from_numpy(np.stack(masks)).bool()
            else:
                value = torch.zeros((0, size[1], size[0]), dtype=torch.bool)
        small.set(name, value)
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA), small


def draw_detections(
    bgr: np.ndarray,
    instances: Instances,
    metadata: Metadata,
    novel: Optional[Sequence[bool]] = None,
) -> np.ndarray:
    """
    BGR picture of the detections (CPU), drawn by detectron2's Visualizer: small images larger
    (shorter side 256 px), none over MAX_DRAW_SIDE px on its longer side (the Visualizer's
    memory grows with the pixels times the masks: an 8000 x 8000 image is shrunk first).

    Args:
        metadata: ``thing_classes`` = the names ``pred_classes`` index.
        novel: (K,) True = a novel class (never seen with a box in training): its label gets
            a ``*`` and its box and mask are magenta. None = no marking (one colour per
            detection, as detectron2 draws).
    """
    h, w = bgr.shape[:2]
    scale = min(max(1.0, 256.0 / min(h, w)), MAX_DRAW_SIDE / max(h, w))
    if scale < 1.0:
        bgr, instances = shrink(bgr, instances, scale)
        scale = 1.0
    mode = ColorMode.IMAGE
    if novel is not None:
        names = metadata.thing_classes
        palette = colormap(rgb=True, maximum=255)
        metadata = Metadata(
            name=f"{metadata.name}_novel_marked",
            thing_classes=[f"{n}*" if is_novel else n for n, is_novel in zip(names, novel)],
            thing_colors=[
                NOVEL_COLOR if is_novel else tuple(palette[k % len(palette)])
                for k, is_novel in enumerate(novel)
            ],
        )
        mode = ColorMode.SEGMENTATION  # the Visualizer takes thing_colors only in this mode
    vis = Visualizer(bgr[:, :, ::-1], metadata, scale=scale, instance_mode=mode)
    return vis.draw_instance_predictions(instances).get_image()[:, :, ::-1]
