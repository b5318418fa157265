"""The official input pipeline at test time (utils/input_utils.py): RGB / 255, ImageNet
mean/std, the longer side resized to the canvas size with TF's LEGACY bilinear resize, the image
padded (bottom/right, zeros after normalisation) to a fixed square canvas.

TF1's ``resize_images`` (bilinear, align_corners=False, half_pixel_centers=False) samples
output pixel y at y * (in / out) (no half-pixel centres): a 4x4 -> 2x2 resize keeps pixels
(0, 0), (0, 2), (2, 0), (2, 2). PyTorch's ``interpolate(align_corners=False)`` uses half-pixel
centres and gives other values.
"""

from typing import Tuple

import numpy as np
import torch

__all__ = ["official_scaled_size", "legacy_resize_bilinear"]


def official_scaled_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """(h, w) of an image whose longer side is resized to ``size`` (float32 and round-half-even,
    as the official ``resize_and_crop_image``)."""
    image_size = np.array([height, width], dtype=np.float32)
    scale = np.minimum(np.float32(size) / image_size[0], np.float32(size) / image_size[1])
    scaled = np.round(image_size * scale)
    return int(scaled[0]), int(scaled[1])


def _axis(in_size: int, out_size: int, device):
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)  # TF: float(in) / out
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = torch.floor(src)
    hi = torch.clamp(lo + 1, max=in_size - 1)
    return lo.long().to(device), hi.long().to(device), (src - lo).to(device)


def legacy_resize_bilinear(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float image -> (C, size[0], size[1]), TF1 legacy bilinear."""
    y0, y1, ly = _axis(image.shape[-2], size[0], image.device)
    x0, x1, lx = _axis(image.shape[-1], size[1], image.device)
    rows0, rows1 = image[:, y0], image[:, y1]
    # TF's order: lerp along x within each row, then between the two rows.
    top = rows0[:, :, x0] + (rows0[:, :, x1] - rows0[:, :, x0]) * lx
    bottom = rows1[:, :, x0] + (rows1[:, :, x1] - rows1[:, :, x0]) * lx
    return top + (bottom - top) * ly[:, None]
