"""Detections as JSON records and as pictures: the layout of ``tools/demo.py --json`` (the
deployment contract's, ``vild_d2_runtime.contract``: the runtime writes the same) and its
drawing, shared by the demo and the web page (``vild_d2.serve``).

Masks may be full-size (``pred_masks`` a (N, H, W) bool tensor, as detectron2 returns them) or
kept small (:func:`rescale_detections`: ``pred_masks`` a :class:`ROIMasks` of the mask head's
M x M outputs, pasted one at a time when encoded or drawn). Kept small, the memory of an
image's detections does not grow with H x W x N: an 8000 x 8000 image with 50 detections
would hold 3.2 GB of full-size masks."""

from typing import List, Optional, Sequence

import cv2
import numpy as np
import torch

from detectron2.data.catalog import Metadata
from detectron2.structures import Instances, ROIMasks
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer
from vild_d2_runtime import contract
from vild_d2_runtime.contract import json_header

from .predictor import rescale_detections  # noqa: F401  (part of this module's API)

__all__ = [
    "MAX_DRAW_SIDE",
    "NOVEL_COLOR",
    "json_header",
    "detections_to_json",
    "mask_of",
    "rescale_detections",
    "shrink",
    "draw_detections",
]

MAX_DRAW_SIDE = 2000  # px, the longest side of a drawn picture
DRAW_CHUNK = 8  # detections drawn at a time: the Visualizer holds a full-size copy of each mask
NOVEL_COLOR = (255, 26, 230)  # magenta, as in the shapes-world pictures (demo/shapes_picture.py)


def mask_of(instances: Instances, i: int) -> np.ndarray:
    """Detection ``i``'s mask, (H, W) bool at ``instances.image_size``: pasted from its box if
    the masks are kept small (one mask: memory of one full-size mask at a time)."""
    masks = instances.pred_masks
    if isinstance(masks, ROIMasks):
        h, w = instances.image_size
        # The masks' own pasting: detectron2's paste_masks_in_image, or a subclass's (the
        # official configs': vild_d2/official/masks.py).
        pasted = masks[i : i + 1].to_bitmasks(instances.pred_boxes.tensor[i : i + 1], h, w, 0.5)
        return pasted.tensor[0].numpy().astype(bool, copy=False)
    return masks[i].numpy().astype(bool, copy=False)


class _PastedMasks:
    """``[i]`` = detection i's (H, W) bool mask (:func:`mask_of`), pasted when asked."""

    def __init__(self, instances: Instances):
        self.instances = instances

    def __getitem__(self, i: int) -> np.ndarray:
        return mask_of(self.instances, i)


def detections_to_json(instances: Instances, names: Sequence[str]) -> List[dict]:
    """Instances (CPU, original image coordinates) -> list of JSON-ready detections
    (:func:`vild_d2_runtime.contract.detections_to_json`); masks pasted and encoded one at a
    time."""
    dets = {
        "boxes": instances.pred_boxes.tensor.numpy(),
        "scores": instances.scores.numpy(),
        "classes": instances.pred_classes.numpy(),
    }
    if instances.has("pred_masks"):
        dets["masks"] = _PastedMasks(instances)
    return contract.detections_to_json(dets, names)


def shrink(bgr: np.ndarray, instances: Instances, scale: float):
    """The image and its detections (CPU) resized by ``scale`` < 1, for drawing."""
    h, w = bgr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 order: (width, height)
    small = Instances((size[1], size[0]))
    for name, value in instances.get_fields().items():
        if name == "pred_boxes":
            value = value.clone()
            value.scale(size[0] / w, size[1] / h)
        elif name == "pred_masks" and not isinstance(value, ROIMasks):  # small masks: as they are
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
    if len(instances) == 0 or not instances.has("pred_masks"):
        return vis.draw_instance_predictions(instances).get_image()[:, :, ::-1]
    # A few masks at a time onto the same picture, largest boxes first (the Visualizer's own
    # order): its memory is a chunk's full-size masks, not all of them.
    order = torch.argsort(instances.pred_boxes.area(), descending=True, stable=True)
    for start in range(0, len(order), DRAW_CHUNK):
        chunk = instances[order[start : start + DRAW_CHUNK]]
        masks = np.stack([mask_of(chunk, i) for i in range(len(chunk))])
        chunk.pred_masks = torch.from_numpy(masks)
        vis.draw_instance_predictions(chunk)
    return vis.output.get_image()[:, :, ::-1]
