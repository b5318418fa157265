"""Loading CLIP: build, load and identify a CLIP model, and the widths of the named ones.

The bottom of the package's layers: the text encoder, the distillation teacher and the tests
all make or load their CLIP here (it imports nothing of vild_d2 but its file helpers).
"""

import pickle
import urllib.error
from pathlib import Path
from typing import Optional, Tuple, Union

import clip
import torch
from clip.model import CLIP

from .fileio import file_sha256
from .safe_load import torch_refusal

__all__ = [
    "CLIP_WIDTHS",
    "VIT_B_32",
    "build_clip",
    "clip_embed_dim",
    "clip_identity",
    "load_clip",
]

Device = Union[str, torch.device]


def clip_identity(spec: str) -> str:
    """What identifies the CLIP weights of ``spec``: a ``clip.available_models()`` name, or for
    a local checkpoint its content, "sha256:<first 16 hex digits>" (a byte-identical copy is
    the same CLIP wherever it lies; a rewritten file is another)."""
    if spec in clip.available_models():
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return f"sha256:{file_sha256(path)[:16]}"
    raise FileNotFoundError(
        f"CLIP model {spec!r} is neither a known model name nor an existing checkpoint file; "
        f"known names: {clip.available_models()}"
    )


# What torch.load and clip's build_model raise on bytes that are not a CLIP checkpoint (a text
# file gives KeyError: 101, a truncated one EOFError or RuntimeError, another model KeyError).
_UNREADABLE = (
    pickle.UnpicklingError,
    RuntimeError,
    KeyError,
    EOFError,
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
    UnicodeDecodeError,
    OSError,
)


def load_clip(spec: str, device: Device = "cpu") -> Tuple[CLIP, str]:
    """Load CLIP (eval mode) from a model name or a local checkpoint; returns (model, identity).

    Raises:
        RuntimeError: a named model that is not downloaded yet cannot be downloaded (offline).
        ValueError: a local file that is not a CLIP checkpoint.
    """
    identity = clip_identity(spec)
    # clip.load builds a randomly initialised CLIP before it loads the weights: without a fork,
    # that init would consume the global RNG, so training with a cold text-embedding cache
    # would start from other random weights (and data order) than with a warm one.
    with torch.random.fork_rng(devices=[]):
        model = _load_clip(spec, device)
    # build_model casts weights to fp16, which CPU matmuls do not support well: use fp32 there.
    if torch.device(device).type == "cpu":
        model = model.float()
    return model.eval(), identity


def _load_clip(spec: str, device: Device) -> CLIP:
    if spec in clip.available_models():
        try:
            model, _ = clip.load(spec, device=device, jit=False)
        except (urllib.error.URLError, OSError) as e:  # offline, proxy, DNS, a full disk...
            raise RuntimeError(
                f"CLIP {spec!r} is not in ~/.cache/clip and could not be downloaded "
                f"({type(e).__name__}: {e}). A named CLIP is downloaded on first use; without "
                "internet, copy the checkpoint from a machine that has it (clip.load there "
                f"writes ~/.cache/clip/{Path(clip.clip._MODELS[spec]).name}) and pass its path "
                "instead of the name (--clip / MODEL.VILD.CLIP_MODEL /path/to/file.pt)"
            ) from e
    else:
        path = str(Path(spec).expanduser())
        try:
            model, _ = clip.load(path, device=device, jit=False)
        except _UNREADABLE as e:  # torch.load / build_model on other bytes: open-ended errors
            refused = torch_refusal(path, e, hint="--clip / MODEL.VILD.CLIP_MODEL must be CLIP")
            if refused is not None:  # a pickle that would run code: no torch advice to retry
                raise refused from None
            raise ValueError(
                f"{path} is not a CLIP checkpoint that clip.load reads (an OpenAI JIT archive "
                f"or a state dict of clip.model.CLIP): {type(e).__name__}: {e}"
            ) from e
    return model


# Embedding widths of the clip.available_models() names (their text_projection widths).
CLIP_WIDTHS = {
    "RN50": 1024,
    "RN101": 512,
    "RN50x4": 640,
    "RN50x16": 768,
    "RN50x64": 1024,
    "ViT-B/32": 512,
    "ViT-B/16": 512,
    "ViT-L/14": 768,
    "ViT-L/14@336px": 768,
}


def clip_embed_dim(spec: str) -> Optional[int]:
    """CLIP's embedding width D without loading the model (None if it cannot be told)."""
    if spec in CLIP_WIDTHS:
        return CLIP_WIDTHS[spec]
    try:
        state = torch.load(spec, map_location="cpu", mmap=True, weights_only=True)
        return int(state["text_projection"].shape[1])
    except Exception:  # a TorchScript archive or anything else: the header check covers it
        return None


# ViT-B/32's dimensions (what clip.load("ViT-B/32") builds), for random-weight stand-ins.
VIT_B_32 = dict(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=32,
    transformer_width=512,
    transformer_layers=12,
)


def build_clip(
    *,
    embed_dim: int,
    image_resolution: int,
    vision_layers,
    vision_width: int,
    vision_patch_size: Optional[int],
    transformer_width: int,
    transformer_layers: int,
    context_length: int = 77,
) -> CLIP:
    """
    A random-weight ``clip.model.CLIP`` whose saved state dict ``clip.load(path)`` rebuilds as
    the same model: a ViT image tower (``vision_layers`` an int, with ``vision_patch_size``) or
    CLIP's ModifiedResNet (a tuple of per-stage blocks, patch size None). The one place the
    tests, the benchmark and the shapes demo's teacher make a CLIP.

    ``clip.model.build_model`` infers the attention heads as width // 64, so the text width (and
    a ViT's width) must be a multiple of 64.
    """
    vit = isinstance(vision_layers, int)
    if transformer_width % 64 or (vit and vision_width % 64):
        raise ValueError(
            f"transformer_width={transformer_width}, vision_width={vision_width}: clip.load "
            "infers attention heads as width // 64, so these widths must be multiples of 64"
        )
    return CLIP(
        embed_dim=embed_dim,
        image_resolution=image_resolution,
        vision_layers=vision_layers if vit else tuple(vision_layers),
        vision_width=vision_width,
        vision_patch_size=vision_patch_size if vit else None,
        context_length=context_length,
        vocab_size=49408,
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,
        transformer_layers=transformer_layers,
    )
