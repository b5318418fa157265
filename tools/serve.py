#!/usr/bin/env python
"""A web page and an HTTP JSON API to try a trained ViLD model: type a vocabulary, drop an image.

    python tools/serve.py --config-file configs/Shapes/vild_ensemble.yaml \\
        MODEL.WEIGHTS output/shapes/vild_ensemble/model_final.pth
    # page: http://127.0.0.1:7860/   API: POST http://127.0.0.1:7860/api/detect
    curl -F image=@photo.png -F vocabulary="red star,blue cross" -F threshold=0.4 \\
        http://127.0.0.1:7860/api/detect

The API answers the JSON layout of tools/demo.py --json; a bad request gets a 4xx answer
{"error": "..."} and the server goes on. See docs/SERVING.md.
"""

import argparse
import logging
import math
import sys

import vild_d2  # noqa: F401  (first: compat bridges)
from detectron2.utils.logger import setup_logger

from cli.args import add_config_arguments, parse_args, with_dataset_files
from cli.errors import STARTUP_ERRORS, startup_error_line
from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.serve import DetectionService, Limits, build_app, serve


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(p)  # --config-file, --dataset-file, KEY VALUE overrides (or --opts)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--threshold", type=float, default=0.5, help="the page's default threshold")
    p.add_argument(
        "--score-floor",
        type=float,
        default=0.05,
        help="MODEL.ROI_HEADS.SCORE_THRESH_TEST: no detection below it is computed (at 0 with "
        "a large vocabulary, post-processing dominates on a CPU); an override of it wins",
    )
    p.add_argument("--max-names", type=int, default=Limits.max_names, help="typed class names")
    p.add_argument("--max-megapixels", type=float, default=Limits.max_megapixels)
    p.add_argument(
        "--max-request-megapixels",
        type=float,
        default=Limits.max_request_megapixels,
        help="all images of one request together (bounds the server's memory)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=Limits.max_upload_mb,
        help="per file; the upload is refused at the limit, not after",
    )
    p.add_argument(
        "--slow-timeout",
        type=float,
        default=Limits.slow_timeout_s,
        help="seconds for a request's headers, and for its body plus 1 s per 16 KB: slower "
        "clients are cut off",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=Limits.keep_alive_s,
        help="seconds an idle connection is kept open (uvicorn's timeout_keep_alive)",
    )
    p.add_argument("--no-page", action="store_true", help="the API only (no Gradio)")
    return p


def check_ranges(args) -> None:
    """ValueError naming the option, its value and its range; NaN is in no range."""
    unit = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    positive = (lambda v: 0.0 < v < math.inf, "above 0 and finite")
    checks = {
        "--threshold": (args.threshold, *unit),
        "--score-floor": (args.score_floor, *unit),
        "--port": (args.port, lambda v: 0 <= v <= 65535, "in [0, 65535]"),
        "--max-names": (args.max_names, lambda v: v >= 1, "at least 1"),
        "--max-megapixels": (args.max_megapixels, *positive),
        "--max-request-megapixels": (args.max_request_megapixels, *positive),
        "--max-upload-mb": (args.max_upload_mb, *positive),
        "--slow-timeout": (args.slow_timeout, *positive),
        "--timeout-keep-alive": (args.timeout_keep_alive, *positive),
    }
    for key, (value, ok, allowed) in checks.items():
        if not ok(value):  # NaN fails every comparison
            raise ValueError(f"{key} {value:g}: must be {allowed}")


def main(argv=None):
    args = parse_args(get_parser(), argv)
    try:
        check_ranges(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logger(name="vild_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    # Every request may switch the vocabulary: one INFO line per switch is noise here.
    logging.getLogger("vild_d2.modeling.meta_arch").setLevel(logging.WARNING)
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.score_floor), *args.opts]
    try:
        opts = with_dataset_files(args.config_file, opts, args.dataset_file)
        predictor = ViLDPredictor(load_config(args.config_file, opts))
    except STARTUP_ERRORS as e:  # config (YAML, values), weights: one line, no traceback
        print(startup_error_line(e, args.config_file), file=sys.stderr)
        return 2
    limits = Limits(
        max_names=args.max_names,
        max_megapixels=args.max_megapixels,
        max_request_megapixels=args.max_request_megapixels,
        max_upload_mb=args.max_upload_mb,
        slow_timeout_s=args.slow_timeout,
        keep_alive_s=args.timeout_keep_alive,
    )
    service = DetectionService(
        predictor, limits=limits, threshold=args.threshold, title=args.config_file
    )
    serve(build_app(service, page=not args.no_page), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
