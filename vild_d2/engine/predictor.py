"""``ViLDPredictor``: detectron2's ``DefaultPredictor`` for ViLD, with run-time vocabularies."""

import collections
import logging
from pathlib import Path
from typing import Hashable, Sequence, Union

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model

from ..checkpoint import ViLDCheckpointer
from ..text import Vocabulary, parse_names

__all__ = ["ViLDPredictor", "vocabulary_from_cli"]

logger = logging.getLogger(__name__)

VocabularySpec = Union[Vocabulary, str, Sequence[str]]


def vocabulary_from_cli(vocabulary: str = "", custom: str = "") -> Union[str, list, None]:
    """
    The tools' ``--vocabulary`` / ``--custom-vocabulary`` pair as a spec for
    :meth:`ViLDPredictor.set_vocabulary`: "custom" (or no ``--vocabulary`` with custom names) ->
    the comma-separated names; another value is passed on (built-in name, file, dataset);
    neither -> None (keep the checkpoint's vocabulary).
    """
    if vocabulary == "custom" or (not vocabulary and custom):
        names = parse_names(custom or "")
        if not names:
            raise ValueError(
                'empty vocabulary: --vocabulary custom needs --custom-vocabulary "name1,name2,..."'
            )
        return names
    if custom:
        raise ValueError(
            f"--custom-vocabulary is only used with --vocabulary custom (got {vocabulary!r})"
        )
    return vocabulary or None


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
            ViLDCheckpointer(self.model).load(
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
        self.metadata = self._make_metadata(self.vocabulary)

    # ----------------------------------------------------------------------------------------
    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary the model detects now."""
        return self.model.vocabulary

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
        if isinstance(spec, (list, tuple)):
            names = [str(n).strip() for n in spec]
            if not names or not all(names):
                raise ValueError(f"empty vocabulary or empty class name in {list(spec)!r}")
            spec = names
        key = self._cache_key(spec)
        vocab = self._vocabularies.get(key) if key is not None else None
        if vocab is None:
            vocab = self.model.set_vocabulary(spec)  # resolves (disk cache) and installs
            if key is not None and self._cache_size > 0:
                self._vocabularies[key] = vocab
                while len(self._vocabularies) > self._cache_size:
                    self._vocabularies.popitem(last=False)
        else:
            self._vocabularies.move_to_end(key)
            self.model.set_vocabulary(vocab)  # a Vocabulary: no encoding, only the buffers
        self.metadata = self._make_metadata(vocab)
        return vocab

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
    def __call__(self, original_image: np.ndarray) -> dict:
        """
        Args:
            original_image: (H, W, 3) uint8 image, BGR (as ``cv2.imread`` gives).
        Returns:
            ``{"instances": Instances}`` with ``pred_boxes`` (XYXY), ``scores``, ``pred_classes``
            (indices into :attr:`vocabulary`) and ``pred_masks`` (mask models), in the original
            image's coordinates.
        """
        if not (
            isinstance(original_image, np.ndarray)
            and original_image.ndim == 3
            and original_image.shape[2] == 3
        ):
            shape = getattr(original_image, "shape", type(original_image).__name__)
            raise ValueError(f"expected an (H, W, 3) image array, got {shape}")
        with torch.no_grad():
            return self.model([self.preprocess(original_image)])[0]

    def preprocess(self, original_image: np.ndarray) -> dict:
        """(H, W, 3) image -> the model's input dict (resized (3, h, w) tensor + original size)."""
        if self.input_format == "RGB":  # the input is BGR, as with DefaultPredictor
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        image = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {"image": image, "height": height, "width": width}
