#!/usr/bin/env python
"""Detect any vocabulary with a trained ViLD model: pictures (and JSON) for images or a video.

    python tools/demo.py --config-file configs/Shapes/vild_ensemble.yaml \\
        --input photo.jpg dir/ "*.png" --vocabulary custom \\
        --custom-vocabulary "red star,blue cross" --output out/ --json \\
        MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu

Config overrides: trailing KEY VALUE pairs, as in every tool (tools/cli/args.py); --input's
list ends at the first config key (MODEL.WEIGHTS).

Outputs never replace an input, each other, or any file this run did not create. An --output
that would replace an input (the folder that holds an input, or the input file itself) is
refused before anything is done, as is one where a file this run would write exists already
(a picture, detections.json / .jsonl): --overwrite replaces those (never an input; written
atomically, so a hard link to a replaced file keeps its content). Inputs that share a file
name get <name>-1, <name>-2, ... (the first name that is neither another output nor an input);
the JSON records which picture belongs to which input.

Pictures: small images are drawn larger (shorter side 256 px); none is drawn larger than
2000 px on its longer side (a bigger image is shrunk, with its detections, before drawing:
this bounds the memory). The JSON keeps original image coordinates and full-size masks.

Memory: an image over --max-megapixels (default 100) is refused from its header, before any
pixel is decoded; masks are kept at the mask head's 28 x 28 and pasted one at a time (to
encode, to draw), so the memory does not grow with image size x detections.

Bad input: an input that cannot be read or processed (missing, a folder, empty, a link loop,
corrupt, too large, too elongated for the model's resize, a picture that cannot be written:
a full disk ...) is reported as "FAILED <input>: <why>" and listed under "errors"; the other
inputs are still processed.

--json: <output>/detections.json for a folder (whatever its name), <output stem>.json beside a
single output file (--output a/pic.png -> a/pic.json). While running, the .jsonl of that name
gets one line per input as soon as it is done (line 1: the vocabulary; then an image record,
or {"input", "error"} for a failure), so a crash or kill loses at most the input in progress.
At the end it is replaced by the .json (written atomically). Old results there are an
existing file like any other: refused unless --overwrite; so is a second run writing into the
same folder at the same time (one line, exit 2). If the JSON cannot be written (a full disk)
that is a FAILED line too, and the exit status 1.

Ctrl-C: an input's picture and its record are written together (Ctrl-C waits the few
milliseconds that takes), so the pictures and the .jsonl always agree; the run stops, prints
its summary, leaves the .jsonl (no .json: the results are not whole) and exits 130.

Exit status: 0 = every input processed; 1 = some inputs failed (each is reported, the others
are still written); 2 = nothing done (bad arguments, vocabulary, config or weights, in one
line; no images found; an output that would replace an input or an existing file); 130 =
interrupted (Ctrl-C).
"""

import argparse
import json
import logging
import math
import os
import sys

import vild_d2  # noqa: F401  (first: compat bridges)
import cv2
import tqdm

from detectron2.utils.logger import setup_logger

from cli.args import add_config_arguments, parse_args, with_dataset_files
from cli.demo_files import (  # noqa: F401  (file_key, output_paths: the tests')
    IMAGE_EXTENSIONS,
    JSON_NAME,
    InputError,
    expand_inputs,
    file_key,
    interrupts_deferred,
    output_paths,
    plan_outputs,
    read_image,
    write_picture,
)
from cli.errors import STARTUP_ERRORS, startup_error_line
from cli.vocabulary import vocabulary_from_cli
from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.engine.detections import detections_to_json, draw_detections, json_header
from vild_d2.fileio import atomic_write

logger = logging.getLogger("vild_d2.demo")


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(p)  # --config-file, --dataset-file, KEY VALUE overrides (or --opts)
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
    p.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="detections scoring below it are dropped: a number in [0, 1] (default 0.5)",
    )
    p.add_argument(
        "--output",
        help="folder for the pictures (or a file name for one input); never an input's folder",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help=f"also write <output>/{JSON_NAME} (<output stem>.json for one output file)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in --output that this run did not create (never an input)",
    )
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=100.0,
        help="larger images are refused from their header, before decoding (default 100)",
    )
    return p


def check_ranges(args):
    """The first argument out of its range, as "--flag value: must be ..." (None: all fine);
    NaN is out of every range (it would compare False with every score or size)."""
    t, mp = args.confidence_threshold, args.max_megapixels
    if not (math.isfinite(t) and 0 <= t <= 1):
        return f"--confidence-threshold {t:g}: must be a number in [0, 1]"
    if not (math.isfinite(mp) and mp > 0):
        return f"--max-megapixels {mp:g}: must be a finite number > 0"
    return None


class Results:
    """
    The --json results. While running, one JSON line per input is appended (and flushed) to
    the ``.jsonl``, so a crash or kill loses at most the input in progress; :meth:`finish`
    writes the ``.json`` atomically and removes the ``.jsonl``. Without --json only the counts
    and errors are kept. A write that fails (a full disk) is an error of its own: the run goes
    on, and :meth:`finish` reports it.
    """

    def __init__(self, json_path, vocabulary, overwrite=False):
        self.json_path, self.overwrite = json_path, overwrite
        self.records, self.errors = [], []
        self.header = json_header(vocabulary)
        self._log, self._log_path = None, None
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_path = json_path.with_suffix(".jsonl")
            if overwrite:  # asked for: an old run's results must not pass for this run's
                for old in (json_path, self._log_path):
                    old.unlink(missing_ok=True)  # unlinked, not truncated: a hard link keeps it
            try:
                self._log = open(self._log_path, "x")  # "x": never a file this run did not create
            except FileExistsError:  # not there when the outputs were checked
                raise ValueError(
                    f"{self._log_path} appeared since this run started: another run is writing "
                    f"into {json_path.parent}; choose another --output (or pass --overwrite)"
                ) from None
            self._append(self.header)

    def _append(self, obj):
        if self._log is None:
            return
        try:
            self._log.write(json.dumps(obj) + "\n")
            self._log.flush()
        except OSError as e:  # a full disk: keep going, the summary says so
            logger.error("cannot write %s: %s", self._log_path, e.strerror or e)
            self.close()

    @property
    def log_path(self):
        """The .jsonl while running (None without --json)."""
        return self._log_path

    def add(self, record):
        self.records.append(record)
        self._append(record)

    def fail(self, item, why):
        self.errors.append((item, why))
        self._append({"input": item, "error": why})

    def finish(self):
        """Write the .json; a failure is added to :attr:`errors` (the run's exit status 1)."""
        if self.json_path is None:
            return
        content = dict(self.header, images=self.records)
        content["errors"] = [{"input": i, "error": w} for i, w in self.errors]
        self.close()
        try:
            written = atomic_write(
                self.json_path, [json.dumps(content).encode()], exclusive=not self.overwrite
            )
        except OSError as e:  # e.g. "No space left on device": the .jsonl keeps what it has
            self.errors.append((str(self.json_path), str(e)))
            return
        if not written:
            why = "appeared during the run: left as it is (--overwrite replaces it)"
            self.errors.append((str(self.json_path), why))
            return
        self._log_path.unlink(missing_ok=True)
        logger.info("Wrote %s", self.json_path)

    def close(self):
        if self._log is not None:
            try:
                self._log.close()
            except OSError:  # the last buffered line hit a full disk: already reported
                pass
            self._log = None


def describe(error):
    """The reason printed for a failed input."""
    if isinstance(error, InputError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:  # "No space left on device", ...
        return f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    if isinstance(error, MemoryError):
        return "out of memory (lower --max-megapixels, or downscale the image)"
    return f"{type(error).__name__}: {error}"


def draw(predictor, bgr, instances):
    """BGR picture of the detections (vild_d2.engine.detections.draw_detections: small images
    larger, none over 2000 px on its longer side)."""
    return draw_detections(bgr, instances, predictor.metadata)


def detect(predictor, image, threshold):
    """Detections above ``threshold`` on the CPU; masks kept small (pasted when used)."""
    instances = predictor(image, paste_masks=False)["instances"].to("cpu")
    return instances[instances.scores >= threshold]


def process_image(predictor, path, out, args):
    """Detect and draw one image: (its JSON record, its picture or None); nothing written yet.
    Raises on a bad input."""
    image = read_image(path, args.max_megapixels)
    instances = detect(predictor, image, args.confidence_threshold)
    h, w = image.shape[:2]
    record = {"file_name": path, "height": h, "width": w}
    picture = None
    if out is not None:
        picture = draw(predictor, image, instances)
        record["output"] = str(out)
    record["detections"] = detections_to_json(instances, predictor.metadata.thing_classes)
    logger.info("%s: %d detections", path, len(instances))
    return record, picture


def run_images(predictor, paths, outputs, args, results):
    for path, out in zip(tqdm.tqdm(paths, disable=len(paths) < 2, desc="images"), outputs):
        try:
            record, picture = process_image(predictor, path, out, args)
            with interrupts_deferred():  # the picture and its record: both or neither
                if picture is not None:
                    write_picture(out, picture, args.overwrite)
                results.add(record)
        except Exception as e:  # one bad input must not stop the batch: report it, go on
            why = describe(e)
            expected = (InputError, ValueError, OSError, MemoryError)
            unexpected = not isinstance(e, expected)  # a traceback helps then
            logger.error("%s: %s", path, why, exc_info=unexpected)
            results.fail(path, why)


def run_video(predictor, path, out, args, results):
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        results.fail(path, "cannot open video")
        return
    w, h = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if w * h > args.max_megapixels * 1e6:  # from the container's header, as for an image
        video.release()
        results.fail(
            path,
            f"frames of {w}x{h} px ({w * h / 1e6:.1f} megapixels), above --max-megapixels "
            f"{args.max_megapixels:g}",
        )
        return
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    # Written under a hidden name, renamed at the end: a file at ``out`` is never written into
    # (a hard link to it keeps its content), and a killed run leaves no half video there.
    part = None if out is None else out.with_name(f".{out.stem}.part{out.suffix}")
    writer, done, failed = None, 0, False
    try:
        with tqdm.tqdm(total=frames, desc="frames") as bar:
            while True:
                ok, frame = video.read()
                if not ok:
                    break
                instances = detect(predictor, frame, args.confidence_threshold)
                drawn = draw(predictor, frame, instances)
                names = predictor.metadata.thing_classes
                record = {
                    "file_name": path,
                    "frame": done,
                    "height": frame.shape[0],
                    "width": frame.shape[1],
                    "detections": detections_to_json(instances, names),
                }
                with interrupts_deferred():  # the frame and its record: both or neither
                    if out is not None:
                        if writer is None:
                            out.parent.mkdir(parents=True, exist_ok=True)
                            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                            writer = cv2.VideoWriter(str(part), fourcc, fps, drawn.shape[1::-1])
                        writer.write(drawn)
                    results.add(record)
                    done += 1
                bar.update()
    except Exception as e:  # the frames done so far are kept (picture and JSON)
        logger.error("%s: frame %d: %s", path, done, describe(e), exc_info=True)
        results.fail(path, f"frame {done}: {describe(e)}")
        failed = True
    finally:
        video.release()
        if writer is not None:
            writer.release()
            _publish(part, out, args.overwrite, path, results)
    if done == 0 and not failed:
        results.fail(path, "no frame could be read")


def _publish(part, out, overwrite, path, results):
    """Move the finished video from its hidden name to ``out`` (replacing only if asked)."""
    try:
        if overwrite:
            os.replace(part, out)
        else:
            os.link(part, out)  # fails if ``out`` appeared meanwhile: it is left alone
            os.unlink(part)
    except OSError as e:
        results.fail(path, f"cannot write {out}: {e.strerror or e}")
        part.unlink(missing_ok=True)


def main(argv=None):
    args = parse_args(get_parser(), argv)
    setup_logger(name="vild_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    if args.json and not args.output:
        print("error: --json needs --output", file=sys.stderr)
        return 2
    bad_range = check_ranges(args)
    if bad_range:
        print(f"error: {bad_range}", file=sys.stderr)
        return 2

    # Inputs and outputs first: an output that would replace an input, or a file this run did
    # not create, stops everything before the model is even loaded.
    if args.video_input:
        paths, errors = [args.video_input], []
    else:
        paths, errors = expand_inputs(args.input)
        for item, why in errors:
            logger.error("%s: %s", item, why)
        if not paths:
            why = "; ".join(f"{i}: {w}" for i, w in errors)
            print(f"error: no images to process: {why}", file=sys.stderr)
            return 2
    try:
        outs, json_path = plan_outputs(
            paths, args.output, bool(args.video_input), args.json, args.overwrite
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        spec = vocabulary_from_cli(args.vocabulary, args.custom_vocabulary)
        opts = [*args.opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.confidence_threshold)]
        opts = with_dataset_files(args.config_file, opts, args.dataset_file)
        cfg = load_config(args.config_file, opts)
        predictor = ViLDPredictor(cfg)
        if spec is not None:
            predictor.set_vocabulary(spec)
    except STARTUP_ERRORS as e:  # config, weights, vocabulary: one line, no traceback
        print(startup_error_line(e, args.config_file), file=sys.stderr)
        return 2
    vocab = predictor.vocabulary
    logger.info("Vocabulary: %d classes %s", len(vocab), vocab.names[:8])

    try:
        results = Results(json_path, predictor.vocabulary.names, args.overwrite)
    except (ValueError, OSError) as e:  # e.g. another run writing into the same folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    interrupted = False
    try:
        for item, why in errors:
            results.fail(item, why)
        if args.video_input:
            run_video(predictor, args.video_input, outs[0], args, results)
        else:
            run_images(predictor, paths, outs, args, results)
        results.finish()
    except KeyboardInterrupt:  # Ctrl-C: what is done is whole (pictures = records); say so
        interrupted = True
    finally:
        results.close()  # interrupted: the .jsonl keeps what was done
    for item, why in results.errors:
        print(f"FAILED {item}: {why}", file=sys.stderr)
    summary = f"{len(results.records)} processed, {len(results.errors)} failed"
    if interrupted:
        kept = f"; {results.log_path} holds them" if results.log_path else ""
        if args.video_input:
            print(f"{summary} (frames); interrupted (Ctrl-C){kept}")
        else:
            left = len(paths) - len(results.records) - (len(results.errors) - len(errors))
            print(f"{summary}; interrupted (Ctrl-C): {left} input(s) not processed{kept}")
        return 130
    print(summary)
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
