"""Precomputed proposals (``DATASETS.PROPOSAL_FILES_*``) joined to dataset dicts, read without
running code: detectron2's ``load_proposals_into_dataset`` unpickles the file as it is, so a
proposal file could run anything; here it may only hold data (:mod:`vild_d2.safe_load`)."""

import logging
from typing import List

import numpy as np
from detectron2.structures import BoxMode

from ..safe_load import UnsafeFileError, load_pickle

__all__ = ["load_proposals_into_dataset"]

logger = logging.getLogger(__name__)

# How to make a proposal file that is only data.
_HINT = (
    "write proposals as a pickle of plain data: {'ids': [...], 'boxes': [(N, 4) arrays], "
    "'objectness_logits': [(N,) arrays], 'bbox_mode': 0} (tools/precompute_proposals.py "
    "--detectron2-proposals writes one)"
)


def load_proposals_into_dataset(dataset_dicts: List[dict], proposal_file: str) -> List[dict]:
    """
    Add ``proposal_boxes`` (N, 4), ``proposal_objectness_logits`` (N,) (sorted by decreasing
    logit) and ``proposal_bbox_mode`` to each dict, from detectron2's proposal file format: a
    pickled dict of "ids", "boxes", "objectness_logits" (Detectron's "indexes" and "scores"
    too) and an optional "bbox_mode" (default XYXY_ABS). Same result as detectron2's function
    of this name, for files that hold only data.

    Raises:
        ValueError: the file would run code or build other objects (refused unread), is not a
            proposal file, or has no proposals for an image of the dataset (naming it).
    """
    logger.info("Loading proposals from: %s", proposal_file)
    # detectron2's own files pickle the BoxMode enum itself; rebuilding it is BoxMode(int).
    boxmode = ("detectron2.structures.boxes", "BoxMode", BoxMode)
    try:
        proposals = load_pickle(proposal_file, hint=_HINT, admit=[boxmode])
    except UnsafeFileError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"proposal file not found: {proposal_file}") from None
    except Exception as e:  # pickle / numpy errors on other bytes are open-ended
        raise ValueError(
            f"{proposal_file}: not a proposal file (cannot unpickle it: {type(e).__name__}: {e})"
        ) from None
    if not isinstance(proposals, dict):
        raise ValueError(f"{proposal_file}: not a proposal file (a pickled dict of lists)")
    proposals = dict(proposals)
    for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):  # Detectron's names
        if old in proposals:
            proposals[new] = proposals.pop(old)
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in proposals]
    if missing:
        raise ValueError(f"{proposal_file}: not a proposal file (no {', '.join(missing)})")
    wanted = {str(d["image_id"]) for d in dataset_dicts}
    index = {str(i): n for n, i in enumerate(proposals["ids"]) if str(i) in wanted}
    absent = [d["image_id"] for d in dataset_dicts if str(d["image_id"]) not in index]
    if absent:
        raise ValueError(
            f"{proposal_file}: no proposals for {len(absent)} image(s) of the dataset, e.g. "
            f"image_id {absent[0]!r}; make it from the same dataset"
        )
    try:
        mode = BoxMode(proposals.get("bbox_mode", BoxMode.XYXY_ABS))
    except ValueError:
        raise ValueError(
            f"{proposal_file}: bbox_mode {proposals['bbox_mode']!r} is not a detectron2 BoxMode"
        ) from None
    for record in dataset_dicts:
        n = index[str(record["image_id"])]
        boxes = np.asarray(proposals["boxes"][n])
        logits = np.asarray(proposals["objectness_logits"][n])
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or logits.shape != boxes.shape[:1]:
            raise ValueError(
                f"{proposal_file}: image_id {record['image_id']!r} has boxes of shape "
                f"{boxes.shape} and objectness_logits of shape {logits.shape}; must be (N, 4) "
                "and (N,)"
            )
        order = logits.argsort()[::-1]
        record["proposal_boxes"] = boxes[order]
        record["proposal_objectness_logits"] = logits[order]
        record["proposal_bbox_mode"] = mode
    return dataset_dicts
