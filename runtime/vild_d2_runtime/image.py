"""Image work around the graph, in numpy, as detectron2 does it: the test-time resize
(``ResizeShortestEdge``, which resizes uint8 images with Pillow's bilinear filter: reproduced
here exactly, integer arithmetic included), and ``detector_postprocess`` (boxes to
the original size, masks pasted with ``grid_sample``'s bilinear rule) and COCO RLE masks; and
an image file's size from its header, before any pixel is decoded.

Memory: the resize and the mask pasting work in bands of rows, so their scratch space does not
grow with the image (a 9000 x 9000 image: tens of MB beside the image itself).

Shape shorthand: N = detections, M = mask resolution (28).
"""

import math
import struct
from typing import Optional, Tuple

import numpy as np

__all__ = [
    "image_size",
    "resized_shape",
    "resize_bilinear",
    "postprocess_boxes",
    "paste_mask",
    "paste_masks",
    "PastedMasks",
    "rle_encode",
]

_BAND = 2**22  # elements of scratch space per band of rows (16 MB of int32 / float32)


def image_size(path: str) -> Optional[Tuple[int, int]]:
    """(width, height) of a PNG, JPEG, BMP, WebP or TIFF file from its header, no pixel
    decoded (what OpenCV will decode, EXIF rotation aside); None for another format or a
    header that cannot be read (the caller then checks the decoded image)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
                return struct.unpack(">II", head[16:24])
            if head.startswith(b"BM") and len(head) >= 26:
                if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
                    return struct.unpack("<HH", head[18:22])
                w, h = struct.unpack("<ii", head[18:26])
                return abs(w), abs(h)
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return _webp_size(head)
            if head[:4] in (b"II*\0", b"MM\0*"):
                return _tiff_size(f, "<" if head[:2] == b"II" else ">")
            if head[:2] == b"\xff\xd8":
                return _jpeg_size(f)
    except (OSError, struct.error):
        return None
    return None


def _webp_size(head: bytes) -> Optional[Tuple[int, int]]:
    kind = head[12:16]
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and head[20] == 0x2F:
        b0, b1, b2, b3 = head[21:25]
        return 1 + (((b1 & 0x3F) << 8) | b0), 1 + (((b3 & 0x0F) << 10) | (b2 << 2) | (b1 >> 6))
    if kind == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    return None


def _tiff_size(f, order: str) -> Optional[Tuple[int, int]]:
    f.seek(4)
    (offset,) = struct.unpack(order + "I", f.read(4))
    f.seek(offset)
    (count,) = struct.unpack(order + "H", f.read(2))
    found = {}
    for _ in range(min(count, 4096)):
        tag, kind, _n, value = struct.unpack(order + "HHI4s", f.read(12))
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            fmt = "H" if kind == 3 else "I"
            found[tag] = struct.unpack(order + fmt, value[: struct.calcsize(fmt)])[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _jpeg_size(f) -> Optional[Tuple[int, int]]:
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            marker = f.read(1)
            if marker != b"\xff":
                break
        else:
            return None  # not at a marker: corrupt
        if not marker or marker == b"\xd9":
            return None
        if marker in (b"\x01", *(bytes([0xD0 + i]) for i in range(8))):
            continue  # markers without a length
        (length,) = struct.unpack(">H", f.read(2))
        if 0xC0 <= marker[0] <= 0xCF and marker[0] not in (0xC4, 0xC8, 0xCC):  # SOFn
            _precision, h, w = struct.unpack(">BHH", f.read(5))
            return w, h
        f.seek(length - 2, 1)


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
    """One pass of Pillow's 8-bit resampling along ``axis`` (0 = rows, 1 = columns), in bands
    of the other axis. int32 holds the sums: the weights of a window add up to 2^22 (+ a few
    units of rounding), so a sum stays below 255 * 2^22 + 2^21 < 2^31."""
    index, weight = _coefficients(image.shape[axis], out_size)
    weight = weight.astype(np.int32)
    h, w = image.shape[:2]
    out_shape = (out_size, w, 3) if axis == 0 else (h, out_size, 3)
    out = np.empty(out_shape, dtype=np.uint8)
    other = w if axis == 0 else h  # the axis cut into bands
    step = max(1, _BAND // (3 * out_size))
    for lo in range(0, other, step):
        hi = min(lo + step, other)
        part = image[:, lo:hi] if axis == 0 else image[lo:hi]
        acc = np.full(
            (out_size, hi - lo, 3) if axis == 0 else (hi - lo, out_size, 3),
            1 << (_BITS - 1),
            dtype=np.int32,
        )
        for j in range(index.shape[1]):
            if axis == 0:
                acc += part[index[:, j]].astype(np.int32) * weight[:, j, None, None]
            else:
                acc += part[:, index[:, j]].astype(np.int32) * weight[None, :, j, None]
        band = np.clip(acc >> _BITS, 0, 255).astype(np.uint8)
        if axis == 0:
            out[:, lo:hi] = band
        else:
            out[lo:hi] = band
    return out


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


def paste_mask(
    mask: np.ndarray,
    box: np.ndarray,
    size: Tuple[int, int],
    threshold: float = 0.5,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """
    One mask of detectron2's ``paste_masks_in_image`` on the CPU, computed only around its box
    and in bands of rows.

    Args:
        mask: (M, M) float32 mask probabilities.
        box: (4,) XYXY box in the image of ``size`` (H, W).
        out: an (H, W) bool array to write into (all False), else a new one.
    Returns:
        (H, W) bool.
    """
    img_h, img_w = size
    out = np.zeros((img_h, img_w), dtype=bool) if out is None else out
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float32)
    xa, ya = (max(int(math.floor(v)) - 1, 0) for v in (x0, y0))
    xb = min(int(math.ceil(x1)) + 1, img_w)
    yb = min(int(math.ceil(y1)) + 1, img_h)
    if xb <= xa or yb <= ya:
        return out
    gx = (np.arange(xa, xb, dtype=np.float32) + np.float32(0.5) - x0) / (x1 - x0)
    gy = (np.arange(ya, yb, dtype=np.float32) + np.float32(0.5) - y0) / (y1 - y0)
    wx = _bilinear_weights(gx * np.float32(2) - np.float32(1), mask.shape[1])
    wy = _bilinear_weights(gy * np.float32(2) - np.float32(1), mask.shape[0])
    mask = mask.astype(np.float32)
    step = max(1, _BAND // (xb - xa))
    for lo in range(0, yb - ya, step):
        band = wy[lo : lo + step] @ mask @ wx.T  # the order of the whole-box product
        out[ya + lo : ya + lo + len(band), xa:xb] = band >= threshold
    return out


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, size: Tuple[int, int], threshold: float = 0.5
) -> np.ndarray:
    """
    detectron2's ``paste_masks_in_image`` on the CPU (:func:`paste_mask` for each). For large
    images paste one at a time instead: this holds N x H x W bytes.

    Args:
        masks: (N, M, M) float32 mask probabilities.
        boxes: (N, 4) XYXY boxes in the image of ``size`` (H, W).
    Returns:
        (N, H, W) bool.
    """
    out = np.zeros((len(masks), *size), dtype=bool)
    for i, (mask, box) in enumerate(zip(masks, boxes)):
        paste_mask(mask, box, size, threshold, out=out[i])
    return out


class PastedMasks:
    """
    N full-size masks pasted when read, as detectron2's ``ROIMasks``: ``masks[i]`` pastes
    detection i's (H, W) bool mask (:func:`paste_mask`), iterating pastes one at a time, so the
    memory holds one H x W mask, not N (100 masks of 6000 x 6000 px: 3.6 GB).
    ``np.asarray(masks)`` pastes them all, (N, H, W) bool; ``masks[keep]`` (a slice, indices or
    a bool array) selects some, still unpasted.

    Attributes:
        probs: (N, M, M) float32 mask probabilities; boxes: (N, 4) XYXY; size: (H, W);
        threshold: a pixel is in the mask where its pasted probability is >= it.
    """

    dtype = np.dtype(bool)

    def __init__(self, probs: np.ndarray, boxes: np.ndarray, size: Tuple[int, int], threshold=0.5):
        self.probs, self.boxes = probs, boxes
        self.size = (int(size[0]), int(size[1]))
        self.threshold = float(threshold)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (len(self.probs), *self.size)

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            if not -len(self) <= index < len(self):
                raise IndexError(f"mask {index} of {len(self)}")
            return paste_mask(self.probs[index], self.boxes[index], self.size, self.threshold)
        return PastedMasks(self.probs[index], self.boxes[index], self.size, self.threshold)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None):
        out = paste_masks(self.probs, self.boxes, self.size, self.threshold)
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"PastedMasks({len(self)} masks of {self.size[0]}x{self.size[1]} px, unpasted)"


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO RLE ``{"size": [H, W], "counts": str}``, the string
    ``pycocotools.mask.encode`` gives (column-major runs, first run of zeros). Only the
    rectangle around the mask's pixels is transposed (a whole-image column-major copy of a
    9000 x 9000 mask takes 0.6 s)."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        counts = [h * w]
    else:
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        # The rectangle's columns, each with a False above and below: outside it all is False.
        padded = np.zeros((x1 - x0, y1 - y0 + 2), dtype=bool)
        padded[:, 1:-1] = mask[y0:y1, x0:x1].T
        flat = padded.ravel()
        column, row = np.divmod(np.flatnonzero(flat[1:] != flat[:-1]) + 1, y1 - y0 + 2)
        change = (x0 + column) * h + y0 + row - 1  # column-major index in the whole mask
        # A run across two columns of a full-height rectangle leaves through the pad below
        # one column and comes back at the top of the next, at the same index: no change.
        same = np.flatnonzero(change[1:] == change[:-1])
        change = np.delete(change, np.concatenate([same, same + 1]))
        change = change[(change > 0) & (change < h * w)]  # the ends are bounds already
        counts = np.diff(np.concatenate([[0], change, [h * w]])).tolist()
        if mask[0, 0]:
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
