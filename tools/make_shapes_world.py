#!/usr/bin/env python
"""Write the shapes world: images and LVIS v1 jsons, deterministic in its parameters.

The world is drawn by vild_d2/data/datasets/shapes.py. Novel categories appear in training
images but are annotated only in val.

Usage: python tools/make_shapes_world.py [--root $DETECTRON2_DATASETS/shapes] [--seed 0]
           [--novel "red star" "blue square" ...] [--num-train 600] [--num-val 100]
"""

import argparse
import os
import sys

import vild_d2  # noqa: F401  (first: compatibility bridges)
from vild_d2.data.datasets.shapes import DEFAULT_NOVEL, WorldSpec, generate_shapes_world


def parse_args(argv=None):
    root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "shapes")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=root, help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--novel", nargs="+", default=list(DEFAULT_NOVEL), help="novel categories")
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
        spec = WorldSpec(
            seed=args.seed,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            objects_per_image=tuple(args.objects_per_image),
            novel=tuple(args.novel),
        )
    except ValueError as e:
        sys.exit(f"make_shapes_world: {e}")

    def progress(split, done, total):
        if done == total or done % 100 == 0:
            print(f"  {split}: {done}/{total} images", flush=True)

    generate_shapes_world(args.root, spec, progress=progress)
    print(f"shapes world written to {args.root}: novel = {list(spec.novel)}")


if __name__ == "__main__":
    main()
