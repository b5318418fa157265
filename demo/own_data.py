#!/usr/bin/env python
"""A user's own dataset, COCO format, for docs/OWN_DATA.md: its walk-through's test and its
fine-tuning measurement.

    python demo/own_data.py write --root output/own_data/datasets/new_shapes
        # images/{train,val}/*.png, annotations/{train,val}.json, new_shapes.yaml
    python demo/own_data.py write --style paper --root output/own_data/datasets/paper_shapes
    python demo/own_data.py finetune --shapes output/own_data/shapes \\
        --datasets output/own_data/datasets --output output/own_data/finetune

``write`` draws pictures with the shapes world's helpers but writes its own COCO json: 8
categories under non-contiguous ids, every object annotated (the novel ones too: registration
removes them from <name>_train_base), and a dataset YAML file that names it. ``--style paper``
draws another style instead, with names the shapes world does not have (:data:`PAPER_CATEGORIES`:
new colours and shapes on light graph paper). ``finetune`` runs the measurement whose design
docs/OWN_DATA.md fixes, through the project's tools.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from vild_d2.data.datasets.shapes import WorldSpec, draw_scene, visible_box
from vild_d2.data.datasets.shapes import exact_annotation
from vild_d2.data.datasets.shapes_geometry import rasterise

REPO = Path(__file__).resolve().parent.parent
# Category id -> name: ids with gaps, as in COCO (and not in id order of the shapes world).
CATEGORIES: Dict[int, str] = {
    3: "red circle",
    7: "orange square",
    11: "yellow star",
    19: "green triangle",
    23: "blue cross",
    42: "purple circle",
    57: "red triangle",
    64: "blue heart",
}
NOVEL = ("red triangle", "blue heart")

# The "paper" style: colours and shapes the shapes world does not have, on light graph paper
# (the world's backgrounds are grey noise, gradients, stripes or checkers). Each novel category
# is a seen colour with a seen shape, in a combination no base category shows.
PAPER_COLOURS = {"pink": (240, 110, 185), "teal": (20, 150, 150), "brown": (125, 75, 30)}  # RGB
PAPER_CATEGORIES: Dict[int, str] = {
    5: "pink diamond",
    9: "teal arrow",
    16: "brown crescent",
    21: "pink arrow",
    33: "teal crescent",
    38: "brown diamond",
    50: "pink crescent",
    61: "teal diamond",
}
PAPER_NOVEL = ("pink crescent", "teal diamond")
STYLES = ("shapes", "paper")


def paper_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(N, 2) float vertices of a paper-style ``shape`` inscribed in the circle (cx, cy, r),
    rotated by ``angle``; none has a hole, so a polygon annotation outlines it exactly."""
    if shape == "diamond":  # a rhombus, taller than wide
        pts = np.array([[0.0, -1.0], [0.55, 0.0], [0.0, 1.0], [-0.55, 0.0]])
    elif shape == "arrow":  # pointing right: a shaft and a head
        pts = np.array(
            [[-1, -0.22], [0.2, -0.22], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.22], [-1, 0.22]]
        )
    elif shape == "crescent":  # the unit disc less a disc of radius 0.8 centred at (0.45, 0)
        a, b = math.atan2(0.78, 0.625), math.atan2(0.78, 0.175)  # where the two circles cross
        outer = np.linspace(a, 2 * np.pi - a, 24)
        inner = np.linspace(2 * np.pi - b, b, 20)
        pts = np.concatenate(
            [
                np.stack([np.cos(outer), np.sin(outer)], 1),
                np.stack([0.45 + 0.8 * np.cos(inner), 0.8 * np.sin(inner)], 1),
            ]
        )
    else:
        raise ValueError(f"unknown paper-style shape {shape!r}")
    pts = pts / np.linalg.norm(pts, axis=1).max()
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) * r + np.array([cx, cy])


def paper_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: light tinted paper (levels about 215-250) with a darker grid."""
    paper = rng.uniform(228, 246) + rng.uniform(-10, 4, size=3)
    period = int(rng.integers(8, 17))
    yy, xx = np.mgrid[0:size, 0:size]
    offset = rng.integers(period, size=2)
    grid = ((yy + offset[0]) % period == 0) | ((xx + offset[1]) % period == 0)
    image = np.broadcast_to(paper, (size, size, 3)) - 45.0 * grid[..., None]
    return np.clip(image + rng.normal(0, 3, (size, size, 3)), 0, 255).astype(np.uint8)


def draw_paper_scene(
    rng: np.random.Generator, names: Sequence[str], size: int
) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray, np.ndarray]]]:
    """One paper-style picture: (size, size, 3) uint8 RGB and (name, polygon, visible mask)
    per object drawn, as :func:`draw_scene`. A placement is refused if it would hide more than
    40% of an earlier object or leave a hole in one (its outline would then cover the hole)."""
    image = paper_background(rng, size)
    objects: List[Tuple[str, np.ndarray, np.ndarray]] = []
    for name in names:
        colour, shape = name.split(" ")
        for _ in range(30):
            r = size * rng.uniform(0.1, 0.22)
            cx, cy = rng.uniform(r, size - r, size=2)
            poly = paper_polygon(shape, cx, cy, r, rng.uniform(-np.pi, np.pi))
            mask = rasterise([poly], size)
            if mask.sum() >= 16 and all(
                (m & mask).sum() <= 0.4 * m.sum() and _outlined(p, m & ~mask) for _, p, m in objects
            ):
                break
        else:
            continue
        for _, _, m in objects:
            m &= ~mask
        rgb = np.array(PAPER_COLOURS[colour], np.float32) + rng.uniform(-12, 12, size=3)
        painted = np.clip(rgb + rng.normal(0, 5, (size, size, 3)), 0, 255).astype(np.uint8)
        image[mask] = painted[mask]
        objects.append((name, poly, mask))
    return image, objects


def _outlined(poly: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the annotation polygons of an object (``poly``) whose visible pixels are ``mask``
    rasterise back to exactly those pixels."""
    found = exact_annotation(poly, mask)
    if found is None:
        return False
    polys = [np.array(p).reshape(-1, 2) for p in found["segmentation"]]
    return np.array_equal(rasterise(polys, mask.shape[0]), mask)


def _polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons of a mask's visible parts (outer contours, pixel-edge coordinates)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polys = [(c[:, 0, :] + 0.5).reshape(-1).tolist() for c in contours if len(c) >= 3]
    return [[float(v) for v in p] for p in polys]


def write_coco_dataset(
    root,
    *,
    name: str = "new_shapes",
    num_train: int = 300,
    num_val: int = 60,
    image_size: int = 128,
    seed: int = 0,
    categories: Optional[Dict[int, str]] = None,
    novel: Optional[Sequence[str]] = None,
    style: str = "shapes",
) -> Path:
    """Write the dataset under ``root``; returns the dataset YAML file (paths relative to it).
    ``style``: "shapes" (the world's drawing, :data:`CATEGORIES` by default) or "paper"
    (:func:`draw_paper_scene`, :data:`PAPER_CATEGORIES` by default, exact mask outlines)."""
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {list(STYLES)}")
    paper = style == "paper"
    if categories is None:
        categories = PAPER_CATEGORIES if paper else CATEGORIES
    if novel is None:
        novel = PAPER_NOVEL if paper else NOVEL
    root = Path(root)
    if not paper:
        spec = WorldSpec(seed=seed, image_size=image_size, objects_per_image=(2, 4), novel=novel)
    ids = {n: i for i, n in categories.items()}
    names = list(categories.values())
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, 7, split_index])
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k in range(count):
            picked = [names[i] for i in rng.integers(len(names), size=rng.integers(2, 5))]
            if paper:
                image, objects = draw_paper_scene(rng, picked, image_size)
            else:
                image, objects = draw_scene(rng, spec, picked)
            image_id = 1000 * (split_index + 1) + k  # ids with gaps too
            file_name = f"{split}_{k:04d}.png"
            cv2.imwrite(str(root / "images" / split / file_name), image[:, :, ::-1])
            images.append(
                {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
            )
            for cat_name, poly, mask in objects:
                if paper:  # outlines that rasterise back to the visible pixels exactly
                    found = exact_annotation(poly, mask)
                    polys = found["segmentation"] if found else []
                else:
                    polys = _polygons(mask) if mask.any() else []
                if not polys:
                    continue
                x0, y0, x1, y1 = visible_box(mask)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": ids[cat_name],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(mask.sum()),
                        "segmentation": polys,
                        "iscrowd": 0,
                    }
                )
        doc = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in categories.items()],
        }
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(doc))
    dataset_file = root / f"{name}.yaml"
    dataset_file.write_text(
        f"# {name}: a COCO-format dataset (demo/own_data.py{' --style paper' * paper}); "
        "docs/OWN_DATA.md\n"
        f"name: {name}\n"
        "format: coco\n"
        f"novel: {json.dumps(list(novel))}\n"
        "train: {json: annotations/train.json, images: images/train}\n"
        "val: {json: annotations/val.json, images: images/val}\n"
    )
    return dataset_file


def _run(args: List[str], log, env=None, done: Path = None) -> None:
    """Run a tool; skipped when ``done`` (its last output) exists: a rerun resumes."""
    if done is not None and done.exists():
        log.write(f"= {done} exists: skipped {' '.join(args)}\n")
        return
    log.write("+ " + " ".join(args) + "\n")
    log.flush()
    run = subprocess.run([sys.executable, *args], cwd=REPO, stdout=log, stderr=log, env=env)
    code = run.returncode
    if code:
        raise SystemExit(f"failed (exit {code}): {' '.join(args)}; see {log.name}")


def _results(folder: Path, dataset: str) -> dict:
    return json.loads((folder / "inference" / dataset / "results.json").read_text())["bbox"]


STEPS = ("proposals", "targets", "vild_text", "vild")


def finetune(
    shapes: Path, datasets: Path, output: Path, iters: int = 150, steps: Sequence[str] = STEPS
) -> dict:
    """The measurement of docs/OWN_DATA.md: each of ViLD-text and ViLD from ``shapes``, before
    and after a fine-tune on the new data; returns {variant: {"before"|"after": results}} of
    the variants done so far. ``steps``: those of :data:`STEPS` to run (the two variants may
    run at once, in two processes, once the targets exist); what exists is not redone."""
    shapes, datasets, output = shapes.resolve(), datasets.resolve(), output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    dataset_file = datasets / "new_shapes" / "new_shapes.yaml"
    if not dataset_file.is_file():
        dataset_file = write_coco_dataset(datasets / "new_shapes")
    teacher = shapes / "teacher" / "tiny_clip.pt"
    common = [
        *("MODEL.VILD.DATASET_FILES", f"('{dataset_file}',)"),
        *("MODEL.VILD.CLIP_MODEL", str(teacher)),
        *("MODEL.VILD.EMBEDDING_CACHE_DIR", str(output / "cache")),
        *("DATALOADER.NUM_WORKERS", "1"),
    ]
    # Before and after, on the old world (its full vocabulary) and on the new data.
    tests = ["DATASETS.TEST", "('shapes_val', 'new_shapes_val')"]
    proposals, targets = output / "stores" / "proposals", output / "stores" / "targets"
    # The old world is registered (shapes_*) from the datasets root, as detectron2's builtins.
    # One thread each: on a busy machine, intra-op threads mostly wait for each other.
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1")
    with open(output / f"finetune_{'_'.join(steps)}.log", "a") as log:
        if "proposals" in steps:  # the old world's base RPN on the new training images
            rpn = shapes / "rpn" / "model_final.pth"
            _run(
                [
                    "tools/precompute_proposals.py",
                    "--config-file",
                    "configs/Shapes/rpn.yaml",
                    "--dataset",
                    "new_shapes_train_base",
                    "--output",
                    str(proposals),
                    "--num-proposals",
                    "100",
                    "MODEL.WEIGHTS",
                    str(rpn),
                    *common,
                ],
                log,
                env,
            )
        if "targets" in steps:
            _run(
                [
                    "tools/precompute_clip_embeddings.py",
                    "--dataset-file",
                    str(dataset_file),
                    "--proposals",
                    str(proposals),
                    "--dataset",
                    "new_shapes_train_base",
                    "--clip",
                    str(teacher),
                    "--output",
                    str(targets),
                    "--max-proposals",
                    "100",
                ],
                log,
                env,
            )
        for variant in [v for v in ("vild_text", "vild") if v in steps]:
            config = f"configs/Shapes/{variant}.yaml"
            weights = shapes / variant / "model_final.pth"
            tuned = output / f"{variant}_finetune" / "model_final.pth"
            evaluate = ["tools/train_net.py", "--config-file", config, "--eval-only", *common]
            for model, when in ((weights, "before"), (tuned, "after")):
                if when == "after":  # the fine-tune: the new base classes only
                    _run(
                        [
                            "tools/train_net.py",
                            "--config-file",
                            config,
                            "MODEL.WEIGHTS",
                            str(weights),
                            *common,
                            "DATASETS.TRAIN",
                            "('new_shapes_train_base',)",
                            "DATASETS.TEST",
                            "()",
                            "MODEL.VILD.DISTILL.STORES",
                            f"('{targets}',)",
                            "SOLVER.MAX_ITER",
                            str(iters),
                            "SOLVER.BASE_LR",
                            "0.005",
                            "SOLVER.WARMUP_ITERS",
                            str(max(1, iters // 6)),
                            "SOLVER.STEPS",
                            f"({int(iters * 0.8)},)",
                            "OUTPUT_DIR",
                            str(tuned.parent),
                        ],
                        log,
                        env,
                        tuned,
                    )
                folder = output / f"{variant}_{when}"
                done = folder / "inference" / "new_shapes_val" / "results.json"
                _run(
                    [*evaluate, "MODEL.WEIGHTS", str(model), *tests, "OUTPUT_DIR", str(folder)],
                    log,
                    env,
                    done,
                )
    figures = {}
    for variant in ("vild_text", "vild"):
        folders = {w: output / f"{variant}_{w}" for w in ("before", "after")}
        if all((f / "inference" / "new_shapes_val").is_dir() for f in folders.values()):
            figures[variant] = {
                w: {d: _results(f, d) for d in ("shapes_val", "new_shapes_val")}
                for w, f in folders.items()
            }
    (output / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the COCO-format dataset and its YAML file")
    w.add_argument("--root", required=True)
    w.add_argument("--num-train", type=int, default=300)
    w.add_argument("--num-val", type=int, default=60)
    w.add_argument("--style", choices=STYLES, default="shapes", help="paper: new names")
    w.add_argument("--name", help="the dataset's name (default: new_shapes, paper_shapes)")
    w.add_argument("--seed", type=int, default=0, help="another seed: a held-out draw")
    f = sub.add_parser("finetune", help="the fine-tuning measurement of docs/OWN_DATA.md")
    f.add_argument("--shapes", required=True, help="demo/run_shapes.py's --output")
    f.add_argument("--datasets", required=True, help="where the new dataset is written")
    f.add_argument("--output", required=True)
    f.add_argument("--iters", type=int, default=150)
    f.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    args = p.parse_args(argv)
    if args.command == "write":
        name = args.name or ("paper_shapes" if args.style == "paper" else "new_shapes")
        path = write_coco_dataset(
            args.root,
            name=name,
            num_train=args.num_train,
            num_val=args.num_val,
            seed=args.seed,
            style=args.style,
        )
        print(f"wrote {path}")
    else:
        figures = finetune(
            Path(args.shapes), Path(args.datasets), Path(args.output), args.iters, args.steps
        )
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
