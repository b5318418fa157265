"""Detect any vocabulary with an exported ViLD model, without PyTorch: JSON in the layout of
``tools/demo.py --json``.

    python -m vild_d2_runtime --model exported/model.onnx --names "red star, blue cross" \\
        --input photo.jpg photos/ --output detections.json --confidence-threshold 0.3

Exit status: 0 = every input processed; 1 = some inputs failed (each is listed under "errors");
2 = nothing done (bad arguments, model files or names).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import cv2

from .detector import Detector, detections_to_json, json_header
from .prompts import parse_names

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def get_parser():
    p = argparse.ArgumentParser(
        prog="python -m vild_d2_runtime", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="model.onnx (exported with --vocabulary-input)")
    p.add_argument("--text-encoder", default="", help="default: text_encoder.onnx beside --model")
    p.add_argument("--names", required=True, help='class names, comma-separated: "cat,dog"')
    p.add_argument("--novel", default="", help="novel names (default: those outside training)")
    p.add_argument("--input", nargs="+", required=True, help="image files or folders")
    p.add_argument("--output", default="", help="JSON file (default: standard output)")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--cache-dir", default="", help="cache name embeddings on disk here")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = default)")
    return p


def _images(inputs):
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(str(p) for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        else:
            yield item


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        names = parse_names(args.names)
        novel = parse_names(args.novel) if args.novel else None
        detector = Detector(
            args.model,
            args.text_encoder or None,
            cache_dir=args.cache_dir or None,
            threads=args.threads,
        )
        detector.vocabulary(names, novel)  # encodes (or finds) the names once, up front
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records, errors = [], []
    for path in _images(args.input):
        image = cv2.imread(path, cv2.IMREAD_COLOR) if os.path.isfile(path) else None
        if image is None:
            why = "file not found" if not os.path.exists(path) else "cannot read image (corrupt?)"
            errors.append({"input": path, "error": why})
            print(f"FAILED {path}: {why}", file=sys.stderr)
            continue
        try:
            dets = detector(image, names, novel)
        except ValueError as e:
            errors.append({"input": path, "error": str(e)})
            print(f"FAILED {path}: {e}", file=sys.stderr)
            continue
        keep = dets["scores"] >= args.confidence_threshold
        dets = {k: v[keep] for k, v in dets.items()}
        h, w = image.shape[:2]
        records.append(
            {
                "file_name": path,
                "height": h,
                "width": w,
                "detections": detections_to_json(dets, names),
            }
        )
    text = json.dumps(dict(json_header(names), images=records, errors=errors))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)  # never a half-written file
    else:
        print(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
