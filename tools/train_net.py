#!/usr/bin/env python
"""Train or evaluate ViLD: detectron2's train_net with the vild_d2 config, trainer and model.

One process per GPU, on one machine or several (README "Training on many GPUs and machines");
on a machine without CUDA, ``--num-gpus N`` runs N CPU processes (gloo).
"""

import sys
from datetime import timedelta

import vild_d2  # noqa: F401  (first: registers the model and applies compatibility bridges)
from cli.args import add_config_arguments, parse_args as parse_tool_args, with_dataset_files
from cli.errors import STARTUP_ERRORS, startup_error_line
from detectron2.engine import default_argument_parser
from vild_d2.checkpoint import IncompatibleCheckpointError, ViLDCheckpointer
from vild_d2.engine import Trainer, launch, setup
from vild_d2.engine.launch import LaunchArgumentError, ProcessDiedError, RendezvousError


class InputError(Exception):
    """The config or a dataset was refused before anything was written: one line, exit 2."""


def main(args):
    try:
        # --dataset-file: in MODEL.VILD.DATASET_FILES, so every process registers it and the
        # output folder's config.yaml names it.
        args.opts = with_dataset_files(args.config_file, args.opts, args.dataset_file)
        args.dataset_file = []  # (in args.opts now)
        # The config and the datasets are checked before the output folder is written to.
        cfg = setup(args, check_data=True)
    except STARTUP_ERRORS as e:
        raise InputError(startup_error_line(e, args.config_file)) from e
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # complete: every parameter must come from the checkpoint, or the APs mean nothing
        ViLDCheckpointer(model, save_dir=cfg.OUTPUT_DIR, complete=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    try:
        trainer = Trainer(cfg)
    except IncompatibleCheckpointError as e:  # a SELF_DISTILL.START_WEIGHTS of another model
        raise InputError(startup_error_line(e, args.config_file)) from e
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    parser = default_argument_parser()
    add_config_arguments(parser)  # --dataset-file, --opts (detectron2's has the rest)
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=1800,
        help="seconds the processes wait for each other: to join, then at each collective",
    )
    # detectron2's default is one fixed port per user: two jobs on one machine would collide
    parser.set_defaults(dist_url=None)
    return parser


def parse_args(argv=None):
    parser = get_parser()
    args = parse_tool_args(parser, argv)  # flags anywhere, also after the KEY VALUE overrides
    if args.dist_url is None:
        if args.num_machines > 1:
            parser.error("--num-machines > 1 needs --dist-url tcp://HOST:PORT of machine 0")
        args.dist_url = "auto"  # a free port on 127.0.0.1
    return args


def cli(argv=None) -> int:
    """The command: 0 when it ran; 1 when a process of the job failed; 2 on bad input (the
    config, a dataset, the device, the weights, --num-gpus), one line, nothing written."""
    args = parse_args(argv)
    print("Command Line Args:", args)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=timedelta(seconds=args.dist_timeout),
        )
    except (RendezvousError, ProcessDiedError) as e:  # one line: what happened, what to check
        print(f"error: {e}", file=sys.stderr)
        return 1
    except InputError as e:
        print(e, file=sys.stderr)
        return 2
    except LaunchArgumentError as e:  # e.g. --num-gpus 8 on a 2-core machine without CUDA
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
