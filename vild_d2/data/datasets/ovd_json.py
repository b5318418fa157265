"""Reading a user's COCO- or LVIS-format json into detectron2 dicts, every bad item an error that
names the file and the item (an image id, an annotation id, a category).

What is checked, and what is handled (docs/OWN_DATA.md "What your json may hold"):

* errors: duplicate category names or ids, an unknown novel name, an image whose file is not on
  disk, an image root that is not a folder, a box with zero or negative width or height (or not
  4 finite numbers), a box that extends more than 1 px past its image's edge, an annotation
  of an unknown image or category, a polygon of < 3 points, segmentation on some annotations
  only, a val annotation without ``area`` (COCO's evaluation reads it), train and val jsons
  with different categories, a base category without a single training annotation (declare
  it novel, or annotate it);
* handled: category ids need not be contiguous (mapped to 0..K-1 in id order, mapped back for
  evaluation); ``iscrowd`` annotations are kept as crowd (training drops them, as detectron2's
  mapper does; COCO evaluation treats them as ignore regions); images without annotations are
  kept (in val they count false positives; detectron2's train loader skips them).
"""

import difflib
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import pycocotools.mask as mask_util
from detectron2.structures import BoxMode
from vild_d2_runtime.names import name_key

__all__ = ["OVDJsonError", "check_categories", "check_novel", "load_ovd_json", "read_json"]

# Errors listed in one message at most (the count of the others is given).
_SHOWN = 5
# How far (px) a box may extend past its image's edge: float rounding in a converted json, not
# a box of another image size. Beyond it, training would clip the box silently (detectron2's
# mapper) while evaluation would match detections against the box as written.
_EDGE_TOLERANCE = 1.0


class OVDJsonError(ValueError):
    """A dataset json (or dataset file) that cannot be used as it is; the message names the file
    and the item."""


def read_json(path: str, what: str) -> dict:
    """The parsed json at ``path``; ``what`` (e.g. "val json of dataset 'x'") names it."""
    if os.path.isdir(path):
        raise OVDJsonError(f"{what}: {path} is a folder, not a json file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OVDJsonError(f"{what}: cannot parse {path} ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise OVDJsonError(f"{path}: not a COCO/LVIS json (no 'categories' list at the top)")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key, []), list):
            raise OVDJsonError(f"{path}: '{key}' must be a list")
    return data


def check_categories(data: dict, path: str) -> List[dict]:
    """The json's categories sorted by id, each with an int ``id`` and a non-empty str ``name``;
    duplicate ids or names (also names CLIP reads alike: "Cat", "cat  ") are errors naming
    both entries, as is a name with a control character."""
    by_id, by_name, by_key = {}, {}, {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise OVDJsonError(f"{path}: categories[{i}] has no integer 'id': {cat!r:.200}")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise OVDJsonError(f"{path}: category id {cat['id']} has no name")
        if cat["id"] in by_id:
            raise OVDJsonError(f"{path}: category id {cat['id']} appears twice")
        if name in by_name:
            raise OVDJsonError(
                f"{path}: duplicate category name {name!r} (ids {by_name[name]['id']} and "
                f"{cat['id']}): a class name must name one category (the text classifier "
                "encodes names): rename or merge them"
            )
        try:
            key = name_key(name)
        except ValueError as e:  # a control character
            raise OVDJsonError(f"{path}: category id {cat['id']}: {e}") from None
        if key in by_key:
            other = by_key[key]
            raise OVDJsonError(
                f"{path}: category names {other['name']!r} (id {other['id']}) and {name!r} (id "
                f"{cat['id']}) are the same name to CLIP (case, spaces and Unicode forms do not "
                "count): the text classifier would give them one embedding; rename or merge them"
            )
        by_id[cat["id"]] = by_name[name] = by_key[key] = cat
    if not by_id:
        raise OVDJsonError(f"{path}: no categories")
    return [by_id[k] for k in sorted(by_id)]


def check_novel(novel: Sequence[str], categories: Sequence[dict], path: str) -> None:
    """Every novel name must be a category name of the json at ``path``."""
    names = [c["name"] for c in categories]
    for n in novel:
        if n not in names:
            close = difflib.get_close_matches(n, names, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise OVDJsonError(
                f"novel class {n!r} is not a category of {path} (its {len(names)} categories: "
                f"{names[:20]}{' ...' if len(names) > 20 else ''}){hint}"
            )


def _image_path(img: dict, image_root: str, fmt: str) -> Optional[str]:
    if isinstance(img.get("file_name"), str):
        return os.path.join(image_root, img["file_name"])
    if fmt == "lvis" and isinstance(img.get("coco_url"), str):
        # LVIS names its images by their COCO url: <root>/<split folder>/<file>.
        return os.path.join(image_root, *img["coco_url"].split("/")[-2:])
    return None


def _fail(path: str, problems: List[str], fix: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise OVDJsonError(f"{path}: {len(problems)} bad item(s):\n  {shown}{more}\n{fix}")


def _check_box(ann: dict) -> Optional[str]:
    box = ann.get("bbox")
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
    ):
        return f"bbox {box!r:.80} is not 4 finite numbers [x, y, width, height]"
    if box[2] <= 0 or box[3] <= 0:
        return f"bbox {list(box)} has zero or negative width or height"
    return None


def _check_inside(box, width: int, height: int) -> Optional[str]:
    """Why an [x, y, w, h] box is not inside its ``width`` x ``height`` image (None: it is)."""
    x, y, w, h = box
    over = {"left": -x, "top": -y, "right": x + w - width, "bottom": y + h - height}
    edge = max(over, key=over.get)
    if over[edge] <= _EDGE_TOLERANCE:
        return None
    return (
        f"bbox {list(box)} extends {over[edge]:g} px past the image's {edge} edge (the image is "
        f"{width} x {height} px, as its entry says): a box of another image or size?"
    )


def _check_segmentation(segm) -> Optional[str]:
    if isinstance(segm, dict):  # RLE
        return None if {"counts", "size"} <= segm.keys() else "RLE without counts/size"
    if not isinstance(segm, list) or not segm:
        return "segmentation is neither a list of polygons nor an RLE dict"
    for poly in segm:
        if not isinstance(poly, list) or len(poly) % 2 or len(poly) < 6:
            return "a polygon with fewer than 3 points (or an odd number of coordinates)"
    return None


def load_ovd_json(
    data: dict,
    path: str,
    image_root: str,
    fmt: str,
    id_map: Dict[int, int],
    *,
    require_area: bool,
) -> Tuple[List[dict], Dict[int, int]]:
    """
    detectron2 dicts of a checked json (every image kept; annotations of the categories in
    ``id_map`` only, their ids mapped to contiguous ones).

    Args:
        data, path: the parsed json and its file, for messages.
        image_root: folder the images' ``file_name`` (LVIS: ``coco_url``) are relative to.
        fmt: "coco" or "lvis".
        id_map: {category id: contiguous id} of the categories to keep.
        require_area: an annotation without ``area`` is an error (the evaluators read it).

    Returns:
        dicts: one per image, detectron2's standard format (boxes XYWH_ABS, ``iscrowd``).
        counts: {category id: non-crowd annotations}, over every category of the json.
    """
    if not os.path.isdir(image_root):
        what = "a file, not a folder" if os.path.exists(image_root) else "not found"
        raise OVDJsonError(f"image root {image_root} of {path} is {what}")
    images, problems = {}, []
    for i, img in enumerate(data.get("images", [])):
        if not isinstance(img, dict) or "id" not in img:
            problems.append(f"images[{i}] has no 'id'")
            continue
        where = f"image id {img['id']}"
        if img["id"] in images:
            problems.append(f"{where} appears twice")
        file_name = _image_path(img, image_root, fmt)
        if file_name is None:
            need = "'file_name' (or 'coco_url')" if fmt == "lvis" else "'file_name'"
            problems.append(f"{where} has no {need}")
        elif not all(isinstance(img.get(k), int) and img[k] > 0 for k in ("height", "width")):
            problems.append(f"{where} ({file_name}) has no positive integer height and width")
        images[img["id"]] = (img, file_name)
    _fail(path, problems, "Each image needs a unique id, a file name, its height and width.")

    missing = [f"image id {k}: {f}" for k, (_, f) in images.items() if not os.path.isfile(f)]
    _fail(
        path,
        missing,
        f"These image files are not on disk (image root {image_root}): copy them there, fix "
        "the root, or remove the images from the json.",
    )

    categories = {c["id"] for c in data["categories"]}
    counts = {c: 0 for c in categories}
    per_image: Dict[int, List[dict]] = {k: [] for k in images}
    with_segm = without_segm = None
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"annotation id {ann.get('id', f'#{i}')}" if isinstance(ann, dict) else f"#{i}"
        if not isinstance(ann, dict):
            problems.append(f"annotations[{i}] is not an object")
            continue
        where += f" (image id {ann.get('image_id')!r})"
        if ann.get("image_id") not in images:
            problems.append(f"{where}: no image with this id")
            continue
        if ann.get("category_id") not in categories:
            problems.append(f"{where}: unknown category_id {ann.get('category_id')!r}")
            continue
        bad = _check_box(ann)
        if bad is None:
            img = images[ann["image_id"]][0]
            bad = _check_inside(ann["bbox"], img["width"], img["height"])
        crowd = int(ann.get("iscrowd", 0) or 0)
        if bad is None and require_area and not isinstance(ann.get("area"), (int, float)):
            bad = "no 'area' (the evaluation reads it: the mask's pixel count, or w x h)"
        if bad is None and "segmentation" in ann:
            bad = _check_segmentation(ann["segmentation"])
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        if not crowd:
            counts[ann["category_id"]] += 1
            if "segmentation" in ann:
                with_segm = with_segm or where
            else:
                without_segm = without_segm or where
        if ann["category_id"] not in id_map:
            continue
        obj = {
            "bbox": [float(v) for v in ann["bbox"]],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": id_map[ann["category_id"]],
            "iscrowd": crowd,
        }
        if "segmentation" in ann:
            segm = ann["segmentation"]
            if isinstance(segm, dict) and isinstance(segm["counts"], list):
                segm = mask_util.frPyObjects(segm, *segm["size"])  # as load_coco_json does
            obj["segmentation"] = segm
        per_image[ann["image_id"]].append(obj)
    if with_segm and without_segm:
        problems.append(
            f"{without_segm}: no segmentation, while {with_segm} has one: give every "
            "(non-crowd) annotation a segmentation, or none (then train with MODEL.MASK_ON False)"
        )
    _fail(path, problems, "Fix or remove these annotations (boxes are [x, y, width, height] px).")

    dicts = []
    for image_id, (img, file_name) in images.items():
        record = {
            "file_name": file_name,
            "height": img["height"],
            "width": img["width"],
            "image_id": image_id,
            "annotations": per_image[image_id],
        }
        if fmt == "lvis":
            record["neg_category_ids"] = img.get("neg_category_ids", [])
            record["not_exhaustive_category_ids"] = img.get("not_exhaustive_category_ids", [])
        dicts.append(record)
    return dicts, counts
