#!/usr/bin/env python
"""Write the shapes world: images and LVIS v1 jsons, deterministic in its parameters.

The world is drawn by vild_d2/data/datasets/shapes.py. Novel categories appear in training
images but are annotated only in val. ``--novel-shapes star heart`` makes whole shapes novel in
every colour instead (unseen concepts: no base category has those shapes); ``--full-train`` also
writes annotations/train_full.json, the training images with the novel objects annotated too
(for a supervised upper reference).

Usage: python tools/make_shapes_world.py [--root $DETECTRON2_DATASETS/shapes] [--seed 0]
           [--novel "red star" "blue square" ... | --novel-shapes star heart] [--full-train]
           [--num-train 600] [--num-val 100]
"""

import argparse
import os
import sys

import vild_d2  # noqa: F401  (first: compatibility bridges)
from vild_d2.data.datasets.shapes import (
    DEFAULT_NOVEL,
    WorldSpec,
    generate_shapes_world,
    novel_for_shapes,
)


def parse_args(argv=None):
    root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "shapes")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=root, help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    novel = p.add_mutually_exclusive_group()
    novel.add_argument("--novel", nargs="+", default=list(DEFAULT_NOVEL), help="novel categories")
    novel.add_argument(
        "--novel-shapes",
        nargs="+",
        metavar="SHAPE",
        help="novel concepts: these shapes in every colour are the novel categories",
    )
    p.add_argument(
        "--full-train",
        action="store_true",
        help="also write annotations/train_full.json (novel training objects annotated too)",
    )
    p.add_argument("--num-train", type=int, default=WorldSpec.num_train)
    p.add_argument("--num-val", type=int, default=WorldSpec.num_val)
    p.add_argument("--image-size", type=int, default=WorldSpec.image_size)
    p.add_argument(
        "--objects-per-image", type=int, nargs=2, default=list(WorldSpec.objects_per_image)
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        novel = novel_for_shapes(args.novel_shapes) if args.novel_shapes else args.novel
        spec = WorldSpec(
            seed=args.seed,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            objects_per_image=tuple(args.objects_per_image),
            novel=tuple(novel),
        )
    except ValueError as e:
        print(f"make_shapes_world: {e}", file=sys.stderr)
        sys.exit(2)  # bad input

    def progress(split, done, total):
        if done == total or done % 100 == 0:
            print(f"  {split}: {done}/{total} images", flush=True)

    generate_shapes_world(args.root, spec, progress=progress, full_train=args.full_train)
    print(f"shapes world written to {args.root}: novel = {list(spec.novel)}")


if __name__ == "__main__":
    main()
