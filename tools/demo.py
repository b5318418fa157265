#!/usr/bin/env python
"""Detect any vocabulary with a trained ViLD model: pictures (and JSON) for images or a video.

    python tools/demo.py --config-file configs/Shapes/vild_ensemble.yaml \\
        --input photo.jpg dir/ "*.png" --vocabulary custom \\
        --custom-vocabulary "red star,blue cross" --output out/ --json \\
        --opts MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu

Outputs never replace an input or each other. An --output that would replace an input (the
folder that holds an input, or the input file itself) is refused before anything is done.
Inputs that share a file name get <name>-1, <name>-2, ... (the first name that is neither
another output nor an input); the JSON records which picture belongs to which input.

Pictures: small images are drawn larger (shorter side 256 px); none is drawn larger than
2000 px on its longer side (a bigger image is shrunk, with its detections, before drawing:
this bounds the memory). The JSON keeps original image coordinates and full-size masks.

Bad input: an input that cannot be read or processed (missing, corrupt, too elongated for
the model's resize, ...) is reported as "FAILED <input>: <why>" and listed under "errors";
the other inputs are still processed.

--json: while running, <output>/detections.jsonl gets one line per input as soon as it is
done (line 1: the vocabulary; then an image record, or {"input", "error"} for a failure), so
a crash or kill loses at most the input in progress. At the end it is replaced by
<output>/detections.json (written atomically). A run starts by removing the folder's old
detections.json / detections.jsonl.

Exit status: 0 = every input processed; 1 = some inputs failed (each is reported, the others
are still written); 2 = nothing done (bad arguments, vocabulary or config; no images found;
an output that would replace an input).
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
import tqdm

from detectron2.utils.logger import setup_logger

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.engine.detections import detections_to_json, draw_detections, json_header
from vild_d2.engine.predictor import vocabulary_from_cli
from vild_d2.fileio import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
JSON_NAME, LOG_NAME = "detections.json", "detections.jsonl"
logger = logging.getLogger("vild_d2.demo")


class InputError(Exception):
    """A bad input (unreadable, unwritable picture): reported, the batch goes on."""


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    p.add_argument(
        "--output",
        help="folder for the pictures (or a file name for one input); never an input's folder",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help=f"also write <output>/{JSON_NAME} (<output>/{LOG_NAME} while running)",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs")
    return p


def expand_inputs(items):
    """Image paths from files, folders and glob patterns; errors for empty folders/patterns."""
    paths, errors = [], []
    for item in items:
        if os.path.isdir(item):
            try:
                found = sorted(
                    str(p) for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                )
            except OSError as e:  # e.g. no permission: this item fails, the others go on
                errors.append((item, f"cannot list this folder: {e.strerror}"))
                continue
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


def file_key(path):
    """What identifies a file: (device, inode) if it exists (so a symlink or hard link to it
    is the same file), else its absolute path; links and '..' resolved first ("new/../x.png"
    is x.png once "new/" is made)."""
    path = os.path.realpath(path)
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return path


def output_paths(inputs, output, suffix=None, reserved=()):
    """
    One output file per input, never an input nor another input's output: ``output`` itself
    for one input and an ``output`` with a picture/video suffix, else ``output/<input name>``.
    Inputs sharing a name: the first keeps it, the others take ``name-1``, ``name-2``, ... the
    first that is not taken by another output, not in ``reserved`` and not an input (a link to
    one); inputs are taken in order, so the names are the same on every run.

    Args:
        suffix: replaces the inputs' suffix (".mp4" for a video).
        reserved: names the outputs may not take in the folder (the JSON files).
    Raises:
        ValueError: an output would replace an input (``output`` is that input, or its folder),
            or ``output`` is a file where a folder is needed.
    """
    inputs_by_key = {}
    for path in inputs:
        inputs_by_key.setdefault(file_key(path), path)

    def refuse(inp):
        raise ValueError(
            f"--output {output} would replace the input {inp} with its picture; choose another "
            f"--output (a folder that holds no input, or another file name)"
        )

    single = Path(output)
    if len(inputs) == 1 and single.suffix.lower() in IMAGE_EXTENSIONS + (".mp4",):
        single = single.with_suffix(suffix) if suffix else single
        if file_key(single) in inputs_by_key:
            refuse(inputs[0])
        return [single]
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {output} is a file: give a folder for {len(inputs)} inputs")

    names = [Path(p).stem + suffix if suffix else Path(p).name for p in inputs]
    # Compared case-folded: on a case-insensitive filesystem X.png and x.png are one file.
    taken = {n.casefold() for n in reserved}
    picks = [None] * len(inputs)
    for i, (inp, name) in enumerate(zip(inputs, names)):  # each name's first input keeps it
        key = file_key(folder / name)
        if key == file_key(inp):
            refuse(inp)  # the input is in the output folder: its picture would replace it
        if name.casefold() not in taken and key not in inputs_by_key:
            taken.add(name.casefold())
            picks[i] = folder / name
    for i, name in enumerate(names):  # the others: the first free name-k
        k, stem, ext = 1, Path(name).stem, Path(name).suffix
        while picks[i] is None:
            candidate = f"{stem}-{k}{ext}"
            free = candidate.casefold() not in taken
            if free and file_key(folder / candidate) not in inputs_by_key:
                taken.add(candidate.casefold())
                picks[i] = folder / candidate
            k += 1
    return picks


class Results:
    """
    The --json results. While running, one JSON line per input is appended (and flushed) to
    ``detections.jsonl``, so a crash or kill loses at most the input in progress;
    :meth:`finish` writes ``detections.json`` atomically and removes the ``.jsonl``.
    Without --json only the counts and errors are kept.
    """

    def __init__(self, json_path, vocabulary):
        self.json_path = json_path
        self.records, self.errors = [], []
        self.header = json_header(vocabulary)
        self._log = None
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            # An old run's results left here would pass for this run's if this one is killed.
            json_path.unlink(missing_ok=True)
            self._log = open(json_path.with_name(LOG_NAME), "w")
            self._append(self.header)

    def _append(self, obj):
        if self._log is not None:
            self._log.write(json.dumps(obj) + "\n")
            self._log.flush()

    def add(self, record):
        self.records.append(record)
        self._append(record)

    def fail(self, item, why):
        self.errors.append((item, why))
        self._append({"input": item, "error": why})

    def finish(self):
        if self._log is None:
            return
        content = dict(self.header, images=self.records)
        content["errors"] = [{"input": i, "error": w} for i, w in self.errors]
        atomic_write(self.json_path, [json.dumps(content).encode()])
        self.close()
        os.remove(self.json_path.with_name(LOG_NAME))
        logger.info("Wrote %s", self.json_path)

    def close(self):
        if self._log is not None:
            self._log.close()
            self._log = None


def describe(error):
    """The reason printed for a failed input."""
    if isinstance(error, InputError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def draw(predictor, bgr, instances):
    """BGR picture of the detections (vild_d2.engine.detections.draw_detections: small images
    larger, none over 2000 px on its longer side)."""
    return draw_detections(bgr, instances, predictor.metadata)


def process_image(predictor, path, out, threshold):
    """Detect, draw and write one image; returns its JSON record. Raises on a bad input."""
    image = cv2.imread(path, cv2.IMREAD_COLOR) if os.path.isfile(path) else None
    if image is None:
        raise InputError(
            "file not found" if not os.path.exists(path) else "cannot read image (corrupt?)"
        )
    instances = predictor(image)["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    h, w = image.shape[:2]
    record = {"file_name": path, "height": h, "width": w}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out), draw(predictor, image, instances)):
            raise InputError(f"cannot write {out}")
        record["output"] = str(out)
    record["detections"] = detections_to_json(instances, predictor.metadata.thing_classes)
    logger.info("%s: %d detections", path, len(instances))
    return record


def run_images(predictor, paths, outputs, threshold, results):
    for path, out in zip(tqdm.tqdm(paths, disable=len(paths) < 2, desc="images"), outputs):
        try:
            record = process_image(predictor, path, out, threshold)
        except Exception as e:  # one bad input must not stop the batch: report it, go on
            why = describe(e)
            unexpected = not isinstance(e, (InputError, ValueError))  # a traceback helps then
            logger.error("%s: %s", path, why, exc_info=unexpected)
            results.fail(path, why)
            continue
        results.add(record)


def run_video(predictor, path, out, threshold, results):
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        results.fail(path, "cannot open video")
        return
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer, done, failed = None, 0, False
    try:
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
                names = predictor.metadata.thing_classes
                results.add(
                    {
                        "file_name": path,
                        "frame": done,
                        "height": frame.shape[0],
                        "width": frame.shape[1],
                        "detections": detections_to_json(instances, names),
                    }
                )
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
    if done == 0 and not failed:
        results.fail(path, "no frame could be read")


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="vild_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    if args.json and not args.output:
        print("error: --json needs --output", file=sys.stderr)
        return 2

    # Inputs and outputs first: an output that would replace an input stops everything before
    # the model is even loaded.
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
    outs, json_path = [None] * len(paths), None
    try:
        if args.output:
            suffix = ".mp4" if args.video_input else None
            outs = output_paths(paths, args.output, suffix, reserved=(JSON_NAME, LOG_NAME))
        if args.json:
            json_path = Path(args.output)
            json_path = (json_path.parent if json_path.suffix else json_path) / JSON_NAME
            inputs = {file_key(p): p for p in paths}
            for path in (json_path, json_path.with_name(LOG_NAME)):
                if file_key(path) in inputs:
                    raise ValueError(
                        f"--json would replace the input {inputs[file_key(path)]} with {path}; "
                        "choose another --output"
                    )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
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

    results = Results(json_path, predictor.vocabulary.names)
    try:
        for item, why in errors:
            results.fail(item, why)
        if args.video_input:
            run_video(predictor, args.video_input, outs[0], args.confidence_threshold, results)
        else:
            run_images(predictor, paths, outs, args.confidence_threshold, results)
        results.finish()
    finally:
        results.close()  # interrupted: detections.jsonl keeps what was done
    for item, why in results.errors:
        print(f"FAILED {item}: {why}", file=sys.stderr)
    print(f"{len(results.records)} processed, {len(results.errors)} failed")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
