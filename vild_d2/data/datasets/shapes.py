"""The shapes world: a synthetic open-vocabulary detection dataset in LVIS v1 format.

Categories are "<colour> <shape>" (6 x 6 = 36). Each image holds several objects of varied size,
some overlapping, on a textured or noisy background, with instance masks of their visible parts.
As in ViLD's LVIS setting, the novel categories (frequency "r") appear in training images but are
never annotated there; val annotates every category, and lists all absent ones as negatives (so
the LVIS evaluator counts every false positive). Base categories are "f", or "c" when the world
draws them less often. The default novel categories are compositions of a seen colour and a seen
shape; :func:`novel_for_shapes` makes whole shapes novel in every colour instead (unseen
concepts, issue 31).

Layout under ``root`` (written by :func:`generate_shapes_world`):
``world.json`` (the parameters), ``annotations/{train,val}.json``, ``images/{train,val}/*.png``;
on request ``annotations/train_full.json``, the training images with every object annotated,
the novel ones included (for a supervised upper reference only).
"""

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from detectron2.data.datasets.lvis import load_lvis_json

from .common import keep_categories, register_dataset, require_files
from .shapes_geometry import (
    COLOURS,
    SHAPES,
    background,
    background_texture,
    polygon,
    rasterise,
    visible_box,
)
from ...fileio import atomic_write

__all__ = [
    "COLOURS",
    "SHAPES",
    "SHAPES_CLASSES",
    "DEFAULT_NOVEL",
    "UNSEEN_SHAPES",
    "WorldSpec",
    "background_texture",
    "draw_scene",
    "exact_annotation",
    "generate_shapes_world",
    "load_world_spec",
    "novel_for_shapes",
    "register_shapes_world",
]

SHAPES_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
# One novel category per colour and per shape (a Latin-square diagonal): every colour and every
# shape is still seen, in other combinations, among the base categories.
DEFAULT_NOVEL = (
    "red star",
    "orange heart",
    "yellow circle",
    "green cross",
    "blue square",
    "purple triangle",
)
# The unseen-concept world's novel shapes (issue 31, docs/SHAPES.md): every colour of them is
# novel, so no base category shows the shape; colours stay shared. Hearts a teacher names well
# (99.2% on the hearts world); the star it confuses with a base shape (the cross) when
# undertrained (docs/TEACHER.md): one easy and one hard unseen concept.
UNSEEN_SHAPES = ("star", "heart")
# Sampling weight of a category per frequency: "c" categories are drawn less often than "f";
# novel ("r") ones as often as "f", so that distillation sees them (unannotated) in training.
logger = logging.getLogger(__name__)

_WEIGHTS = {"f": 1.0, "c": 0.35, "r": 1.0}
_LAYOUT = """
shapes/world.json
shapes/annotations/train.json
shapes/annotations/val.json
shapes/images/{train,val}/*.png
"""
_SOURCE = "The shapes world is synthetic: make it with `python tools/make_shapes_world.py`."


@dataclass(frozen=True)
class WorldSpec:
    """The parameters of a shapes world (saved as ``world.json``; the world is a function of
    them)."""

    seed: int = 0
    num_train: int = 600
    num_val: int = 100
    image_size: int = 128
    objects_per_image: Tuple[int, int] = (3, 6)  # inclusive range
    object_size: Tuple[float, float] = (0.12, 0.45)  # diameter range, as a fraction of the image
    novel: Tuple[str, ...] = DEFAULT_NOVEL
    num_common: int = 10  # base categories drawn less often, frequency "c"
    classes: Tuple[str, ...] = field(default_factory=lambda: tuple(SHAPES_CLASSES))

    def __post_init__(self):
        unknown = [n for n in self.novel if n not in self.classes]
        if unknown:
            raise ValueError(
                f"novel categories {unknown} are not shapes-world categories; "
                f"they are '<colour> <shape>' with colour in {list(COLOURS)} "
                f"and shape in {list(SHAPES)}"
            )
        if len(set(self.novel)) != len(self.novel):
            raise ValueError(f"novel categories repeat: {list(self.novel)}")
        if not self.novel or len(self.novel) >= len(self.classes):
            raise ValueError(f"need 1 to {len(self.classes) - 1} novel categories")
        lo, hi = self.objects_per_image
        if not 1 <= lo <= hi:
            raise ValueError(f"objects_per_image must be 1 <= min <= max, got {lo, hi}")

    @property
    def frequencies(self) -> Dict[str, str]:
        """Category name -> LVIS frequency: novel "r"; ``num_common`` base ones "c" (chosen
        by the seed), the other base ones "f"."""
        base = [c for c in self.classes if c not in self.novel]
        rng = np.random.default_rng([self.seed, 1])
        common = set(rng.choice(base, size=min(self.num_common, len(base)), replace=False))
        return {c: "r" if c in self.novel else ("c" if c in common else "f") for c in self.classes}

    @property
    def base(self) -> List[str]:
        return [c for c in self.classes if c not in self.novel]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "WorldSpec":
        d = json.loads(text)
        for k in ("objects_per_image", "object_size", "novel", "classes"):
            d[k] = tuple(d[k])
        return cls(**d)


def novel_for_shapes(shapes: Sequence[str]) -> Tuple[str, ...]:
    """The novel categories of a world whose novel concepts are whole ``shapes``: each of them
    in every colour (in :data:`SHAPES_CLASSES` order), so no base category has that shape."""
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"novel shapes {unknown} are not shapes; choose among {list(SHAPES)}")
    if len(set(shapes)) != len(shapes) or not 1 <= len(shapes) < len(SHAPES):
        raise ValueError(
            f"novel shapes must be 1 to {len(SHAPES) - 1} distinct shapes, got {list(shapes)}"
        )
    return tuple(c for c in SHAPES_CLASSES if c.split(" ")[1] in shapes)


def draw_scene(
    rng: np.random.Generator, spec: WorldSpec, names: Optional[Sequence[str]] = None
) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray, np.ndarray]]]:
    """
    Draw one image.

    Args:
        names: the objects' categories, in drawing order; None = sampled by frequency.

    Returns:
        image: (S, S, 3) uint8 RGB.
        objects: (name, polygon (N, 2) float, visible mask (S, S) bool) per object, in
            drawing order; later objects may cover parts of earlier ones.
    """
    size = spec.image_size
    freq = spec.frequencies
    if names is None:
        weights = np.array([_WEIGHTS[freq[c]] for c in spec.classes])
        count = rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1)
        names = [
            spec.classes[i] for i in rng.choice(len(weights), count, p=weights / weights.sum())
        ]
    image = background(rng, size)
    objects: List[Tuple[str, np.ndarray, np.ndarray]] = []
    for name in names:
        colour, shape = name.split(" ")
        for _ in range(30):  # placements that would hide too much of an earlier object
            d = size * math.exp(rng.uniform(*np.log(spec.object_size)))
            r = d / 2
            cx, cy = rng.uniform(r, size - r, size=2)
            poly = polygon(shape, cx, cy, r, rng.uniform(-0.3, 0.3))
            mask = rasterise([poly], size)
            if mask.sum() >= 16 and all((m & mask).sum() <= 0.4 * m.sum() for _, _, m in objects):
                break
        else:
            continue  # no room left in this image
        for _, _, m in objects:
            m &= ~mask
        rgb = np.array(COLOURS[colour], np.float32) + rng.uniform(-18, 18, size=3)
        shade = 1 + rng.uniform(-0.12, 0.12) * (np.mgrid[0:size, 0:size][0] / size - 0.5)
        painted = np.clip(rgb * shade[..., None] + rng.normal(0, 6, (size, size, 3)), 0, 255)
        image[mask] = painted[mask].astype(np.uint8)
        objects.append((name, poly, mask))
    return image, objects


def exact_annotation(poly: np.ndarray, mask: np.ndarray) -> Optional[dict]:
    """
    LVIS fields of an object from its shape polygon and visible pixels ``mask``: the polygon
    itself when nothing covers it, else the outlines of the visible pixels; ``bbox`` = the
    extent of the visible pixels, ``area`` = their count.
    """
    size = mask.shape[0]
    if not mask.any():
        return None
    if np.array_equal(rasterise([poly], size), mask):
        polygons = [poly]
    else:
        # Outlines traced on a 4x upsampled mask: the traced boundary pixels' centres are 1/8
        # pixel inside the visible region's edges, so the polygons rasterise back to it.
        up = np.kron(mask.astype(np.uint8), np.ones((4, 4), np.uint8))
        contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polygons = [(c[:, 0, :] + 0.5) / 4 for c in contours if len(c) >= 3]
        polygons = [p for p in polygons if cv2.contourArea(p.astype(np.float32)) >= 1]
        if not polygons:
            return None
    x0, y0, x1, y1 = visible_box(mask)
    return {
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(mask.sum()),
        "segmentation": [[float(v) for v in p.reshape(-1)] for p in polygons],
    }


def generate_shapes_world(
    root: str, spec: WorldSpec = WorldSpec(), progress=None, full_train: bool = False
) -> Path:
    """Write the world of ``spec`` under ``root`` (deterministic in ``spec``); ``world.json`` is
    written last, so its presence means the world is complete. ``full_train``: also write
    ``annotations/train_full.json``, the same training images with the novel objects annotated
    too (the other files are the same bytes either way). Returns ``root``."""
    root = Path(root)
    freq = spec.frequencies
    categories = [
        {
            "id": i + 1,
            "name": n,
            "synonyms": [n],
            "frequency": freq[n],
            "def": n,
            "image_count": 0,
            "instance_count": 0,
        }
        for i, n in enumerate(spec.classes)
    ]
    cat_id = {n: i + 1 for i, n in enumerate(spec.classes)}
    for split_index, (split, count) in enumerate(
        (("train", spec.num_train), ("val", spec.num_val))
    ):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([spec.seed, 100 + split_index])
        images, annotations, full = [], [], []
        for k in range(count):
            image_id = k + 1 + split_index * 1_000_000
            image, objects = draw_scene(rng, spec)
            file_name = f"{k:06d}.png"
            cv2.imwrite(str(root / "images" / split / file_name), image[:, :, ::-1])
            for name, poly, mask in objects:
                ann = exact_annotation(poly, mask)
                if ann is None:
                    continue
                ann = {"image_id": image_id, "category_id": cat_id[name], **ann}
                if split == "train" and full_train:
                    full.append({"id": len(full) + 1, **ann})
                if split == "train" and name in spec.novel:
                    continue  # novel objects are in the picture, never in the training labels
                annotations.append({"id": len(annotations) + 1, **ann})
            images.append(
                {
                    "id": image_id,
                    # load_lvis_json finds an image by the last two parts of its coco_url.
                    "coco_url": f"shapes/{split}/{file_name}",
                    "file_name": f"{split}/{file_name}",
                    "height": spec.image_size,
                    "width": spec.image_size,
                    # Verified negatives: every category not in the picture (so in val, where
                    # annotation is exhaustive, the LVIS evaluator counts every false positive).
                    "neg_category_ids": sorted(
                        set(cat_id.values()) - {cat_id[name] for name, _, _ in objects}
                    ),
                    "not_exhaustive_category_ids": [],
                }
            )
            if progress is not None:
                progress(split, k + 1, count)
        (root / "annotations").mkdir(exist_ok=True)
        docs = {
            split: annotations,
            **({"train_full": full} if split == "train" and full_train else {}),
        }
        for name, anns in docs.items():
            doc = {
                "info": {"description": f"vild_d2 shapes world ({name})", "seed": spec.seed},
                "licenses": [],
                "images": images,
                "annotations": anns,
                "categories": categories,
            }
            atomic_write(root / "annotations" / f"{name}.json", [json.dumps(doc).encode()])
    atomic_write(root / "world.json", [spec.to_json().encode()])
    return root


def load_world_spec(root: str) -> Optional[WorldSpec]:
    """The spec of the world at ``root``, or None if none has been written there."""
    path = Path(root) / "world.json"
    if not path.is_file():
        return None
    try:
        return WorldSpec.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a shapes-world spec ({e}); regenerate the world") from e


def _load(root: Path, split: str, name: str, datasets_root: str, keep=None) -> List[dict]:
    json_file = root / "annotations" / f"{split}.json"
    layout = _LAYOUT.replace("shapes/", f"{root.name}/")
    source = _SOURCE
    if split == "train_full":
        layout += f"{root.name}/annotations/train_full.json\n"
        source = _SOURCE.replace(".py`", ".py --full-train`")
    require_files(name, [root / "world.json", json_file], datasets_root, layout, source)
    load_world_spec(root)  # a damaged world.json is an error naming it
    dicts = load_lvis_json(str(json_file), str(root / "images") + os.sep)
    # keep: {0-based id over all classes: contiguous id over the kept ones}
    return dicts if keep is None else keep_categories(dicts, keep)


def register_shapes_world(
    datasets_root: str, prefix: str = "shapes", folder: Optional[str] = None, strict: bool = True
) -> List[str]:
    """
    Register the world at ``<datasets_root>/<folder>`` (default folder: ``prefix``):

    * ``<prefix>_train_base``: training images, base categories (contiguous ids) - for ViLD;
    * ``<prefix>_train``: the same images over all categories, the novel ones without a single
      annotation - for the supervised baseline, whose classifier has a row for every category;
    * ``<prefix>_val``: all categories annotated; ``novel_classes`` = the "r" ones;
    * ``<prefix>_train_full``: the training images with the novel objects annotated too
      (``annotations/train_full.json``, written only on request) - for a supervised upper
      reference, never for an open-vocabulary model.

    The categories come from ``world.json`` when the world exists (the only file read here),
    else from the default spec; an unreadable one is an error, or with ``strict=False`` a
    warning (the defaults are registered; loading the data then raises). Returns the names.
    """
    root = Path(os.path.expanduser(datasets_root)) / (folder or prefix)
    try:
        spec = load_world_spec(root) or WorldSpec()
    except ValueError as e:
        if strict:
            raise
        logger.warning("%s; registering the default shapes categories", e)
        spec = WorldSpec()
    classes, base = list(spec.classes), spec.base
    keep = {classes.index(c): k for k, c in enumerate(base)}
    common = {
        "evaluator_type": "lvis",
        "image_root": str(root / "images"),
        "world_root": str(root),
    }
    entries = {
        f"{prefix}_train_base": ("train", keep, base, []),
        f"{prefix}_train": ("train", None, classes, list(spec.novel)),
        f"{prefix}_val": ("val", None, classes, list(spec.novel)),
        f"{prefix}_train_full": ("train_full", None, classes, list(spec.novel)),
    }
    for name, (split, kept, names, novel) in entries.items():
        register_dataset(
            name,
            lambda s=split, n=name, k=kept: _load(root, s, n, datasets_root, k),
            {
                **common,
                "thing_classes": names,
                "novel_classes": novel,
                "json_file": str(root / "annotations" / f"{split}.json"),
            },
        )
    return list(entries)
