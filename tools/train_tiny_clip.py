#!/usr/bin/env python
"""Train the shapes world's tiny CLIP teacher (vild_d2/shapes/teacher.py) on crops of ALL its
categories with captions, save it where ``clip.load(path)`` reads it, and print its zero-shot
accuracy on held-out crops (goal: >= 95%).

Usage: python tools/train_tiny_clip.py --world datasets/shapes --output tiny_clip.pt [--steps 600]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import vild_d2  # noqa: F401  (first: compatibility bridges)
from vild_d2.fileio import atomic_write
from vild_d2.shapes.teacher import TeacherSpec, train_tiny_clip
from vild_d2.shapes.world import load_world_spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, help="shapes world folder (with world.json)")
    p.add_argument("--output", required=True, help="checkpoint path; a .json summary goes beside")
    p.add_argument("--steps", type=int, default=TeacherSpec.steps)
    p.add_argument("--crops-per-class", type=int, default=TeacherSpec.crops_per_class)
    p.add_argument("--heldout-per-class", type=int, default=TeacherSpec.heldout_per_class)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world = load_world_spec(args.world)
    if world is None:
        sys.exit(
            f"train_tiny_clip: no shapes world at {args.world} (world.json missing); "
            "make one with tools/make_shapes_world.py"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = TeacherSpec(
        steps=args.steps,
        crops_per_class=args.crops_per_class,
        heldout_per_class=args.heldout_per_class,
        seed=args.seed,
    )
    summary = train_tiny_clip(world, args.output, spec, log=lambda m: print(m, flush=True))
    summary_path = Path(args.output).with_suffix(".json")
    atomic_write(summary_path, [json.dumps(summary, indent=1).encode()])
    print(
        f"zero-shot accuracy on {summary['heldout_crops']} held-out crops of all "
        f"{len(world.classes)} categories: {100 * summary['accuracy']:.1f}% "
        f"(base {100 * summary['accuracy_base']:.1f}%, "
        f"novel {100 * summary['accuracy_novel']:.1f}%) in {summary['seconds']:.0f} s; "
        f"saved {args.output}"
    )


if __name__ == "__main__":
    main()
