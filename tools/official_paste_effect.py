#!/usr/bin/env python
"""The effect of the official evaluation's mask pasting and box handling on AP
(docs/OFFICIAL.md, "The official evaluation's boxes and masks").

    python tools/official_paste_effect.py --image-size 128 --jitter 0.1 --convention d2

On a shapes world's val split (written to --world, default a temporary folder), an oracle
model: one detection per ground-truth object on its box (jittered by --jitter x its size,
seeded), whose 28 x 28 mask is the ground truth resampled into that box, in detectron2's
mask-target convention (ROIAlign over the box) or in the official paste's (the cells over the
widened integer box). Prints LVIS mask AP with detectron2's ``paste_masks_in_image`` and with
``vild_d2.official.masks.paste_masks_official``, and box AP with boxes clipped and not.
Exit status: 0 done, 2 bad arguments.
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile

import vild_d2  # noqa: F401  (first: compat bridges)
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.layers import ROIAlign, paste_masks_in_image
from lvis import LVIS, LVISEval, LVISResults

from vild_d2.data.datasets.shapes import WorldSpec, generate_shapes_world
from vild_d2.official.masks import official_paste_boxes, paste_masks_official


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image-size", type=int, default=128, help="px (32..2048)")
    p.add_argument("--num-images", type=int, default=100, help="val images (1..10000)")
    p.add_argument("--jitter", type=float, default=0.0, help="box noise, fraction (0..1)")
    p.add_argument("--convention", choices=("d2", "official"), default="d2")
    p.add_argument("--world", default="", help="folder for the world (default: temporary)")
    args = p.parse_args(argv)
    for name, value, lo, hi in (
        ("--image-size", args.image_size, 32, 2048),
        ("--num-images", args.num_images, 1, 10000),
        ("--jitter", args.jitter, 0.0, 1.0),
    ):
        if not lo <= value <= hi:  # (NaN fails too)
            p.error(f"{name} {value} is out of range {lo}..{hi}")
    return args


def _small_masks(bitmasks, boxes, convention):
    """(N, 28, 28) ground truth resampled into ``boxes`` in the given convention."""
    align = ROIAlign((28, 28), 1.0, 0, aligned=True)
    if convention == "official":  # cells 1..28 of the 30 the official paste spreads over its box
        e = official_paste_boxes(boxes, (28, 28)).float()
        w, h = e[:, 2] - e[:, 0] + 1, e[:, 3] - e[:, 1] + 1
        boxes = torch.stack(
            [e[:, 0] + w / 30, e[:, 1] + h / 30, e[:, 0] + 29 * w / 30, e[:, 1] + 29 * h / 30], 1
        )
    rois = torch.cat([torch.arange(len(boxes))[:, None].float(), boxes], 1)
    return align(bitmasks[:, None], rois)[:, 0]


def detections(gt, jitter, convention):
    """{"d2", "official", "d2_clip"}: LVIS result lists of the oracle model."""
    rng = np.random.default_rng(0)
    by_image, out = {}, {"d2": [], "official": [], "d2_clip": []}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for im in gt["images"]:
        h, w, anns = im["height"], im["width"], by_image.get(im["id"], [])
        if not anns:
            continue
        bitmasks = torch.from_numpy(
            np.stack(
                [
                    mask_util.decode(
                        mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))
                    )
                    for a in anns
                ]
            )
        ).float()
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)])
        sizes = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        boxes = boxes + torch.from_numpy(rng.normal(0, 1, boxes.shape)).float() * jitter * sizes
        small = _small_masks(bitmasks, boxes, convention)
        pasted = {
            "d2": paste_masks_in_image(small, boxes, (h, w), 0.5),
            "official": paste_masks_official(small, boxes, h, w),
        }
        clipped = torch.stack(
            [
                boxes[:, 0].clamp(0, w),
                boxes[:, 1].clamp(0, h),
                boxes[:, 2].clamp(0, w),
                boxes[:, 3].clamp(0, h),
            ],
            1,
        )
        for i, a in enumerate(anns):
            for kind in out:
                x0, y0, x1, y1 = (clipped if kind == "d2_clip" else boxes)[i].tolist()
                rle = mask_util.encode(
                    np.asfortranarray(
                        pasted["official" if kind == "official" else "d2"][i]
                        .numpy()
                        .astype(np.uint8)
                    )
                )
                rle["counts"] = rle["counts"].decode("ascii")
                out[kind].append(
                    {
                        "image_id": im["id"],
                        "category_id": a["category_id"],
                        "score": 1.0 - 1e-4 * i,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": rle,
                    }
                )
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.world or f"{tmp}/shapes"
        spec = WorldSpec(num_train=1, num_val=args.num_images, image_size=args.image_size)
        generate_shapes_world(root, spec)
        gt_file = f"{root}/annotations/val.json"
        with open(gt_file) as f:
            gt = json.load(f)
        dets = detections(gt, args.jitter, args.convention)

        def ap(kind, iou_type):
            with contextlib.redirect_stdout(io.StringIO()):  # LVISEval's own tables
                lvis = LVIS(gt_file)
                e = LVISEval(lvis, LVISResults(lvis, dets[kind]), iou_type)
                e.run()
            return 100 * e.results["AP"]

        print(
            f"masks in the {args.convention} convention, {args.image_size} px, jitter "
            f"{args.jitter}: {len(gt['images'])} images, {len(gt['annotations'])} objects"
        )
        print(
            f"  mask AP: detectron2 paste {ap('d2', 'segm'):.2f}, official paste "
            f"{ap('official', 'segm'):.2f}"
        )
        print(f"  box AP: not clipped {ap('d2', 'bbox'):.2f}, clipped {ap('d2_clip', 'bbox'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
