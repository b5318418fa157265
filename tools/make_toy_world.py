#!/usr/bin/env python
"""Write the toy world (images, LVIS jsons, distillation targets) and its tiny random CLIP.

Usage: python tools/make_toy_world.py [--root datasets/vild_toy] [--clip PATH] [--seed 0]
Without --clip, a random-weight tiny CLIP is saved as ROOT/tiny_clip.pt and used.
"""

import argparse
import logging
from pathlib import Path

import vild_d2  # noqa: F401
from vild_d2.data.toy import compute_toy_distillation, generate_toy_world
from vild_d2.text import load_clip, save_random_clip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="datasets/vild_toy")
    parser.add_argument("--clip", default="", help="CLIP name or checkpoint (default: tiny random)")
    parser.add_argument("--num-train", type=int, default=8)
    parser.add_argument("--num-val", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    root = Path(args.root)
    clip_spec = args.clip or save_random_clip(str(root / "tiny_clip.pt"), seed=args.seed)
    generate_toy_world(root, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    model, identity = load_clip(clip_spec)
    compute_toy_distillation(root, model, seed=args.seed)
    print(f"toy world written to {root} (CLIP: {identity})")


if __name__ == "__main__":
    main()
