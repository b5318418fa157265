#!/usr/bin/env python
"""A user's own dataset, COCO format, for docs/OWN_DATA.md: its walk-through's test and its
fine-tuning measurement.

    python demo/own_data.py write --root output/own_data/datasets/new_shapes
        # images/{train,val}/*.png, annotations/{train,val}.json, new_shapes.yaml
    python demo/own_data.py finetune --shapes output/own_data/shapes \\
        --datasets output/own_data/datasets --output output/own_data/finetune

``write`` draws pictures with the shapes world's helpers but writes its own COCO json: 8
categories under non-contiguous ids, every object annotated (the novel ones too: registration
removes them from <name>_train_base), and a dataset YAML file that names it. ``finetune`` runs
the measurement whose design docs/OWN_DATA.md fixes, through the project's tools.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np

from vild_d2.data.datasets.shapes import WorldSpec, draw_scene, visible_box

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
    categories: Dict[int, str] = CATEGORIES,
    novel: Sequence[str] = NOVEL,
) -> Path:
    """Write the dataset under ``root``; returns the dataset YAML file (paths relative to it)."""
    root = Path(root)
    spec = WorldSpec(seed=seed, image_size=image_size, objects_per_image=(2, 4), novel=novel)
    ids = {n: i for i, n in categories.items()}
    names = list(categories.values())
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, 7, split_index])
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k in range(count):
            picked = [names[i] for i in rng.integers(len(names), size=rng.integers(2, 5))]
            image, objects = draw_scene(rng, spec, picked)
            image_id = 1000 * (split_index + 1) + k  # ids with gaps too
            file_name = f"{split}_{k:04d}.png"
            cv2.imwrite(str(root / "images" / split / file_name), image[:, :, ::-1])
            images.append(
                {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
            )
            for cat_name, _, mask in objects:
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
        f"# {name}: a COCO-format dataset (demo/own_data.py); docs/OWN_DATA.md\n"
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
    f = sub.add_parser("finetune", help="the fine-tuning measurement of docs/OWN_DATA.md")
    f.add_argument("--shapes", required=True, help="demo/run_shapes.py's --output")
    f.add_argument("--datasets", required=True, help="where the new dataset is written")
    f.add_argument("--output", required=True)
    f.add_argument("--iters", type=int, default=150)
    f.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    args = p.parse_args(argv)
    if args.command == "write":
        path = write_coco_dataset(args.root, num_train=args.num_train, num_val=args.num_val)
        print(f"wrote {path}")
    else:
        figures = finetune(
            Path(args.shapes), Path(args.datasets), Path(args.output), args.iters, args.steps
        )
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
