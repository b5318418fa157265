"""Image work around the graph, in numpy, as detectron2 does it: the input check, the test-time
resize (``ResizeShortestEdge``, which resizes uint8 images with Pillow's bilinear filter:
reproduced here exactly, integer arithmetic included), and ``detector_postprocess`` (boxes to
the original size, masks pasted with ``grid_sample``'s bilinear rule) and COCO RLE masks.

Shape shorthand: N = detections, M = mask resolution (28).
"""

import math
from typing import Tuple

import numpy as np

__all__ = [
    "check_image",
    "resized_shape",
    "resize_bilinear",
    "postprocess_boxes",
    "paste_masks",
    "rle_encode",
]

_EXPECTED = "expected a BGR uint8 (H, W, 3) numpy array (as cv2.imread gives)"


def check_image(image) -> None:
    """Raise TypeError/ValueError unless ``image`` is a non-empty (H, W, 3) uint8 numpy array,
    saying how to convert what was given (the rules of vild_d2's ``check_image``)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{_EXPECTED}, got {type(image).__name__}")
    shape = image.shape
    if image.ndim == 2 or (image.ndim == 3 and shape[2] == 1):
        raise ValueError(
            f"{_EXPECTED}, got a grayscale array of shape {shape}; convert with "
            "cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)"
        )
    if image.ndim == 3 and shape[2] == 4:
        raise ValueError(
            f"{_EXPECTED}, got 4 channels {shape}; drop alpha with cv2.cvtColor(img, "
            "cv2.COLOR_BGRA2BGR)"
        )
    if image.ndim != 3 or shape[2] != 3:
        how = "one image per call (a batch: call on img[i])" if image.ndim == 4 else "convert it"
        raise ValueError(f"{_EXPECTED}, got shape {shape} ({image.ndim} dimensions); {how}")
    if image.size == 0:
        raise ValueError(f"{_EXPECTED}, got an empty image of shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{_EXPECTED}, got {image.dtype}; convert with (img * 255).clip(0, 255)"
            ".astype(np.uint8) if in [0, 1], img.clip(0, 255).astype(np.uint8) if in [0, 255]"
        )


def resized_shape(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: (new_h, new_w)."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2)


def _coefficients(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the bilinear (triangle)
    filter: (out, ksize) source indices and int64 fixed-point weights (0 past each window)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, ksize), dtype=np.int64)
    weight = np.zeros((out_size, ksize), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        x = np.arange(xmax)
        k = np.maximum(1.0 - np.abs((x + xmin - center + 0.5) / filterscale), 0.0)
        total = k.sum()
        if total != 0.0:
            k = k / total
        fixed = np.where(k < 0, np.trunc(-0.5 + k * (1 << _BITS)), np.trunc(0.5 + k * (1 << _BITS)))
        index[xx, :xmax] = x + xmin
        weight[xx, :xmax] = fixed.astype(np.int64)
    return index, weight


def _resample(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One pass of Pillow's 8-bit resampling along ``axis`` (0 = rows, 1 = columns)."""
    index, weight = _coefficients(image.shape[axis], out_size)
    src = image.astype(np.int64)
    acc = np.full(
        (out_size, image.shape[1], 3) if axis == 0 else (image.shape[0], out_size, 3),
        1 << (_BITS - 1),
        dtype=np.int64,
    )
    for j in range(index.shape[1]):
        if axis == 0:
            acc += src[index[:, j]] * weight[:, j, None, None]
        else:
            acc += src[:, index[:, j]] * weight[None, :, j, None]
    return np.clip(acc >> _BITS, 0, 255).astype(np.uint8)


def resize_bilinear(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (new_h, new_w, 3) uint8, bit for bit Pillow's
    ``Image.resize((new_w, new_h), BILINEAR)`` (horizontal pass first, as Pillow)."""
    out = image
    if new_w != image.shape[1]:
        out = _resample(out, new_w, axis=1)
    if new_h != image.shape[0]:
        out = _resample(out, new_h, axis=0)
    return np.ascontiguousarray(out)


def postprocess_boxes(
    boxes: np.ndarray, resized: Tuple[int, int], original: Tuple[int, int]
) -> Tuple[np.ndarray, np.ndarray]:
    """detectron2's ``detector_postprocess`` on (N, 4) XYXY boxes of the resized image: scaled
    to the ``original`` (H, W), clipped to it; returns (boxes, keep) where keep (N,) bool drops
    the empty ones."""
    boxes = boxes.astype(np.float32).copy()
    boxes[:, 0::2] *= np.float32(original[1] / resized[1])
    boxes[:, 1::2] *= np.float32(original[0] / resized[0])
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, original[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, original[0])
    keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    return boxes, keep


def _bilinear_weights(grid: np.ndarray, size: int) -> np.ndarray:
    """(L,) grid coordinates in [-1, 1] -> (L, size) weights of ``grid_sample``'s bilinear
    rule (align_corners=False, zeros outside)."""
    pos = (grid + np.float32(1)) * np.float32(size / 2) - np.float32(0.5)
    low = np.floor(pos)
    frac = pos - low
    out = np.zeros((len(grid), size), dtype=np.float32)
    rows = np.arange(len(grid))
    for offset, w in ((0, np.float32(1) - frac), (1, frac)):
        idx = low.astype(np.int64) + offset
        ok = (idx >= 0) & (idx < size)
        out[rows[ok], idx[ok]] += w[ok]
    return out


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, size: Tuple[int, int], threshold: float = 0.5
) -> np.ndarray:
    """
    detectron2's ``paste_masks_in_image`` on the CPU (one mask at a time, only around its box).

    Args:
        masks: (N, M, M) float32 mask probabilities.
        boxes: (N, 4) XYXY boxes in the image of ``size`` (H, W).
    Returns:
        (N, H, W) bool.
    """
    img_h, img_w = size
    out = np.zeros((len(masks), img_h, img_w), dtype=bool)
    for i, (mask, box) in enumerate(zip(masks, boxes.astype(np.float32))):
        x0, y0, x1, y1 = box
        xa, ya = (max(int(math.floor(v)) - 1, 0) for v in (x0, y0))
        xb = min(int(math.ceil(x1)) + 1, img_w)
        yb = min(int(math.ceil(y1)) + 1, img_h)
        if xb <= xa or yb <= ya:
            continue
        gx = (np.arange(xa, xb, dtype=np.float32) + np.float32(0.5) - x0) / (x1 - x0)
        gy = (np.arange(ya, yb, dtype=np.float32) + np.float32(0.5) - y0) / (y1 - y0)
        wx = _bilinear_weights(gx * np.float32(2) - np.float32(1), mask.shape[1])
        wy = _bilinear_weights(gy * np.float32(2) - np.float32(1), mask.shape[0])
        out[i, ya:yb, xa:xb] = (wy @ mask.astype(np.float32) @ wx.T) >= threshold
    return out


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO RLE ``{"size": [H, W], "counts": str}``, the string
    ``pycocotools.mask.encode`` gives (column-major runs, first run of zeros)."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:  # pycocotools' rleToString: 5 bits a character, offset 48
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}
