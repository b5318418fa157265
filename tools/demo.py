#!/usr/bin/env python
"""Detect any vocabulary with a trained ViLD model: pictures (and JSON) for images or a video.

    python tools/demo.py --config-file configs/Toy/vild.yaml --input photo.jpg dir/ "*.png" \\
        --vocabulary custom --custom-vocabulary "red star,blue cross" --output out/ --json \\
        --opts MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu

Exit status: 0 = every input processed; 1 = some inputs failed (each is reported, the others
are still written); 2 = nothing to do (bad arguments, vocabulary or config; no images found).
"""

import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path

import vild_d2  # noqa: F401  (first: compat bridges)
import cv2
import numpy as np
import pycocotools.mask as mask_util
import tqdm

from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.engine.predictor import vocabulary_from_cli

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("vild_d2.demo")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True, metavar="FILE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="image files, folders or glob patterns")
    src.add_argument("--video-input", help="a video file")
    p.add_argument(
        "--vocabulary",
        default="",
        help="lvis | coco | coco_ov | voc | objects365 | custom | a saved vocabulary file | a "
        "registered dataset (default: the vocabulary stored in the checkpoint)",
    )
    p.add_argument("--custom-vocabulary", default="", help='comma-separated names: "cat,dog"')
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--output", help="folder for the pictures (or a file name for one input)")
    p.add_argument("--json", action="store_true", help="also write <output>/detections.json")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs")
    return p


def expand_inputs(items):
    """Image paths from files, folders and glob patterns; errors for empty folders/patterns."""
    paths, errors = [], []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                str(p) for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                errors.append((item, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"))
            paths += found
        elif glob.has_magic(item):
            found = sorted(glob.glob(os.path.expanduser(item)))
            if not found:
                errors.append((item, "no file matches this pattern"))
            paths += found
        else:
            paths.append(item)
    return paths, errors


def output_paths(inputs, output):
    """One output file per input: ``output`` itself for one input with an image suffix, else
    ``output/<input name>`` (``name-1``, ``name-2`` ... if two inputs share a name)."""
    if len(inputs) == 1 and Path(output).suffix.lower() in IMAGE_EXTENSIONS + (".mp4",):
        return [Path(output)]
    out, seen = [], {}
    for path in inputs:
        name = Path(path).name
        if name in seen:
            seen[name] += 1
            name = f"{Path(name).stem}-{seen[name]}{Path(name).suffix}"
        else:
            seen[name] = 0
        out.append(Path(output) / name)
    return out


def detections_to_json(instances, names):
    """Instances (CPU, original image coordinates) -> list of JSON-ready detections."""
    dets = []
    boxes = instances.pred_boxes.tensor.tolist()
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cls = int(instances.pred_classes[i])
        det = {
            "category_id": cls,
            "category_name": names[cls],
            "score": round(float(instances.scores[i]), 5),
            "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        }
        if masks is not None:
            rle = mask_util.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        dets.append(det)
    return dets


def draw(predictor, bgr, instances):
    """BGR image with the detections drawn by detectron2's Visualizer (small images upscaled)."""
    scale = max(1.0, 256.0 / min(bgr.shape[:2]))
    vis = Visualizer(
        bgr[:, :, ::-1], predictor.metadata, scale=scale, instance_mode=ColorMode.IMAGE
    )
    return vis.draw_instance_predictions(instances).get_image()[:, :, ::-1]


def run_images(predictor, paths, outputs, threshold):
    records, errors = [], []
    for path, out in zip(tqdm.tqdm(paths, disable=len(paths) < 2, desc="images"), outputs):
        image = cv2.imread(path, cv2.IMREAD_COLOR) if os.path.isfile(path) else None
        if image is None:
            why = "file not found" if not os.path.exists(path) else "cannot read image (corrupt?)"
            errors.append((path, why))
            logger.error("%s: %s", path, why)
            continue
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        h, w = image.shape[:2]
        records.append(
            {
                "file_name": path,
                "height": h,
                "width": w,
                "detections": detections_to_json(instances, predictor.metadata.thing_classes),
            }
        )
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(out), draw(predictor, image, instances)):
                errors.append((path, f"cannot write {out}"))
                continue
        logger.info("%s: %d detections", path, len(instances))
    return records, errors


def run_video(predictor, path, out, threshold):
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        return [], [(path, "cannot open video")]
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer, records = None, []
    with tqdm.tqdm(total=frames, desc="frames") as bar:
        while True:
            ok, frame = video.read()
            if not ok:
                break
            instances = predictor(frame)["instances"].to("cpu")
            instances = instances[instances.scores >= threshold]
            drawn = draw(predictor, frame, instances)
            if out is not None:
                if writer is None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                    writer = cv2.VideoWriter(str(out), fourcc, fps, drawn.shape[1::-1])
                writer.write(drawn)
            records.append(
                {
                    "file_name": path,
                    "frame": len(records),
                    "height": frame.shape[0],
                    "width": frame.shape[1],
                    "detections": detections_to_json(instances, predictor.metadata.thing_classes),
                }
            )
            bar.update()
    video.release()
    if writer is not None:
        writer.release()
    if not records:
        return [], [(path, "no frame could be read")]
    return records, []


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="vild_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    if args.json and not args.output:
        print("error: --json needs --output", file=sys.stderr)
        return 2
    try:
        spec = vocabulary_from_cli(args.vocabulary, args.custom_vocabulary)
        opts = list(args.opts) + [
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            str(args.confidence_threshold),
        ]
        cfg = load_config(args.config_file, opts)
        predictor = ViLDPredictor(cfg)
        if spec is not None:
            predictor.set_vocabulary(spec)
    except (ValueError, FileNotFoundError, KeyError, AssertionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vocab = predictor.vocabulary
    logger.info("Vocabulary: %d classes %s", len(vocab), vocab.names[:8])

    if args.video_input:
        out = None
        if args.output:
            out = output_paths([args.video_input], args.output)[0].with_suffix(".mp4")
        records, errors = run_video(predictor, args.video_input, out, args.confidence_threshold)
    else:
        paths, errors = expand_inputs(args.input)
        for item, why in errors:
            logger.error("%s: %s", item, why)
        if not paths:
            why = "; ".join(f"{i}: {w}" for i, w in errors)
            print(f"error: no images to process: {why}", file=sys.stderr)
            return 2
        outs = output_paths(paths, args.output) if args.output else [None] * len(paths)
        records, more = run_images(predictor, paths, outs, args.confidence_threshold)
        errors += more

    if args.json:
        json_path = Path(args.output)
        json_path = (json_path.parent if json_path.suffix else json_path) / "detections.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        content = {
            "vocabulary": list(predictor.vocabulary.names),
            "bbox_mode": "XYWH_ABS",
            "segmentation": "COCO RLE (pycocotools), original image size",
            "images": records,
            "errors": [{"input": i, "error": w} for i, w in errors],
        }
        json_path.write_text(json.dumps(content))
        logger.info("Wrote %s", json_path)
    for item, why in errors:
        print(f"FAILED {item}: {why}", file=sys.stderr)
    print(f"{len(records)} processed, {len(errors)} failed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
