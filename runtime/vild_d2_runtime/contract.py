"""The deployment contract: what ``vild_d2`` (which trains and exports) and ``vild_d2_runtime``
(which runs the exported files) must agree on, written once.

* the exported graphs: their input and output names, the metadata key and what the runtime
  reads of the metadata (:data:`METADATA_KEY`, :data:`VOCABULARY_INPUTS`, ...);
* what goes in: an image (:func:`check_image`), a graph's image and vocabulary inputs
  (:func:`check_graph_image`, :func:`check_vocabulary`, :func:`detector_feeds`);
* class names: typed names (:func:`parse_names`) and ViLD's prompts (:func:`process_name`,
  :func:`fill_prompts`); which names may stand together is :mod:`vild_d2_runtime.names`';
* what comes out: the JSON layout of ``tools/demo.py --json`` (:func:`json_header`,
  :func:`detections_to_json`).

Imports numpy, and CLIP's text clean-up (ftfy, regex) through :mod:`.tokenizer`; never
onnxruntime or torch, so ``vild_d2`` imports it on its side of the export.

Class names are read as CLIP's tokenizer (the ``clip`` package's ``simple_tokenizer``) reads a
text: ftfy's ``fix_text`` (Unicode NFC, fullwidth letters as ASCII, ligatures split), HTML
unescaping, runs of whitespace as one space, lower case. Names that CLIP reads alike ("red  star"
and "red star", composed and decomposed "café", "ｃａｔ" and "cat") then give the same prompts.
A name with a control character (e.g. "\\x00", which CLIP drops without a word) is refused.

Shape shorthand: K = classes, D = embedding width, N = detections.
"""

import functools
import re
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .image import paste_mask, rle_encode
from .tokenizer import _clean

__all__ = [
    "METADATA_KEY",
    "DEPLOY_FORMAT",
    "TEXT_ENCODER_FORMAT",
    "DEPLOY_METADATA_KEYS",
    "TEXT_ENCODER_FILE",
    "OUTPUT_FIELDS",
    "DETECTOR_OUTPUTS",
    "VOCABULARY_INPUTS",
    "TEXT_INPUTS",
    "TEXT_OUTPUTS",
    "GRAPH_KINDS",
    "graph_kind",
    "MIN_IMAGE_SIDE",
    "check_image",
    "check_resized",
    "check_graph_image",
    "check_vocabulary",
    "detector_feeds",
    "check_name_characters",
    "process_name",
    "article",
    "fill_prompts",
    "parse_names",
    "json_header",
    "detections_to_json",
]

# --- the exported graphs ---------------------------------------------------------------------
# The key of the deployment settings (JSON) in an exported file's metadata: ONNX
# ``metadata_props``, TorchScript ``_extra_files`` (as "<key>.json").
METADATA_KEY = "vild_d2"
DEPLOY_FORMAT = "vild_d2.deploy/1"  # the detector's metadata
TEXT_ENCODER_FORMAT = "vild_d2.text_encoder/1"  # the text encoder's metadata
# What the runtime reads of a vocabulary-input detector's metadata (the exporter writes more).
DEPLOY_METADATA_KEYS = (
    "inputs", "outputs", "embedding_dim", "train_names", "input_format", "min_size_test",
    "max_size_test", "mask_threshold",
)  # fmt: skip
TEXT_ENCODER_FILE = "text_encoder.onnx"  # the exporter writes it beside the detector

# A detector's outputs: detectron2's Instances fields, flattened sorted by name (as
# TracingAdapter flattens them; no pred_masks for a box-only model), then the (2,) resized size.
OUTPUT_FIELDS = ("pred_boxes", "pred_classes", "pred_masks", "scores")
DETECTOR_OUTPUTS = (*OUTPUT_FIELDS, "image_size")
# A vocabulary-input detector's inputs: (3, H, W) uint8, (K, D) float32, (K,) bool (True =
# novel; ViLD-ensemble only, the other variants take the first two).
VOCABULARY_INPUTS = ("image", "class_embeddings", "novel_mask")
# The text encoder (CLIP's text tower): (N, L) int64 token ids -> (N, D) float32, not normalised.
TEXT_INPUTS = ("token_ids",)
TEXT_OUTPUTS = ("text_embeddings",)

# What an exported graph is, from its input names.
GRAPH_KINDS = {
    ("image",): "detector with a baked vocabulary",
    VOCABULARY_INPUTS[:2]: "detector with a vocabulary input",
    VOCABULARY_INPUTS: "detector with a vocabulary input",
    TEXT_INPUTS: "text encoder",
}


def graph_kind(input_names: Sequence[str]) -> str:
    """What an exported graph is, from its input names (a value of :data:`GRAPH_KINDS`);
    "unknown" otherwise."""
    return GRAPH_KINDS.get(tuple(input_names), "unknown")


# --- what goes in ----------------------------------------------------------------------------
_EXPECTED = "expected a BGR uint8 (H, W, 3) numpy array (as cv2.imread gives)"
# The smallest side an image may have: below it (a 1 x 1 image, a 3 x 4000 strip) the resize
# scales it up 100-fold or more, and the detector finds its full quota of boxes in a blur.
MIN_IMAGE_SIDE = 8


def check_image(image) -> None:
    """
    Raise unless ``image`` is what the predictor and the runtime read correctly: a numpy
    ``uint8`` array of shape (H, W, 3), BGR, each side at least :data:`MIN_IMAGE_SIDE` px.
    Other arrays are not converted silently (a float image in [0, 1] would be read as nearly
    black, a uint16 one as over-bright); the error says how to convert, the conversion the
    command-line tools apply to files (grayscale: 3 equal channels; 16-bit: value // 257).

    Raises:
        TypeError: not a numpy array (a list, a tensor, a PIL image).
        ValueError: a wrong dtype, shape or an empty image.
    """
    if not isinstance(image, np.ndarray):
        kind = type(image).__name__
        if type(image).__module__.split(".")[0] == "torch":  # told without importing torch
            how = "convert with tensor.cpu().numpy() (a (3, H, W) tensor: .permute(1, 2, 0) first)"
        elif isinstance(image, (list, tuple)):
            how = "one image per call: call the predictor on each image of the list"
        else:
            how = "for a PIL image use np.asarray(img.convert('RGB'))[:, :, ::-1] (RGB -> BGR)"
        raise TypeError(f"{_EXPECTED}, got {kind}; {how}")
    shape = image.shape
    if image.ndim == 2 or (image.ndim == 3 and shape[2] == 1):
        raise ValueError(
            f"{_EXPECTED}, got a grayscale array of shape {shape}; convert with "
            f"cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) (or read with cv2.imread(path))"
        )
    if image.ndim == 3 and shape[2] == 4:
        raise ValueError(
            f"{_EXPECTED}, got 4 channels {shape}; drop alpha with cv2.cvtColor(img, "
            f"cv2.COLOR_BGRA2BGR) (cv2.COLOR_RGBA2BGR if the array is RGBA)"
        )
    if image.ndim == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{_EXPECTED}, got shape {shape} (channels first?); use img.transpose(1, 2, 0)"
        )
    if image.ndim != 3 or shape[2] != 3:
        how = "one image per call (a batch: call on img[i])" if image.ndim == 4 else "convert it"
        raise ValueError(f"{_EXPECTED}, got shape {shape} ({image.ndim} dimensions); {how}")
    if image.size == 0:
        raise ValueError(f"{_EXPECTED}, got an empty image of shape {shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
            how = (
                f"values {lo:.3g}..{hi:.3g}; convert with (img * 255).clip(0, 255)"
                f".astype(np.uint8) if in [0, 1], img.clip(0, 255).astype(np.uint8) if in "
                f"[0, 255]"
            )
        elif image.dtype == np.uint16:
            how = (
                "convert with (img // 257).astype(np.uint8) for the full 16-bit range, or scale "
                "by its maximum, (img * (255 / img.max())).astype(np.uint8), for data of fewer "
                "bits (a 12-bit camera)"
            )
        else:
            how = "convert with img.clip(0, 255).astype(np.uint8) if in [0, 255]"
        raise ValueError(f"{_EXPECTED}, got {image.dtype}; {how}")
    if min(shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"image of {shape[0]}x{shape[1]} (HxW) px is too small or too elongated for the "
            f"detector: each side needs at least {MIN_IMAGE_SIDE} px"
        )


def check_resized(height: int, width: int, new_h: int, new_w: int, settings: str = "") -> None:
    """ValueError for an image whose test-time resize (to ``new_h`` x ``new_w``) leaves a side
    of 0 px (a 3 x 4000 strip), naming both sizes; ``settings``: the resize's, for the message."""
    if min(new_h, new_w) < 1:
        raise ValueError(
            f"image of {height}x{width} (HxW) px is too elongated: resized for the model"
            f"{settings} it would be {new_h}x{new_w} px; crop it or cut it into tiles"
        )


def check_graph_image(image) -> np.ndarray:
    """A detector graph's image input, (3, H, W) uint8 with H, W >= 1 (resized, in the model's
    channel order), as an array; ValueError naming what was given otherwise."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"image: expected a (3, H, W) uint8 array, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 (the resized image), got {array.dtype}")
    if min(array.shape[1:]) < 1:
        raise ValueError(f"image: expected (3, H, W) with H, W >= 1, got {array.shape}")
    return array


def check_vocabulary(
    class_embeddings, novel_mask, *, dim: Optional[int], uses_novel_mask: bool
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """
    A vocabulary-input graph's vocabulary, checked before it runs (ValueError otherwise):
    class_embeddings (K, D) floating, finite, K >= 1, D = ``dim`` (None: not checked), returned
    as float32; novel_mask (K,) bool when ``uses_novel_mask`` (ViLD-ensemble), else None.
    """
    emb = np.asarray(class_embeddings)
    if emb.ndim != 2:
        raise ValueError(
            f"class_embeddings: expected (K, D) = (classes, {dim}), got shape {emb.shape}"
        )
    if dim is not None and emb.shape[1] != dim:
        raise ValueError(
            f"class_embeddings are {emb.shape[1]}-d but this model's region embeddings are "
            f"{dim}-d: encode the names with the model's own text encoder (the one exported "
            "with it)"
        )
    if emb.shape[0] == 0:
        raise ValueError("class_embeddings: empty vocabulary (K = 0): give at least one class")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"class_embeddings: expected float32, got {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise ValueError(
            f"class_embeddings: NaN or infinite values in rows {np.flatnonzero(bad)[:10].tolist()}"
        )
    if not uses_novel_mask:
        if novel_mask is not None:
            raise ValueError("novel_mask: only ViLD-ensemble models take one")
        return emb, None
    if novel_mask is None:
        raise ValueError("novel_mask: this ViLD-ensemble model needs one ((K,) bool)")
    mask = np.asarray(novel_mask)
    if mask.dtype != np.bool_ or mask.shape != (len(emb),):
        raise ValueError(
            f"novel_mask: expected ({len(emb)},) bool, one per class, got {mask.shape} {mask.dtype}"
        )
    return emb, mask


def detector_feeds(
    input_names: Sequence[str],
    image,
    class_embeddings=None,
    novel_mask=None,
    dim: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """
    The feeds of an exported detector whose inputs are ``input_names``, every input checked
    before the graph runs. Which kind the graph is is read from its input names: a vocabulary
    for a baked graph, none for a vocabulary-input one, or a text encoder, is refused
    (ValueError saying what to do).

    Args:
        image: (3, H, W) uint8, resized (:func:`check_graph_image`).
        class_embeddings, novel_mask: a vocabulary-input graph's (:func:`check_vocabulary`;
            ``dim`` its D).
    """
    names = tuple(input_names)
    kind = graph_kind(names)
    if kind == "text encoder":
        raise ValueError("this ONNX file is a text encoder (input token_ids), not a detector")
    takes_vocabulary = kind == "detector with a vocabulary input"
    if class_embeddings is None and takes_vocabulary:
        raise ValueError(
            f"this ONNX file takes the vocabulary as input ({', '.join(names)}): pass "
            "class_embeddings (K, D)" + (" and novel_mask (K,)" if "novel_mask" in names else "")
        )
    if class_embeddings is not None and not takes_vocabulary:
        raise ValueError(
            f"this ONNX file has its vocabulary baked in (inputs: {', '.join(names)}): it cannot "
            "take class_embeddings; export with --vocabulary-input to choose classes at run time"
        )
    feeds = {"image": check_graph_image(image)}
    if takes_vocabulary:
        emb, mask = check_vocabulary(
            class_embeddings, novel_mask, dim=dim, uses_novel_mask="novel_mask" in names
        )
        feeds["class_embeddings"] = emb
        if mask is not None:
            feeds["novel_mask"] = mask
    return feeds


# --- class names and prompts -----------------------------------------------------------------
def check_name_characters(name: str) -> None:
    """Raise ValueError, naming the name and the character, for a control character (a tab
    counts as a space) or a lone surrogate: characters no one types on purpose, that CLIP drops
    or cannot read."""
    if not isinstance(name, str):
        raise ValueError(f"class name {name!r} is a {type(name).__name__}, not text")
    for i, ch in enumerate(name):
        kind = unicodedata.category(ch)
        if (kind == "Cc" and ch != "\t") or kind == "Cs":
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise ValueError(
                f"class name {shown!r} has a control character (U+{ord(ch):04X} at position "
                f"{i + 1}): remove it"
            )


@functools.lru_cache(maxsize=1 << 16)
def process_name(name: str) -> str:
    """The name as CLIP reads it (see the module's docstring), then ViLD's rules: '_' as a
    space, '/' as ' or ', trailing dots removed. 'Traffic_light' -> 'traffic light', 'a/b.' ->
    'a or b', 'ｃａｔ' -> 'cat', 'red  star' -> 'red star'. ValueError for a control
    character."""
    check_name_characters(name)
    text = _clean(name).replace("_", " ").replace("/", " or ")
    return " ".join(text.split()).rstrip(".").rstrip()


def article(name: str) -> str:
    """'an' if the processed name starts with a vowel, else 'a'."""
    return "an" if process_name(name).startswith(tuple("aeiou")) else "a"


def fill_prompts(name: str, templates: Sequence[str]) -> List[str]:
    """
    Fill every template with the processed ``name`` ("{}" = name, "{article}" = a/an); returns
    len(templates) prompts.

    As in the official ViLD code, a filled prompt starting with "a" or "the" gets the prefix
    "This is ". The test is a plain, case-sensitive ``str.startswith``, so prompts starting
    with e.g. "art" or "another" are prefixed too, and "A photo" is not.
    """
    processed = process_name(name)
    if not processed:
        raise ValueError(f"class name {name!r} is empty after processing")
    art = article(name)
    prompts = [t.format(processed, article=art) for t in templates]
    return ["This is " + p if p.startswith(("a", "the")) else p for p in prompts]


def parse_names(text: str) -> List[str]:
    """Typed class names, the one rule of every entry point (tools, predictor, server, the
    runtime): ``"red star, blue cross"`` (commas or new lines) -> ``["red star", "blue cross"]``.

    Returns [] for a text with no name at all (the caller says whether that is allowed).

    Raises:
        ValueError: an empty item between names ("red star,,blue cross"), naming it.
    """
    items = [n.strip() for n in re.split(r"[,\n]", (text or "").strip())]
    if not any(items):
        return []
    empty = [i + 1 for i, n in enumerate(items) if not n]
    if empty:
        raise ValueError(
            f"empty class name (item {empty[0]} of {len(items)}) in {text[:200]!r}: remove the "
            "extra comma"
        )
    return items


# --- what comes out --------------------------------------------------------------------------
def json_header(names: Sequence[str]) -> dict:
    """The first keys of a detections file: the vocabulary and how boxes and masks are coded."""
    return {
        "vocabulary": list(names),
        "bbox_mode": "XYWH_ABS",
        "segmentation": "COCO RLE (pycocotools), original image size",
    }


def detections_to_json(
    dets: Dict[str, object],
    names: Sequence[str],
    image_size: Optional[Tuple[int, int]] = None,
    mask_threshold: float = 0.5,
) -> List[dict]:
    """
    Detections -> list of JSON-ready records (``category_id``, ``category_name``, ``score``,
    ``bbox`` XYWH, ``segmentation`` COCO RLE), one mask encoded at a time.

    Args:
        dets: "boxes" (N, 4) XYXY, "scores" (N,), "classes" (N,) indices into ``names``, in the
            original image's coordinates; masks (mask models) either "masks", whose ``[i]`` is
            detection i's (H, W) bool mask (an (N, H, W) array, or a sequence that pastes one
            when asked), or "mask_probs" (N, M, M), pasted into the image of ``image_size``
            (H, W) at ``mask_threshold`` one at a time (one H x W mask in memory at once).
    """
    if "mask_probs" in dets and image_size is None:
        raise ValueError("detections_to_json: mask_probs need the image_size (H, W)")
    scratch = np.zeros(image_size, dtype=bool) if "mask_probs" in dets else None
    out = []
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(dets["boxes"]).tolist()):
        cls = int(dets["classes"][i])
        record = {
            "category_id": cls,
            "category_name": names[cls],
            "score": round(float(dets["scores"][i]), 5),
            "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        }
        if "masks" in dets:
            record["segmentation"] = rle_encode(np.asarray(dets["masks"][i], dtype=bool))
        elif scratch is not None:
            scratch[:] = False
            paste_mask(dets["mask_probs"][i], dets["boxes"][i], image_size, mask_threshold, scratch)
            record["segmentation"] = rle_encode(scratch)
        out.append(record)
    return out
