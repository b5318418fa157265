"""The vocabulary-input detector without PyTorch: image + class names -> detections, in the
layout of ``tools/demo.py --json`` (:func:`.contract.detections_to_json` encodes them).

Shape shorthand: K = classes, D = embedding width, N = detections.
"""

import collections
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .contract import DEPLOY_METADATA_KEYS, TEXT_ENCODER_FILE, check_image, check_resized
from .graphs import open_graph, run_detector
from .image import PastedMasks, postprocess_boxes, resize_bilinear, resized_shape
from .names import check_distinguishable, name_key, truncation_message
from .text import TextEncoder

__all__ = ["Detector", "Detections"]

logger = logging.getLogger(__name__)

Detections = Dict[str, np.ndarray]


class Detector:
    """
    ``Detector("exported/model.onnx")(bgr_image, ["red star", "blue cross"])``: a
    vocabulary-input detector (``tools/export_model.py --format onnx --vocabulary-input``) and
    its text encoder (``text_encoder.onnx`` beside it). A vocabulary's embeddings and novel mask
    are kept in a small LRU, and each name's embedding in the text encoder's cache, so a
    vocabulary seen before costs a lookup.
    """

    def __init__(
        self,
        model: str,
        text_encoder: Union[str, TextEncoder, None] = None,
        *,
        cache_dir: Optional[str] = None,
        threads: int = 0,
        vocabulary_cache_size: int = 8,
        providers: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            model: the detector's ONNX file.
            text_encoder: its text encoder's ONNX file (default: beside ``model``), or a
                :class:`TextEncoder` (its name cache then shared).
            cache_dir: name embeddings cached on disk here too (None = memory only).
            threads: ONNX Runtime intra-op threads (0 = its default).
            vocabulary_cache_size: resolved vocabularies kept in memory.
            providers: ONNX Runtime execution providers (default: the CPU's), e.g.
                ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` with onnxruntime-gpu.
        """
        kind = "detector with a vocabulary input"
        self.session, self.meta = open_graph(model, kind, threads, providers)
        missing = [k for k in DEPLOY_METADATA_KEYS if k not in self.meta]
        if missing:
            raise ValueError(
                f"{model}: its metadata lacks {', '.join(missing)}: export it again with this "
                "version's tools/export_model.py --vocabulary-input"
            )
        self.uses_novel_mask = "novel_mask" in self.meta["inputs"]
        self.dim = int(self.meta["embedding_dim"])
        # A name is base when CLIP reads it as a training name (vild_d2's rule, the duplicate
        # check's name_key): "RED  Circle" has "red circle"'s embedding, and so its scoring.
        self.train_keys = {name_key(n) for n in self.meta["train_names"]}
        if isinstance(text_encoder, TextEncoder):  # shared by several detectors
            self.text_encoder = text_encoder
        else:
            path = text_encoder or Path(model).expanduser().parent / TEXT_ENCODER_FILE
            self.text_encoder = TextEncoder(
                str(path), cache_dir=cache_dir, threads=threads, providers=providers
            )
        path = self.text_encoder.path
        if self.text_encoder.dim != self.dim:
            raise ValueError(
                f"the text encoder {path} makes {self.text_encoder.dim}-d embeddings but the "
                f"detector's region embeddings are {self.dim}-d: use the text encoder exported "
                "with this model"
            )
        self._vocabularies = collections.OrderedDict()
        self._cache_size = vocabulary_cache_size

    def vocabulary(
        self, names: Sequence[str], novel: Optional[Sequence[str]] = None
    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(K, D) class embeddings and (K,) novel mask (None unless ViLD-ensemble) of ``names``;
        novel = the names outside the model's training vocabulary (compared as CLIP reads them:
        :func:`.names.name_key`, as ``vild_d2``) unless ``novel`` lists them."""
        names = [str(n).strip() for n in names]
        key = (tuple(names), None if novel is None else tuple(novel))
        hit = self._vocabularies.get(key)
        if hit is not None:
            self._vocabularies.move_to_end(key)
            return hit
        if not names or not all(names):
            raise ValueError(f"empty vocabulary or empty class name in {names!r}")
        # vild_d2's rule: control characters, and names CLIP reads alike, are refused.
        encoder = self.text_encoder
        truncated = check_distinguishable(
            names, encoder.templates, encoder.tokenizer.encode, None, encoder.context_length
        )
        if truncated:
            logger.warning(truncation_message(truncated, encoder.context_length))
        if novel is not None and set(novel) - set(names):
            raise ValueError(
                f"novel classes not among the class names: {sorted(set(novel) - set(names))}"
            )
        novel_set = (
            set(novel)
            if novel is not None
            else {n for n in names if name_key(n) not in self.train_keys}
        )
        mask = (
            np.array([n in novel_set for n in names], dtype=bool) if self.uses_novel_mask else None
        )
        value = (self.text_encoder.encode(names), mask)
        self._vocabularies[key] = value
        while len(self._vocabularies) > self._cache_size:
            self._vocabularies.popitem(last=False)
        return value

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) BGR uint8 -> the graph's (3, h, w) uint8 image (INPUT.FORMAT, resized)."""
        check_image(image)
        if self.meta["input_format"] == "RGB":
            image = image[:, :, ::-1]
        h, w = image.shape[:2]
        new_h, new_w = resized_shape(h, w, self.meta["min_size_test"], self.meta["max_size_test"])
        check_resized(h, w, new_h, new_w)
        return np.ascontiguousarray(resize_bilinear(image, new_h, new_w).transpose(2, 0, 1))

    def run(self, image_chw: np.ndarray, class_embeddings, novel_mask=None) -> List[np.ndarray]:
        """The graph on a preprocessed (3, h, w) uint8 image and a vocabulary, inputs checked
        first (:func:`.graphs.run_detector`); returns its outputs (pred_boxes, pred_classes,
        pred_masks, scores, image_size)."""
        return run_detector(self.session, image_chw, class_embeddings, novel_mask)

    def __call__(
        self,
        image: np.ndarray,
        names: Sequence[str],
        novel: Optional[Sequence[str]] = None,
        *,
        score_threshold: float = 0.0,
        paste_masks: bool = True,
    ) -> Detections:
        """
        Args:
            image: (H, W, 3) BGR uint8 (as cv2.imread gives).
            names: the K class names to detect.
            novel: the novel ones (ViLD-ensemble's scoring); default: those outside training.
            score_threshold: detections below it are dropped before any mask is pasted.
            paste_masks: False = "mask_probs" (N, M, M) float32 instead of "masks".
        Returns:
            {"boxes": (N, 4) XYXY, "scores": (N,), "classes": (N,) indices into ``names``,
            "masks": (N, H, W) bool (mask models)}, in the original image's coordinates.
            "masks" is a :class:`.image.PastedMasks`: ``masks[i]`` pastes mask i when read, so
            memory does not grow with image size x detections (N x H x W bytes pasted at once:
            3.6 GB for 100 masks of 6000 x 6000 px); ``np.asarray(masks)`` pastes them all.
        """
        emb, mask = self.vocabulary(names, novel)
        original = image.shape[:2] if isinstance(image, np.ndarray) else None
        outputs = self.run(self.preprocess(image), emb, mask)
        fields = dict(zip(self.meta["outputs"], outputs))
        resized = tuple(int(v) for v in fields["image_size"])
        boxes, keep = postprocess_boxes(fields["pred_boxes"], resized, original)
        keep &= fields["scores"] >= score_threshold
        dets = {
            "boxes": boxes[keep],
            "scores": fields["scores"][keep],
            "classes": fields["pred_classes"][keep].astype(np.int64),
        }
        if "pred_masks" in fields:
            probs = fields["pred_masks"][keep][:, 0]
            if not paste_masks:
                dets["mask_probs"] = probs
            else:
                threshold = self.meta["mask_threshold"]
                dets["masks"] = PastedMasks(probs, dets["boxes"], original, threshold)
        return dets
