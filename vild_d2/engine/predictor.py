"""``ViLDPredictor``: detectron2's ``DefaultPredictor`` for ViLD, with run-time vocabularies."""

import collections
import logging
import threading
from pathlib import Path
from typing import Hashable, Optional, Sequence, Union

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.structures import Instances, ROIMasks
from vild_d2_runtime.contract import check_image, check_resized

from ..checkpoint import ViLDCheckpointer
from ..text import Vocabulary, resolve_vocabulary

__all__ = ["ViLDPredictor", "rescale_detections"]

logger = logging.getLogger(__name__)

VocabularySpec = Union[Vocabulary, str, Sequence[str]]


class ViLDPredictor:
    """
    Like detectron2's ``DefaultPredictor``: builds the model from ``cfg`` (eval mode), loads
    ``cfg.MODEL.WEIGHTS`` with :class:`vild_d2.ViLDCheckpointer` (the vocabulary saved in the
    checkpoint comes back with it, unless ``MODEL.VILD.TEST_VOCABULARY`` names one), takes one
    BGR ``(H, W, 3)`` uint8 image (converted to ``INPUT.FORMAT``), resizes it by
    ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` and returns ``{"instances": ...}`` in the
    original image's coordinates.

    :meth:`set_vocabulary` switches what it detects (names, a built-in vocabulary, a saved
    vocabulary file, a registered dataset) through the model's own ``set_vocabulary``; resolved
    vocabularies are kept in a small in-memory LRU, and the text encoder caches embeddings on
    disk, so switching back costs milliseconds. :attr:`metadata` (``thing_classes`` = the
    vocabulary's names) follows, ready for detectron2's ``Visualizer``.

    Thread-safe: the model's test vocabulary is one set of buffers shared by every caller, so
    a switch and the forward that uses it happen under one lock (forwards run one at a time).
    ``predictor(image, vocabulary=v)`` detects ``v`` for that call only, whatever other threads
    ask for at the same moment; :meth:`resolve_vocabulary` gives the ``Vocabulary`` whose names
    its ``pred_classes`` index.
    """

    def __init__(self, cfg, vocabulary_cache_size: int = 8):
        """
        Args:
            cfg: a config with the ViLD node (``add_vild_config``); it is cloned.
            vocabulary_cache_size: resolved vocabularies kept in memory (0 = none).
        """
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if not hasattr(self.model, "set_vocabulary"):
            raise TypeError(
                f"ViLDPredictor needs a ViLD model (MODEL.META_ARCHITECTURE 'ViLDRCNN'), "
                f"got {type(self.model).__name__}"
            )
        if cfg.MODEL.WEIGHTS:
            # The checkpoint's vocabulary comes back with the weights unless the config names
            # one (MODEL.VILD.TEST_VOCABULARY), which then wins, as in --eval-only.
            explicit = bool(cfg.MODEL.VILD.TEST_VOCABULARY)
            ViLDCheckpointer(self.model, complete=True).load(
                cfg.MODEL.WEIGHTS, checkpointables=[] if explicit else None
            )
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")
        self._cache_size = vocabulary_cache_size
        self._vocabularies = collections.OrderedDict()  # key -> Vocabulary, most recent last
        self._cache_lock = threading.Lock()  # the LRU above
        # One encoding at a time (the CLIP text tower and its disk cache), without holding up
        # forwards of vocabularies already resolved.
        self._encode_lock = threading.Lock()
        self._model_lock = threading.Lock()  # a vocabulary switch + the forward that uses it
        self._vocabulary = self.model.vocabulary  # what calls without vocabulary= detect
        self.metadata = self._make_metadata(self._vocabulary)

    # ----------------------------------------------------------------------------------------
    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary the predictor detects (calls without ``vocabulary=``)."""
        return self._vocabulary

    def set_vocabulary(self, spec: VocabularySpec) -> Vocabulary:
        """
        Detect ``spec`` from now on.

        Args:
            spec: a list of class names, a built-in vocabulary ("lvis", "coco", "coco_ov",
                "voc", "objects365"), a saved vocabulary file (``tools/build_text_classifier.py``),
                a registered dataset's name, or a :class:`Vocabulary`.
        Returns:
            the resolved :class:`Vocabulary` (also :attr:`vocabulary`).
        """
        vocab = self.resolve_vocabulary(spec)
        with self._model_lock:
            self._install(vocab)
            self._vocabulary = vocab
            self.metadata = self._make_metadata(vocab)
        return vocab

    def resolve_vocabulary(self, spec: VocabularySpec) -> Vocabulary:
        """
        ``spec`` (as :meth:`set_vocabulary` takes) as a :class:`Vocabulary`, without switching:
        from the in-memory LRU, else encoded (or read from the disk cache) by the model's text
        encoder. Raises ``ValueError`` for an empty vocabulary or name, an unknown built-in.
        """
        if isinstance(spec, (list, tuple)):
            names = [str(n).strip() for n in spec]
            if not names or not all(names):
                raise ValueError(f"empty vocabulary or empty class name in {list(spec)!r}")
            spec = names
        key = self._cache_key(spec)
        if key is None:
            return spec
        vocab = self._cached(key)
        if vocab is None:
            with self._encode_lock:
                vocab = self._cached(key)  # another thread may have made it while we waited
                if vocab is None:
                    if self.model.text_encoder is None:
                        raise ValueError("this model has no text encoder: pass a Vocabulary")
                    vocab = resolve_vocabulary(
                        spec, self.model.text_encoder, use_synonyms=self.model.use_synonyms
                    )
                    if self._cache_size > 0:
                        with self._cache_lock:
                            self._vocabularies[key] = vocab
                            while len(self._vocabularies) > self._cache_size:
                                self._vocabularies.popitem(last=False)
        return vocab

    def novel_mask(self, vocab: Vocabulary) -> torch.Tensor:
        """(K,) bool, True = a class of ``vocab`` the model never saw boxes of: the vocabulary's
        own novel mask if it has one, else the names outside the training vocabulary."""
        train_names = self.model.roi_heads.box_predictor.cls_score.train_vocabulary.names
        return ~vocab.is_base_for(train_names).bool()

    def _cached(self, key: Hashable):
        with self._cache_lock:
            vocab = self._vocabularies.get(key)
            if vocab is not None:
                self._vocabularies.move_to_end(key)
            return vocab

    def _install(self, vocab: Vocabulary) -> None:
        """Make the model's buffers hold ``vocab`` (call with the model lock held)."""
        if self.model.vocabulary is not vocab:
            self.model.set_vocabulary(vocab)  # a Vocabulary: no encoding, only the buffers

    @staticmethod
    def _cache_key(spec: VocabularySpec) -> Hashable:
        """In-memory cache key; a file's key includes its size and mtime (so a rewrite is seen);
        None = do not cache (a Vocabulary object is already resolved)."""
        if isinstance(spec, Vocabulary):
            return None
        if isinstance(spec, list):
            return ("names", tuple(spec))
        path = Path(spec).expanduser()
        if path.is_file():
            st = path.stat()
            return ("file", str(path.resolve()), st.st_size, st.st_mtime_ns)
        return ("name", spec)

    @staticmethod
    def _make_metadata(vocab: Vocabulary) -> Metadata:
        meta = Metadata(name=f"vild_vocabulary_{len(vocab)}")
        meta.thing_classes = list(vocab.names)
        return meta

    # ----------------------------------------------------------------------------------------
    def __call__(
        self,
        original_image: np.ndarray,
        vocabulary: Optional[VocabularySpec] = None,
        paste_masks: bool = True,
    ) -> dict:
        """
        Args:
            original_image: one (H, W, 3) uint8 image, BGR (as ``cv2.imread`` gives). Anything
                else (float, uint16, grayscale, 4 channels, a batch, a list, a tensor, an empty
                or too elongated image, one under 8 px on a side) raises ``TypeError`` /
                ``ValueError`` saying how to convert it: see
                :func:`vild_d2_runtime.contract.check_image`.
            vocabulary: what to detect in this call only (as :meth:`set_vocabulary` takes;
                pass the result of :meth:`resolve_vocabulary` to know the names); None =
                :attr:`vocabulary`.
            paste_masks: False = keep ``pred_masks`` as the mask head's (N, M, M) outputs
                (``ROIMasks``, pasted one at a time by ``vild_d2.engine.detections``): the
                memory then does not grow with image size x detections (the demo, the server).
        Returns:
            ``{"instances": Instances}`` with ``pred_boxes`` (XYXY), ``scores``, ``pred_classes``
            (indices into that vocabulary) and ``pred_masks`` (mask models), in the original
            image's coordinates.
        """
        inputs = self.preprocess(original_image)
        vocab = self._vocabulary if vocabulary is None else self.resolve_vocabulary(vocabulary)
        # The buffers are switched only when the last forward used another vocabulary, and
        # left as they are after: no restore cost for a stream of calls with one vocabulary.
        with self._model_lock, torch.no_grad():
            if vocabulary is None:
                vocab = self._vocabulary  # a set_vocabulary() may have run while we waited
            self._install(vocab)
            if paste_masks:
                return self.model([inputs])[0]
            raw = self.model.inference([inputs], do_postprocess=False)[0]
        # A model that maps detections back its own way (the official configs: as the official
        # evaluation, vild_d2/official/masks.py) says so with its own rescale_detections.
        rescale = getattr(self.model, "rescale_detections", rescale_detections)
        return {"instances": rescale(raw, inputs["height"], inputs["width"])}

    def preprocess(self, original_image: np.ndarray) -> dict:
        """(H, W, 3) BGR uint8 image (checked as in :meth:`__call__`) -> the model's input dict
        (resized (3, h, w) tensor + original size)."""
        check_image(original_image)
        height, width = original_image.shape[:2]
        if self.input_format == "RGB":  # the input is BGR, as with DefaultPredictor
            original_image = original_image[:, :, ::-1]
        transform = self.aug.get_transform(original_image)
        # INPUT.MIN_SIZE_TEST 0 (the official configs: the model resizes) gives a NoOpTransform.
        new_h, new_w = getattr(transform, "new_h", height), getattr(transform, "new_w", width)
        # A 3 x 4000 strip's short side would be resized to 0 px: say so, not a PIL error.
        settings = (
            f" (INPUT.MIN_SIZE_TEST {self.cfg.INPUT.MIN_SIZE_TEST}, MAX_SIZE_TEST "
            f"{self.cfg.INPUT.MAX_SIZE_TEST})"
        )
        check_resized(height, width, new_h, new_w, settings)
        image = transform.apply_image(original_image)
        image = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {"image": image, "height": height, "width": width}


def rescale_detections(results: Instances, height: int, width: int) -> Instances:
    """
    detectron2's ``detector_postprocess`` (boxes scaled to ``height`` x ``width``, clipped,
    empty ones dropped) without pasting the masks: ``pred_masks`` stays the mask head's
    (N, M, M) probabilities as :class:`ROIMasks`, pasted by :func:`mask_of` when needed
    (the same pixels as detectron2's full-size masks).
    """
    scale_x, scale_y = width / results.image_size[1], height / results.image_size[0]
    results = Instances((height, width), **results.get_fields())
    boxes = results.pred_boxes
    boxes.scale(scale_x, scale_y)
    boxes.clip(results.image_size)
    results = results[boxes.nonempty()]
    if results.has("pred_masks") and not isinstance(results.pred_masks, ROIMasks):
        results.pred_masks = ROIMasks(results.pred_masks[:, 0, :, :])
    return results
