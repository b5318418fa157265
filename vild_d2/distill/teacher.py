"""The CLIP teacher of ViLD-image: region embeddings of proposals from their crops.

Shape shorthand: M = boxes, S = context scales, D = CLIP embedding width, s = CLIP input size.
"""

import contextlib
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..clip_models import Device, clip_identity, load_clip
from .crops import fast_crops

__all__ = ["encode_crops", "CLIPTeacher", "crop_settings", "autocast_fp16"]

logger = logging.getLogger(__name__)

# Identifies how targets were cropped; stored in headers so that stores made differently are
# never mixed. Bump it if fast_crops' sampling changes.
CROP_METHOD = "roi_align_centre_square_v1"


def crop_settings(scales: Sequence[float], size: int) -> dict:
    """The crop settings recorded in a store header."""
    return {"method": CROP_METHOD, "scales": [float(s) for s in scales], "size": int(size)}


def autocast_fp16(device: torch.device, enabled: bool = True):
    """fp16 autocast on a GPU (CLIP's ViT and the RPN run in half precision, accumulating in
    fp32 where it matters); nothing on a CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_crops(
    clip_model, crops: torch.Tensor, num_scales: int = 2, batch_size: Optional[int] = None
) -> torch.Tensor:
    """
    Per-box teacher embeddings from crops at several scales: each crop's CLIP image embedding
    is L2-normalised, the S embeddings of a box are summed and the sum L2-normalised.

    Args:
        clip_model: a ``clip.model.CLIP`` (eval mode).
        crops: (S * M, 3, s, s) float, scale-major (as :func:`fast_crops` returns).
        num_scales: S.
        batch_size: crops per CLIP forward; None = all at once.

    Returns:
        Tensor (M, D) float32, unit rows, on the crops' device.
    """
    if len(crops) % num_scales:
        raise ValueError(f"{len(crops)} crops are not {num_scales} scales x M boxes")
    visual = clip_model.visual
    dtype = next(visual.parameters()).dtype
    if len(crops) == 0:
        return crops.new_zeros(0, clip_model.text_projection.shape[1], dtype=torch.float32)
    batch_size = batch_size or len(crops)
    chunks = []
    with autocast_fp16(crops.device):
        for start in range(0, len(crops), batch_size):
            out = clip_model.encode_image(crops[start : start + batch_size].to(dtype))
            chunks.append(F.normalize(out.float(), dim=1))
    per_crop = torch.cat(chunks).view(num_scales, len(crops) // num_scales, -1)
    return F.normalize(per_crop.sum(dim=0), dim=1)


class CLIPTeacher:
    """
    CLIP image encoder that turns an image and its proposals into distillation targets:
    :func:`fast_crops` at ``scales`` then :func:`encode_crops`. CLIP is loaded on first use.
    """

    def __init__(
        self,
        clip_model: str,
        *,
        scales: Sequence[float] = (1.0, 1.5),
        device: Device = "cpu",
        batch_size: Optional[int] = None,
    ):
        """
        Args:
            clip_model: a ``clip.available_models()`` name or a local checkpoint.
            scales: context scales of the crops (ViLD: 1x and 1.5x).
            device: where crops are made and CLIP runs.
            batch_size: crops per CLIP forward (None = all crops of an image at once).
        """
        self.clip_model = clip_model
        self.scales = tuple(float(s) for s in scales)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model = None
        self.identity = clip_identity(clip_model)

    @property
    def model(self):
        if self._model is None:
            logger.info("Loading CLIP teacher %s on %s", self.clip_model, self.device)
            self._model, _ = load_clip(self.clip_model, self.device)
        return self._model

    @property
    def input_size(self) -> int:
        return int(self.model.visual.input_resolution)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    def settings(self) -> dict:
        """What a store header records about this teacher."""
        return {
            "clip": self.identity,
            "crops": crop_settings(self.scales, self.input_size),
            "embed_dim": self.embed_dim,
        }

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image: (3, H, W) uint8 RGB, the original image.
            boxes: (M, 4) XYXY absolute in ``image``.

        Returns:
            Tensor (M, D) float32 on the CPU, unit rows.
        """
        crops = fast_crops(image.to(self.device), boxes, self.scales, self.input_size)
        return encode_crops(self.model, crops, len(self.scales), self.batch_size).cpu()
