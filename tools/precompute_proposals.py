#!/usr/bin/env python
"""Precompute class-agnostic RPN proposals (top M after NMS, original image coordinates, with
objectness logits) of a dataset into a sharded, resumable store.

Usage:
  python tools/precompute_proposals.py --config-file CFG --dataset NAME --output STORE \\
      [--shard I --num-shards N | --shard-from-env] [--num-proposals 300] \\
      MODEL.WEIGHTS base_rpn.pth
Re-running the same command completes an interrupted run; N shards write one store, also as N
concurrent processes (--shard-from-env under torchrun or SLURM: docs/DISTRIBUTED.md). The flags
may stand anywhere among the config overrides (KEY VALUE ...).
"""

import argparse
import logging
import os
import sys

import vild_d2  # noqa: F401  (first: compatibility bridges)
from cli.args import add_config_arguments, parse_args as parse_tool_args, with_dataset_files
from cli.errors import STARTUP_ERRORS, startup_error_line
from cli.precompute import add_store_arguments, shard_from_env
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from vild_d2.checkpoint import ViLDCheckpointer
from vild_d2.config import load_config
from vild_d2.distill.precompute import (
    check_dataset_dicts,
    export_detectron2_proposals,
    iter_proposals,
    log_store_summary,
    proposals_header,
    run_precompute,
)
from vild_d2.distill.store import StoreWriter


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s --config-file CFG --dataset NAME --output STORE [flags] [KEY VALUE ...]",
        epilog="KEY VALUE ...: config overrides, e.g. MODEL.WEIGHTS base_rpn.pth; the flags may "
        "come before, between or after them.",
    )
    add_config_arguments(p, config_help="a config with an RPN (base classes)")
    p.add_argument("--dataset", required=True, help="registered dataset name")
    p.add_argument("--output", required=True, help="store directory")
    p.add_argument("--num-proposals", type=int, default=300, help="M, kept per image")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward")
    p.add_argument("--device", default="", help="overrides MODEL.DEVICE")
    p.add_argument("--no-fp16", action="store_true", help="no fp16 autocast on GPU")
    p.add_argument(
        "--export-detectron2",
        default="",
        help="also write detectron2's proposal pickle (once the store is complete)",
    )
    add_store_arguments(p, workers_help="image-loading processes")
    return parse_tool_args(p, argv)  # args.opts: the config overrides, flags anywhere


def main(argv=None):
    """0 when the shard is done; 2 (one line) when the config, a dataset file or the dataset is
    refused."""
    args = parse_args(argv)
    setup_logger(name="vild_d2")
    logger = setup_logger(name="precompute_proposals")
    try:
        shard_from_env(args)
        # --dataset-file as MODEL.VILD.DATASET_FILES: recorded in the store's header with the
        # other overrides.
        opts = with_dataset_files(args.config_file, args.opts, args.dataset_file)
        # The RPN's test-time output, after its NMS, is exactly the top-M proposals.
        overrides = ["MODEL.RPN.POST_NMS_TOPK_TEST", str(args.num_proposals)]
        if args.device:
            overrides += ["MODEL.DEVICE", args.device]
        cfg = load_config(args.config_file, [*opts, *overrides])
        dicts = DatasetCatalog.get(args.dataset)
        check_dataset_dicts(dicts, args.dataset)
    except STARTUP_ERRORS as e:
        print(startup_error_line(e, args.config_file), file=sys.stderr)
        return 2
    weights = cfg.MODEL.WEIGHTS
    model_info = {
        "config": os.path.abspath(args.config_file),
        "weights": weights,
        "weights_bytes": os.path.getsize(weights) if os.path.isfile(weights) else None,
        "opts": opts,
        "batch_size": args.batch_size,
        # Like the batch size (padding), fp16 autocast on GPU changes the proposals a little:
        # a re-run must not mix both in one store.
        "fp16": not args.no_fp16 and cfg.MODEL.DEVICE.startswith("cuda"),
    }
    header = proposals_header(
        args.dataset,
        len(dicts),
        chunk_size=args.chunk_size,
        max_proposals=args.num_proposals,
        model=model_info,
    )
    writer = StoreWriter(args.output, header)

    model = build_model(cfg)
    if getattr(model, "proposal_generator", None) is None:
        raise ValueError(f"{cfg.MODEL.META_ARCHITECTURE} has no proposal_generator (an RPN)")
    ViLDCheckpointer(model, complete=True).load(weights)  # every RPN weight, or an error
    model.eval()
    logger.info("Proposals of %s (%d images) into %s", args.dataset, len(dicts), args.output)
    run_precompute(
        writer,
        dicts,
        lambda chunks: iter_proposals(
            model,
            chunks,
            DatasetMapper(cfg, is_train=False),
            max_proposals=args.num_proposals,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            fp16=not args.no_fp16,
        ),
        shard=args.shard,
        num_shards=args.num_shards,
        desc=f"proposals {args.shard}/{args.num_shards}",
    )
    store = log_store_summary(logger, args.output, len(dicts))
    if args.export_detectron2:
        export_detectron2_proposals(store, dicts, args.export_detectron2)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
