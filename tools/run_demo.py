#!/usr/bin/env python
"""`make demo`: the whole ViLD pipeline on CPU in a couple of minutes, through the project's tools.

1. tools/make_toy_world.py: a tiny synthetic world (LVIS v1 format; novel classes unannotated
   in training) with distillation targets from a tiny random-weight CLIP (no weights can be
   downloaded here);
2. tools/train_net.py --config-file configs/Toy/vild.yaml: train ViLD on the base classes, then
   evaluate all classes with the LVIS evaluator (APr = novel classes);
3. draw the trained model's detections on a val image (the toy vocabulary) and on a real photo
   (scikit-image's astronaut) with a custom vocabulary, switched at run time.

With a random teacher the numbers and the photo's labels mean nothing: this run shows the
plumbing. Stages are cached: rerunning skips a finished stage.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import vild_d2  # noqa: F401  (first: compat bridges)
import cv2
import numpy as np

from detectron2.config import get_cfg
from detectron2.utils.visualizer import Visualizer

from vild_d2 import ViLDPredictor, add_vild_config

CUSTOM_VOCABULARY = ["person", "space suit", "flag", "helmet", "rocket"]


def _run(*args, env):
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], env=env, check=True)


def _draw(predictor, bgr, path, score_thresh=0.0, top=10):
    instances = predictor(bgr)["instances"].to("cpu")
    instances = instances[instances.scores > score_thresh][:top]
    names = predictor.metadata.thing_classes  # follows predictor.set_vocabulary
    scale = 4.0 if bgr.shape[0] < 200 else 1.0
    drawn = Visualizer(bgr[:, :, ::-1], predictor.metadata, scale=scale)
    cv2.imwrite(str(path), drawn.draw_instance_predictions(instances).get_image()[:, :, ::-1])
    labels = [f"{names[c]} {s:.2f}" for c, s in zip(instances.pred_classes, instances.scores)]
    print(f"  {path}: {labels[:5]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--iters", type=int, default=600)
    args = parser.parse_args()
    out = Path(args.output)
    datasets = out / "datasets"
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets))
    world = datasets / "vild_toy"
    clip_path = world / "tiny_clip.pt"
    overrides = [
        "MODEL.VILD.CLIP_MODEL",
        str(clip_path),
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(out / "cache"),
        "SOLVER.MAX_ITER",
        str(args.iters),
        "SOLVER.STEPS",
        f"({int(args.iters * 0.8)},)",
        "OUTPUT_DIR",
        str(out / "train"),
    ]

    print("[1/3] toy world and tiny CLIP teacher")
    if not (world / "distill_train.pth").is_file():
        _run(
            "tools/make_toy_world.py",
            "--root",
            str(world),
            "--num-train",
            "48",
            "--num-val",
            "8",
            env=env,
        )
    print("[2/3] train ViLD on base classes, evaluate on all (LVIS evaluator)")
    weights = out / "train" / "model_final.pth"
    if not weights.is_file():
        _run("tools/train_net.py", "--config-file", "configs/Toy/vild.yaml", *overrides, env=env)
    else:
        _run(
            "tools/train_net.py",
            "--config-file",
            "configs/Toy/vild.yaml",
            "--eval-only",
            "MODEL.WEIGHTS",
            str(weights),
            *overrides,
            env=env,
        )

    print("[3/3] pictures")
    os.environ["DETECTRON2_DATASETS"] = str(datasets)
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file("configs/Toy/vild.yaml")
    cfg.merge_from_list(overrides + ["MODEL.WEIGHTS", str(weights)])
    predictor = ViLDPredictor(cfg)
    val_image = cv2.imread(str(world / "images" / "val_00000.png"))
    _draw(predictor, val_image, out / "toy_val.png")

    from skimage import data as skdata

    photo = np.ascontiguousarray(skdata.astronaut()[:, :, ::-1])
    predictor.set_vocabulary(CUSTOM_VOCABULARY)
    _draw(predictor, photo, out / "astronaut_custom_vocabulary.png")
    print(f"done: pictures and the training run are in {out}/")


if __name__ == "__main__":
    main()
