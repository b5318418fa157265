"""Detect any vocabulary with an exported ViLD model, without PyTorch: JSON in the layout of
``tools/demo.py --json``.

    python -m vild_d2_runtime --model exported/model.onnx --names "red star, blue cross" \\
        --input photo.jpg photos/ --output detections.json --confidence-threshold 0.3

Exit status: 0 = every input processed; 1 = some inputs failed (each is listed under "errors");
2 = nothing done (bad arguments, model files or names, an --output that is a folder: one line).

Images are read as the API wants them (``Detector`` takes BGR uint8 arrays and says how to
convert others): grayscale as 3 equal channels, 16-bit as value // 257; under 8 px on a side,
refused (as the API refuses them).

Memory: an image over --max-megapixels (default 100, as tools/demo.py) is refused, from its
header for PNG, JPEG, BMP, TIFF and WebP (before decoding); masks are pasted one at a time,
only for detections over the threshold.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from .contract import detections_to_json, json_header, parse_names
from .detector import Detector
from .image import image_size

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
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="in [0, 1]")
    # Refused from the image file's header where the format allows (see the module's docstring).
    p.add_argument("--max-megapixels", type=float, default=100.0, help="larger images refused")
    p.add_argument("--cache-dir", default="", help="cache name embeddings on disk here")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = default)")
    return p


def check_arguments(args) -> None:
    """ValueError naming the option, its value and the range, for a value out of range (NaN
    included), and for an --output that is a folder or lies under a file: before any work."""
    ranges = [
        ("--confidence-threshold", args.confidence_threshold, 0.0, 1.0),
        ("--max-megapixels", args.max_megapixels, 1e-6, math.inf),
        ("--threads", args.threads, 0, 1024),
    ]
    for key, value, low, high in ranges:
        if not (low <= value <= high):  # NaN fails every comparison
            shown = f"in [{low:g}, {high:g}]" if high != math.inf else "above 0"
            raise ValueError(f"{key} {value:g}: must be {shown}")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise ValueError(
                f"--output {out} is a folder: give a file name (e.g. {out / 'detections.json'})"
            )
        for parent in out.parents:
            if parent.exists() and not parent.is_dir():
                raise ValueError(f"--output {out}: {parent} is a file, not a folder")


def read_image(path: str, max_megapixels: float):
    """BGR uint8, or raise ValueError with the reason (one line). Grayscale files give 3 equal
    channels (OpenCV's conversion, ``cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)``), 16-bit ones
    value // 257: what :func:`.contract.check_image` tells an API user to do."""
    if not os.path.exists(path):
        raise ValueError("file not found")
    if not os.path.isfile(path):
        raise ValueError("not a file")
    size = image_size(path)  # from the header: before a byte of pixels is decoded
    if size is not None:
        _check_megapixels(*size, max_megapixels)
    image = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)  # EXIF rotation applied
    if image is not None and image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)  # 65535 -> 255 (IMREAD_COLOR alone: v >> 8)
    elif image is not None and image.dtype != np.uint8:  # float TIFF and such: OpenCV's 8 bits
        image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("cannot read image (corrupt?)")
    _check_megapixels(image.shape[1], image.shape[0], max_megapixels)  # other formats
    return image


def _check_megapixels(w: int, h: int, limit: float) -> None:
    if w * h > limit * 1e6:
        raise ValueError(
            f"{w}x{h} px ({w * h / 1e6:.1f} megapixels), above --max-megapixels {limit:g}: "
            "downscale it (the model sees it at about 1 megapixel anyway), or raise "
            "--max-megapixels if the memory allows"
        )


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
        check_arguments(args)
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
    mask_threshold = detector.meta["mask_threshold"]
    for path in _images(args.input):
        try:
            image = read_image(path, args.max_megapixels)
            h, w = image.shape[:2]
            # Over the threshold only, and masks pasted one at a time while encoding.
            dets = detector(
                image, names, novel, score_threshold=args.confidence_threshold, paste_masks=False
            )
            del image
            found = detections_to_json(dets, names, (h, w), mask_threshold)
        except (ValueError, MemoryError) as e:
            why = str(e) if not isinstance(e, MemoryError) else "out of memory"
            errors.append({"input": path, "error": why})
            print(f"FAILED {path}: {why}", file=sys.stderr)
            continue
        records.append({"file_name": path, "height": h, "width": w, "detections": found})
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
