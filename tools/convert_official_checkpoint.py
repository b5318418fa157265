#!/usr/bin/env python
"""Convert an official (TensorFlow) ViLD checkpoint into a vild_d2 checkpoint.

    python tools/convert_official_checkpoint.py --checkpoint ckpt/model.ckpt-180000 \\
        --config-file configs/LVIS-OVD/official/vild_ensemble_R50_tf.yaml --output vild.pth

Reads ``<PREFIX>.index`` + ``<PREFIX>.data-*`` without TensorFlow, maps every official variable
onto the config's model (ResNet depth and ViLD / ViLD-ensemble from the config), and writes:

* ``--output``: ``{"model": state_dict, "vocabulary": ..., "official": {...}}`` for
  ``MODEL.WEIGHTS``: with the official configs the model takes the 1203 LVIS classes from it,
  no CLIP needed (only names the checkpoint does not hold are encoded with CLIP);
* ``<output stem>_vocabulary.pth``: the official frozen classifier as a saved vocabulary (the
  LVIS v1 names in id order, rare = novel), for ``--vocabulary`` or
  ``MODEL.VILD.TRAIN_VOCABULARY`` / ``TEST_VOCABULARY`` of another model.

``--novel-classes FILE``: the classes ViLD-ensemble weighs as novel, instead of LVIS v1's rare
ones: class ids 1..1203 (the official class numbers) or names, one per line or
comma-separated, or the official ``rare_mask_path`` .npy (1 = base, 0 = novel).

Training-only variables (``global_step``, optimiser slots) are skipped; any other missing, extra
or mis-shaped variable stops the conversion with one line (the counts and a few names).
Nothing is written unless everything succeeded (both files appear together).
Exit status: 0 done, 2 bad input (nothing written).
"""

import argparse
import logging
import sys

import vild_d2  # noqa: F401  (first: compat bridges)

from cli.args import add_config_arguments, parse_args as parse_tool_args, with_dataset_files
from vild_d2.official.checkpoint.convert_checkpoint import convert_official_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="TF checkpoint prefix (no .index)")
    p.add_argument("--config-file", required=True, help="a configs/LVIS-OVD/official/*.yaml")
    p.add_argument("--output", required=True, help="the vild_d2 checkpoint (.pth) to write")
    p.add_argument("--vocabulary", default="lvis", help="built-in names of the classifier's "
                   "columns (default lvis: the official LVIS v1 classifier)")  # fmt: skip
    p.add_argument(
        "--novel-classes",
        default="",
        metavar="FILE",
        help="novel class ids (1..K) or names, or a rare-mask .npy (default: LVIS v1's rare ones)",
    )
    add_config_arguments(p)  # --dataset-file, KEY VALUE overrides (or --opts)
    return parse_tool_args(p, argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        written = convert_official_checkpoint(
            args.checkpoint,
            args.config_file,
            args.output,
            opts=with_dataset_files(args.config_file, args.opts, args.dataset_file),
            vocabulary=args.vocabulary,
            novel_classes=args.novel_classes or None,
        )
    except (ValueError, OSError, KeyError) as e:  # the reader's and converter's own errors
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print("error: " + " ".join(message.split()), file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
