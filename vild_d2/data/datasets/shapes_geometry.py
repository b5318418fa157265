"""Drawing the shapes world's pieces: the colours and shapes, their polygons, background
textures, rasterised masks and visible boxes (the scene itself is drawn by
:func:`vild_d2.data.datasets.shapes.draw_scene`)."""

import math
from typing import Dict, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "COLOURS",
    "SHAPES",
    "background",
    "background_texture",
    "polygon",
    "rasterise",
    "visible_box",
]

COLOURS: Dict[str, Tuple[int, int, int]] = {  # RGB
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (235, 215, 45),
    "green": (45, 165, 60),
    "blue": (40, 90, 225),
    "purple": (145, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")


def polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(N, 2) float vertices of ``shape`` inscribed in the circle (cx, cy, r), rotated."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / math.sqrt(2)
    elif shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif shape == "cross":
        a, b = 0.33, 0.95
        pts = np.array(
            [
                [-a, -b],
                [a, -b],
                [a, -a],
                [b, -a],
                [b, a],
                [a, a],
                [a, b],
                [-a, b],
                [-a, a],
                [-b, a],
                [-b, -a],
                [-a, -a],
            ]
        )
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 17.5
    else:
        raise ValueError(f"unknown shape {shape!r}")
    pts = pts / np.linalg.norm(pts, axis=1).max()  # inscribed in the circle (cx, cy, r)
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    return pts * r + np.array([cx, cy])


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: low-saturation noise, a gradient or a stripe/checker texture."""
    return background_texture(rng, size)[0]


def background_texture(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, dict]:
    """
    The background :func:`draw_scene` paints first, with what it is made of, for captions.

    Returns:
        image: (size, size, 3) uint8, exactly ``background``'s for the same ``rng`` state.
        texture: {"kind": "plain" | "gradient" | "stripes" | "checker", "base": mean grey
            level, "amplitude": grey range of the gradient or half the stripe contrast (0 for
            plain), "period": stripe period as a fraction of the image (0 if none),
            "noise": pixel noise std}.
    """
    # The random draws and their order are the world's: a seed's images must not change.
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 190)
    texture = {"kind": "plain", "base": float(base), "amplitude": 0.0, "period": 0.0}
    if kind == 0:
        grey = np.full((size, size), base, np.float32)
    elif kind == 1:
        theta = rng.uniform(0, 2 * np.pi)
        amplitude = rng.uniform(20, 60)
        grey = base + amplitude * (np.cos(theta) * xx + np.sin(theta) * yy - 0.5)
        texture.update(kind="gradient", amplitude=float(amplitude))
    else:
        period = rng.uniform(0.05, 0.25)
        wave = np.sin(2 * np.pi * xx / period + rng.uniform(0, 6.3))
        checker = rng.random() < 0.5
        if checker:
            wave = wave * np.sin(2 * np.pi * yy / period)
        amplitude = rng.uniform(10, 35)
        grey = base + amplitude * np.sign(wave)
        texture.update(
            kind="checker" if checker else "stripes",
            amplitude=float(amplitude),
            period=float(period),
        )
    tint = rng.uniform(-12, 12, size=3).astype(np.float32)
    sigma = rng.uniform(4, 22)
    texture["noise"] = float(sigma)
    noise = rng.normal(0, sigma, size=(size, size, 3)).astype(np.float32)
    image = np.clip(grey[..., None] + tint + noise, 0, 255).astype(np.uint8)
    return image, texture


def rasterise(polygons: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(size, size) bool: the pixels of ``polygons`` (XY, pixel-edge coordinates) as the COCO
    and LVIS APIs rasterise an annotation. The objects are painted with exactly these pixels,
    so annotations and pictures agree."""
    rles = mask_util.frPyObjects([p.reshape(-1).tolist() for p in polygons], size, size)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def visible_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """XYXY extent of a non-empty ``mask``'s pixels, in pixel-edge coordinates: an object's box
    in the annotations, the teacher's crops and the pipeline's diagnostics alike."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
