#!/usr/bin/env python
"""Convert an official (TensorFlow) ViLD checkpoint into a vild_d2 checkpoint.

    python tools/convert_official_checkpoint.py --checkpoint ckpt/model.ckpt-180000 \\
        --config-file configs/LVIS-OVD/official/vild_ensemble_R50_tf.yaml --output vild.pth

Reads ``<PREFIX>.index`` + ``<PREFIX>.data-*`` without TensorFlow, maps every official variable
onto the config's model (ResNet depth and ViLD / ViLD-ensemble from the config), and writes:

* ``--output``: ``{"model": state_dict, "vocabulary": ..., "official": {...}}``, loadable by
  ``ViLDCheckpointer`` (``MODEL.WEIGHTS``; ``load`` restores the vocabulary too);
* ``<output stem>_vocabulary.pth``: the official frozen classifier as a saved vocabulary (the
  1203 LVIS v1 names in id order, rare = novel), for ``MODEL.VILD.TRAIN_VOCABULARY`` /
  ``TEST_VOCABULARY`` (no CLIP needed to build the model) or ``tools/demo.py --vocabulary``.

Training-only variables (``global_step``, optimiser slots) are skipped; any other missing, extra
or mis-shaped variable stops the conversion with one error naming them all. Nothing is written
unless everything succeeded (both files appear together, renamed from temporary files).
Exit status: 0 done, 2 bad input (nothing written).
"""

import argparse
import io
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import vild_d2  # noqa: F401  (first: compat bridges)
import torch
from detectron2.modeling import build_model

from vild_d2.config import load_config
from vild_d2.official.convert import convert_official_weights, official_vocabulary
from vild_d2.official.tf_checkpoint import read_tf_checkpoint

logger = logging.getLogger("convert_official_checkpoint")

# Variables of a training checkpoint that are no model weights.
_TRAINING_ONLY = re.compile(r"(^global_step$)|(/(Momentum|ExponentialMovingAverage|Adam\w*)$)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="TF checkpoint prefix (no .index)")
    p.add_argument("--config-file", required=True, help="a configs/LVIS-OVD/official/*.yaml")
    p.add_argument("--output", required=True, help="the vild_d2 checkpoint (.pth) to write")
    p.add_argument("--vocabulary", default="lvis", help="built-in names of the classifier's "
                   "columns (default lvis: the official LVIS v1 classifier)")  # fmt: skip
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    return p.parse_args(argv)


def _serialise(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_together(files):
    """Write {path: bytes} through temporary files renamed at the end (all or nothing)."""
    temps = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in zip(temps, files):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def convert(args) -> dict:
    """The conversion without writing: {path: bytes} of the two outputs."""
    cfg = load_config(args.config_file, args.opts)
    depth, ensemble = cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.VILD.VARIANT == "ensemble"
    if cfg.MODEL.META_ARCHITECTURE != "OfficialViLDRCNN":
        raise ValueError(
            f"{args.config_file} is not an official-architecture config (META_ARCHITECTURE "
            "OfficialViLDRCNN): use configs/LVIS-OVD/official/"
        )
    tf_vars = read_tf_checkpoint(args.checkpoint)
    skipped = sorted(n for n in tf_vars if _TRAINING_ONLY.search(n.split(":")[0]))
    if skipped:
        logger.info("Skipping %d training-only variables (%s ...)", len(skipped), skipped[:3])
    tf_vars = {n: v for n, v in tf_vars.items() if n not in set(skipped)}
    state, info = convert_official_weights(tf_vars, depth, ensemble)
    vocab = official_vocabulary(info["classifier"], args.vocabulary)
    output = Path(args.output).expanduser()
    vocab_path = output.with_name(output.stem + "_vocabulary.pth")
    # Check that the config's model takes every tensor (built with this vocabulary: no CLIP).
    with tempfile.TemporaryDirectory() as tmp:
        vocab.save(f"{tmp}/vocabulary.pth")
        check_cfg = load_config(args.config_file, [
            *args.opts, "MODEL.VILD.TRAIN_VOCABULARY", f"{tmp}/vocabulary.pth",
            "MODEL.VILD.TEST_VOCABULARY", f"{tmp}/vocabulary.pth", "MODEL.DEVICE", "cpu",
        ])  # fmt: skip
        model = build_model(check_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"the converted weights do not fit {args.config_file}: missing "
                         f"{missing[:8]}, unexpected {unexpected[:8]}")  # fmt: skip
    checkpoint = {
        "model": state,
        "vocabulary": vocab.state_dict(),
        "official": {
            "checkpoint": str(args.checkpoint),
            "depth": depth,
            "ensemble": ensemble,
            "vocabulary_file": vocab_path.name,
        },  # fmt: skip
    }
    logger.info("Converted %d tensors (R%d%s), %d classes", len(state), depth,
                " ensemble" if ensemble else "", len(vocab))  # fmt: skip
    return {output: _serialise(checkpoint), vocab_path: _serialise(vocab.state_dict())}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        files = convert(args)
    except (ValueError, OSError, KeyError) as e:  # the reader's and converter's own errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    _write_together(files)
    for path in files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
