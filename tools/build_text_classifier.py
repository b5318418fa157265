#!/usr/bin/env python
"""Build a ViLD-text classifier (a saved :class:`vild_d2.text.Vocabulary`) from class names.

Examples:
    python tools/build_text_classifier.py --clip ViT-B/32 --dataset vild_lvis_v1_val \
        --output lvis.pth
    python tools/build_text_classifier.py --clip clip.pt --names "cat,dog,zebra" --novel zebra \
        --output animals.pth
    python tools/build_text_classifier.py --clip ViT-B/32 --dataset-file my_parts.yaml \
        --dataset my_parts_val --output my_parts_all.pth   # your own data: docs/OWN_DATA.md
"""

import argparse
import dataclasses
import io
import logging
import sys
from pathlib import Path

import torch

import vild_d2  # noqa: F401  (first: applies compat bridges before detectron2.data loads)
from cli.args import add_dataset_file_argument
from cli.errors import STARTUP_ERRORS, startup_error_line
from vild_d2.data import register_dataset_files
from vild_d2.fileio import atomic_write
from vild_d2.text import (
    TextEncoder,
    load_templates,
    novel_mask,
    parse_names,
    vocabulary_from_dataset,
    vocabulary_from_names,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", required=True, help="CLIP model name (e.g. ViT-B/32) or checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--names", help='comma-separated class names, e.g. "cat,dog"')
    src.add_argument("--names-file", help="text file with one class name per line")
    src.add_argument("--dataset", help="registered dataset whose thing_classes to encode")
    add_dataset_file_argument(p)
    p.add_argument("--novel", default="", help="comma-separated novel class names")
    p.add_argument("--templates", default="", help='prompt templates file ("" = the 63 ViLD ones)')
    p.add_argument("--synonyms", action="store_true", help="average dataset class_synonyms in")
    p.add_argument(
        "--cache-dir",
        default="auto",
        help='embedding cache ("auto" = $VILD_D2_CACHE ' 'or ~/.cache/vild_d2; "" = none)',
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", required=True, help="output vocabulary file (.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p.parse_args(argv)


def _check_output(path: Path, overwrite: bool) -> None:
    """Before any work: --output must be a file name, and not replace one without
    --overwrite."""
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; it must be a file (e.g. names.pth)")
    if path.exists() and not overwrite:
        raise ValueError(
            f"--output {path} already exists: choose another name, or pass --overwrite to "
            "replace it"
        )


def _build(args):
    register_dataset_files(args.dataset_file)
    encoder = TextEncoder(
        args.clip,
        templates=load_templates(args.templates),
        cache_dir=args.cache_dir or None,
        device=args.device,
    )
    novel = parse_names(args.novel) or None
    if args.dataset:
        vocab = vocabulary_from_dataset(args.dataset, encoder, use_synonyms=args.synonyms)
        if novel is not None:  # explicit --novel overrides the dataset's novel_classes
            vocab = dataclasses.replace(vocab, novel=novel_mask(vocab.names, novel))
        return vocab
    if args.names_file:
        lines = Path(args.names_file).read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip()]
    else:
        names = parse_names(args.names)
    return vocabulary_from_names(names, encoder, novel=novel)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    output = Path(args.output).expanduser()
    try:
        _check_output(output, args.overwrite)
        vocab = _build(args)
        # Written whole (temporary file, then renamed); without --overwrite a file that
        # appeared meanwhile is kept.
        buffer = io.BytesIO()
        torch.save(vocab.state_dict(), buffer)
        if not atomic_write(output, [buffer.getvalue()], exclusive=not args.overwrite):
            raise ValueError(f"--output {output} appeared meanwhile: left as it is")
    except (*STARTUP_ERRORS, OSError) as e:  # names, CLIP file, dataset, output: one line
        print(startup_error_line(e) or f"error: {e}", file=sys.stderr)
        return 2
    num_novel = "unknown" if vocab.novel is None else int(vocab.novel.sum())
    print(f"K={len(vocab)} D={vocab.dim} novel={num_novel} -> wrote {output.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
