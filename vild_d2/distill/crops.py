"""Crops of proposals at several context scales, in CLIP's input format.

Shape shorthand: M = boxes, S = scales, H x W = image, s = CLIP input size (224 for ViT-B/32).

CLIP's ``preprocess`` resizes the short side of a crop to ``s`` and keeps the centred ``s x s``
square. So the pixels CLIP sees from a box are exactly the centred square of side
``min(w, h)`` of that box: :func:`fast_crops` samples that square directly, for every box and
scale of an image in one RoIAlign call. :func:`reference_crops` does the same one crop at a time
with PIL and CLIP's own ``preprocess``; it exists to prove the agreement (tests, benchmark).
"""

from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from torchvision.ops import roi_align

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "clip_preprocess",
    "context_boxes",
    "centre_squares",
    "fast_crops",
    "reference_crops",
]

# CLIP's normalisation (clip/clip.py: _transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def context_boxes(boxes: torch.Tensor, scales: Sequence[float], height: int, width: int):
    """
    Enlarge every box about its centre by each scale and clip it to the image.

    Args:
        boxes: (M, 4) XYXY absolute.
        scales: S factors (1.0 = the box itself).
        height, width: image size.

    Returns:
        Tensor (S * M, 4): scale-major (all boxes at scales[0], then at scales[1], ...).
    """
    boxes = boxes.reshape(-1, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    out = torch.cat([torch.cat([centre - s * half, centre + s * half], 1) for s in scales])
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def centre_squares(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) XYXY -> (N, 4): the centred square of side min(w, h) of each box (the part that
    CLIP's resize-short-side + centre-crop keeps)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).min(dim=1, keepdim=True).values
    return torch.cat([centre - side / 2, centre + side / 2], 1)


def fast_crops(
    image: torch.Tensor,
    boxes: torch.Tensor,
    scales: Sequence[float] = (1.0, 1.5),
    size: int = 224,
) -> torch.Tensor:
    """
    CLIP inputs for every box at every scale, with one batched RoIAlign (no per-box loop).

    Args:
        image: (3, H, W) uint8 RGB, on any device (the crops are made there).
        boxes: (M, 4) float XYXY absolute, in ``image``'s coordinates.
        scales: context scales; each box is enlarged about its centre, then clipped to the image.
        size: CLIP's input resolution s.

    Returns:
        Tensor (S * M, 3, s, s) float32, normalised with CLIP's mean/std, scale-major.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) RGB, got shape {tuple(image.shape)}")
    height, width = image.shape[1:]
    boxes = boxes.to(device=image.device, dtype=torch.float32).reshape(-1, 4)
    squares = centre_squares(context_boxes(boxes, scales, height, width))
    # RoIAlign is linear with weights summing to 1 (every sample point of a box clipped to the
    # image lies inside it), so normalising the image once equals normalising every crop, and
    # costs H*W instead of S*M*s*s.
    mean = torch.tensor(CLIP_MEAN, device=image.device).view(3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, device=image.device).view(3, 1, 1) * 255.0
    normalised = (image.float() - mean) / std
    if len(squares) == 0:
        return normalised.new_zeros(0, 3, size, size)
    # aligned=True: pixel centres at +0.5, as in PIL's resampling. sampling_ratio=-1 takes
    # ceil(side / s) samples per output pixel and axis: averaging (an antialias) when the square
    # is larger than s, plain bilinear interpolation when it is smaller.
    return roi_align(
        normalised[None],
        [squares],
        output_size=size,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )


def clip_preprocess(size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """CLIP's own preprocess for input size ``size`` (what ``clip.load`` returns with a model):
    bicubic resize of the short side, centre crop, to tensor, normalise."""
    from clip.clip import _transform  # clip's function; no public name for it

    return _transform(size)


def reference_crops(
    image: Image.Image,
    boxes: torch.Tensor,
    scales: Sequence[float] = (1.0, 1.5),
    preprocess: Optional[Callable[[Image.Image], torch.Tensor]] = None,
    size: int = 224,
) -> torch.Tensor:
    """
    The same crops as :func:`fast_crops`, one at a time with PIL and CLIP's ``preprocess``
    (the slow path most implementations use; kept to check the fast one).

    Args:
        image: PIL image, RGB.
        boxes: (M, 4) XYXY absolute.
        preprocess: CLIP's preprocess (from ``clip.load``); None = :func:`clip_preprocess`.

    Returns:
        Tensor (S * M, 3, s, s) float32, scale-major.
    """
    preprocess = preprocess or clip_preprocess(size)
    width, height = image.size
    crops = context_boxes(torch.as_tensor(boxes, dtype=torch.float32), scales, height, width)
    out = [preprocess(image.crop(tuple(b))) for b in crops.tolist()]
    if not out:
        return torch.zeros(0, 3, size, size)
    return torch.stack(out)
