#!/usr/bin/env python
"""Export a trained ViLD model (TorchScript or ONNX), a vocabulary baked in or as an input.

    python tools/export_model.py --config-file configs/Shapes/vild_ensemble.yaml \\
        --vocabulary coco --format torchscript --output exported/ \\
        MODEL.WEIGHTS model_final.pth
    python tools/export_model.py --config-file configs/Shapes/vild_ensemble.yaml \\
        --vocabulary-input --format onnx --output exported/ MODEL.WEIGHTS model_final.pth

--vocabulary-input: the graph's inputs are image, class_embeddings (K, D) float32 (unit CLIP
text embeddings, K free) and, for ViLD-ensemble, novel_mask (K,) bool; pred_classes index the K
rows. It also writes text_encoder.onnx (CLIP's text tower: token_ids (N, 77) int64 -> (N, D))
and CLIP's BPE merges beside it, for vild_d2_runtime (no PyTorch; docs/DEPLOY.md). The check
below then runs with the --vocabulary (default: the checkpoint's) fed as inputs, and the text
encoder is checked against the model's own on a few names.

Writes ``model.ts`` (or ``model.onnx``) and ``vocabulary.json`` (the class names, in the order of
``pred_classes``), traced on ``--sample-image`` (default: scikit-image's astronaut photo), then
runs the exported model on that image and prints its largest difference from the eager model
(exit status 1 if they differ beyond float rounding: other detections, classes, or boxes/scores
off by more than BOX_TOLERANCE_PX / SCORE_TOLERANCE).
Files already in --output are refused (exit 2, before any work) unless --overwrite; the files
are written in a hidden folder inside --output and each moved in whole.
Outputs: pred_boxes (N, 4) XYXY, pred_classes (N,), pred_masks (N, 1, 28, 28) probabilities,
scores (N,), image_size (2,), in the RESIZED image's coordinates (detector_postprocess not
applied; see vild_d2.export.outputs_to_instances). Input: one (3, H, W) image, already resized
(INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) and in INPUT.FORMAT order.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import vild_d2  # noqa: F401  (first: compat bridges)
import numpy as np
import torch

from cli.args import add_config_arguments, parse_args, with_dataset_files
from cli.demo_files import InputError, read_image
from cli.errors import STARTUP_ERRORS, startup_error_line
from cli.vocabulary import vocabulary_from_cli
from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.export import (
    deploy_metadata,
    export_onnx,
    export_text_encoder_onnx,
    export_torchscript,
    outputs_to_instances,
)


# The largest differences from the eager model the check accepts (float rounding of another
# runtime; measured: up to ~1e-4 px and ~5e-6 for ONNX Runtime on CPU).
BOX_TOLERANCE_PX = 1e-2
SCORE_TOLERANCE = 1e-4
TEXT_COSINE = 0.99999  # exported text tower + numpy prompt ensemble vs the model's vocabulary
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's BPE merges, copied beside text_encoder.onnx


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(p)  # --config-file, --dataset-file, KEY VALUE overrides (or --opts)
    p.add_argument("--vocabulary", default="", help="as tools/demo.py (default: the checkpoint's)")
    p.add_argument("--custom-vocabulary", default="", help='comma-separated names: "cat,dog"')
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--sample-image", default="", help="image to trace on (BGR file)")
    p.add_argument(
        "--vocabulary-input",
        action="store_true",
        help="the vocabulary as graph inputs (one file for every vocabulary) + text_encoder.onnx",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files already in --output")
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=100.0,
        help="a larger --sample-image is refused from its header, before decoding (default 100)",
    )
    return p


def _sample_image(path, max_megapixels):
    if path:
        try:  # the demo's reader: the size from the header first, then one line per problem
            return read_image(path, max_megapixels)
        except InputError as e:
            raise ValueError(f"--sample-image {path}: {e}") from None
    from vild_d2.data.images import sample_photo

    return np.ascontiguousarray(sample_photo("astronaut")[:, :, ::-1])  # RGB -> BGR


def _output_files(args):
    """The names this run writes into --output."""
    names = ["model.ts" if args.format == "torchscript" else "model.onnx"]
    if args.vocabulary_input:
        return names + ["text_encoder.onnx", BPE_NAME]
    return names + ["vocabulary.json"]


def _check_output(args) -> Path:
    """--output as a folder in which nothing would be replaced without --overwrite; checked
    before any work."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; it must be a folder (made if missing)")
    existing = [name for name in _output_files(args) if (out / name).exists()]
    if existing and not args.overwrite:
        raise ValueError(
            f"--output {out} already has {', '.join(existing)}: choose another folder, or pass "
            "--overwrite to replace them"
        )
    return out


def _publish(stage: Path, out: Path, overwrite: bool) -> None:
    """Move every file written in ``stage`` into ``out`` (each whole, by rename); without
    ``overwrite`` a file that appeared in ``out`` meanwhile is left as it is (an error)."""
    for f in sorted(stage.iterdir()):
        dest = out / f.name
        if overwrite:
            os.replace(f, dest)
            continue
        try:
            os.link(f, dest)  # fails if dest exists
        except FileExistsError:
            raise ValueError(f"{dest} appeared during the export: left as it is") from None
        except OSError:  # a filesystem without hard links
            if dest.exists():
                raise ValueError(f"{dest} appeared during the export: left as it is") from None
            os.replace(f, dest)


def _run_exported(fmt, path, image, vocabulary=()):
    """The exported file on ``image``; ``vocabulary``: (class_embeddings[, novel_mask]) inputs
    of a vocabulary-input export. None when onnxruntime is missing."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path))(image, *vocabulary)
    try:
        import onnxruntime
        from vild_d2_runtime import run_detector
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return run_detector(session, *(t.cpu().numpy() for t in (image, *vocabulary)))


def _export_text_side(predictor, out):
    """text_encoder.onnx and CLIP's BPE merges beside it; then the model's own embeddings of a
    few names against the ONNX text tower's (through vild_d2_runtime), printed."""
    import clip

    path = out / "text_encoder.onnx"
    export_text_encoder_onnx(predictor.model.text_encoder, str(path))
    bpe = Path(clip.__file__).parent / BPE_NAME
    shutil.copyfile(bpe, out / bpe.name)
    print(f"wrote {path.name} and {bpe.name}")
    try:
        from vild_d2_runtime import TextEncoder as RuntimeTextEncoder
    except ImportError:
        print("vild_d2_runtime is not installed: text encoder not checked")
        return 0
    names = list(predictor.vocabulary.names[:8])
    got = RuntimeTextEncoder(str(path)).encode(names)
    ref = predictor.vocabulary.embeddings[: len(names)].numpy()
    cosine = float((got * ref).sum(1).min())
    print(f"text encoder check on {len(names)} names: min cosine to the model's own {cosine:.7f}")
    if cosine < TEXT_COSINE:
        print(f"MISMATCH: the exported text encoder's embeddings differ (cosine < {TEXT_COSINE})")
        return 1
    return 0


def main(argv=None):
    args = parse_args(get_parser(), argv)
    try:
        if not (math.isfinite(args.max_megapixels) and args.max_megapixels > 0):
            raise ValueError(f"--max-megapixels {args.max_megapixels}: must be a number > 0")
        out = _check_output(args)
        sample = _sample_image(args.sample_image, args.max_megapixels)
        spec = vocabulary_from_cli(args.vocabulary, args.custom_vocabulary)
        opts = with_dataset_files(args.config_file, args.opts, args.dataset_file)
        predictor = ViLDPredictor(load_config(args.config_file, opts))
        if spec is not None:
            predictor.set_vocabulary(spec)
        inputs = predictor.preprocess(sample)
    except STARTUP_ERRORS as e:  # config, weights, vocabulary, sample image: one line
        print(startup_error_line(e, args.config_file), file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    image = inputs["image"].to(predictor.model.device)
    vocab_input = args.vocabulary_input
    meta = deploy_metadata(predictor) if vocab_input else None
    names = list(predictor.vocabulary.names)
    # Written in a hidden folder inside --output, then moved in whole: a crash leaves no
    # half-written model, and an existing file is never replaced without --overwrite.
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        if args.format == "torchscript":
            export_torchscript(predictor.model, image, str(stage / "model.ts"), vocab_input, meta)
        else:
            export_onnx(
                predictor.model,
                image,
                str(stage / "model.onnx"),
                vocabulary_input=vocab_input,
                metadata=meta,
            )
        text_status = _export_text_side(predictor, stage) if vocab_input else 0
        if not vocab_input:
            vocabulary_json = json.dumps({"names": names, "format": args.format})
            (stage / "vocabulary.json").write_text(vocabulary_json)
        _publish(stage, out, args.overwrite)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    path = out / _output_files(args)[0]
    listed = f"{', '.join(names[:5])}{'...' * (len(names) > 5)}"
    if vocab_input:
        print(f"wrote {path} (vocabulary as input; checked with {len(names)} classes: {listed})")
    else:
        print(f"wrote {path} ({len(names)} classes: {listed})")

    vocabulary = ()
    if vocab_input:
        vocabulary = (predictor.vocabulary.embeddings.to(image.device),)
        if meta["variant"] == "ensemble":
            vocabulary += (predictor.novel_mask(predictor.vocabulary).to(image.device),)
    exported = _run_exported(args.format, path, image, vocabulary)
    if exported is None:
        print("onnxruntime is not installed: exported model not run")
        return 0
    size = (inputs["height"], inputs["width"])
    got = outputs_to_instances([torch.as_tensor(np.asarray(o)) for o in exported], size)
    with torch.no_grad():
        ref = predictor.model([inputs])[0]["instances"].to("cpu")
    if len(got) != len(ref):
        print(f"MISMATCH: exported model gave {len(got)} detections, eager {len(ref)}")
        return 1
    box_diff = score_diff = 0.0
    same_classes = True
    if len(ref):
        box_diff = (got.pred_boxes.tensor.cpu() - ref.pred_boxes.tensor).abs().max().item()
        score_diff = (got.scores.cpu() - ref.scores).abs().max().item()
        same_classes = torch.equal(got.pred_classes.cpu().long(), ref.pred_classes.long())
    print(
        f"check on the sample image: {len(ref)} detections, max |box diff| {box_diff:.2e} px, "
        f"max |score diff| {score_diff:.2e}"
    )
    if box_diff > BOX_TOLERANCE_PX or score_diff > SCORE_TOLERANCE or not same_classes:
        print(
            f"MISMATCH: the exported model differs from the eager one (tolerance "
            f"{BOX_TOLERANCE_PX} px, {SCORE_TOLERANCE} score; same classes: {same_classes})"
        )
        return 1
    return text_status


if __name__ == "__main__":
    sys.exit(main())
