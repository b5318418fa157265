#!/usr/bin/env python
"""Precompute ViLD's CLIP targets: for each proposal of a proposals store, the CLIP image
embeddings of its 1x and 1.5x crops, summed and L2-normalised, into a sharded, resumable store.

Usage:
  python tools/precompute_clip_embeddings.py --proposals PROPOSALS --dataset NAME \\
      --clip ViT-B/32 --output TARGETS [--shard I --num-shards N | --shard-from-env] [--device cuda]
Re-running the same command completes an interrupted run; N shards write one store, also as N
concurrent processes (--shard-from-env under torchrun or SLURM: docs/DISTRIBUTED.md).
"""

import argparse
import logging
import sys

import torch

import vild_d2  # noqa: F401  (first: compatibility bridges)
from cli.args import add_dataset_file_argument
from cli.errors import STARTUP_ERRORS, startup_error_line
from cli.precompute import add_store_arguments, shard_from_env
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger
from vild_d2.data import register_dataset_files
from vild_d2.distill.precompute import (
    check_dataset_dicts,
    embeddings_header,
    iter_embeddings,
    log_store_summary,
    run_precompute,
)
from vild_d2.distill.store import DistillStore, StoreError, StoreWriter, check_dataset
from vild_d2.distill.teacher import CLIPTeacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proposals", required=True, help="store of tools/precompute_proposals.py")
    p.add_argument("--dataset", required=True, help="registered dataset name")
    add_dataset_file_argument(p)
    p.add_argument("--clip", required=True, help="CLIP model name or local checkpoint")
    p.add_argument("--output", required=True, help="store directory")
    p.add_argument("--max-proposals", type=int, default=300, help="top-M proposals per image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5], help="crop scales")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="crops per CLIP forward; 0 = all crops of an image at once",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_store_arguments(p, workers_help="image-decoding processes")
    return p.parse_args(argv)


def main(argv=None):
    """0 when the shard is done; 2 (one line) when the environment's shard or a dataset file
    is refused."""
    args = parse_args(argv)
    try:
        shard_from_env(args)
        register_dataset_files(args.dataset_file)
    except STARTUP_ERRORS as e:
        print(startup_error_line(e), file=sys.stderr)
        return 2
    setup_logger(name="vild_d2")
    logger = setup_logger(name="precompute_clip_embeddings")
    proposals = DistillStore(args.proposals)
    if proposals.header["kind"] != "proposals":
        raise StoreError(f"{args.proposals} is a {proposals.header['kind']!r} store, not proposals")
    if proposals.header["dataset"] != args.dataset:
        raise StoreError(
            f"{args.proposals} holds proposals of {proposals.header['dataset']!r}, "
            f"not of --dataset {args.dataset!r}"
        )
    dicts = DatasetCatalog.get(args.dataset)
    check_dataset_dicts(dicts, args.dataset)
    # Same name is not same data: the proposals must come from these very image files (another
    # copy of the dataset would give crops of boxes from other pictures). Hashes every image
    # once; a resumed run and the targets' own chunks reuse the hashes.
    check_dataset(proposals, dicts, args.dataset, complete=True)
    teacher = CLIPTeacher(
        args.clip, scales=args.scales, device=args.device, batch_size=args.batch_size or None
    )
    header = embeddings_header(
        args.dataset,
        len(dicts),
        chunk_size=args.chunk_size,
        max_proposals=args.max_proposals,
        # The crops per forward and fp16 autocast (on GPU) change the float16 targets in their
        # last bits: recorded, so that a resumed run cannot mix them into one store.
        teacher_settings={
            **teacher.settings(),
            "batch_size": args.batch_size,
            "fp16": teacher.device.type == "cuda",
        },
        proposals=proposals,
    )
    writer = StoreWriter(args.output, header)
    logger.info(
        "CLIP targets of %s (%d images, CLIP %s on %s) into %s",
        args.dataset,
        len(dicts),
        teacher.identity,
        args.device,
        args.output,
    )
    run_precompute(
        writer,
        dicts,
        lambda chunks: iter_embeddings(
            teacher, chunks, proposals, max_boxes=args.max_proposals, num_workers=args.num_workers
        ),
        shard=args.shard,
        num_shards=args.num_shards,
        desc=f"CLIP targets {args.shard}/{args.num_shards}",
    )
    log_store_summary(logger, args.output, len(dicts))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
