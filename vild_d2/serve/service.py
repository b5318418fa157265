"""What the web page and the HTTP API share: checking a request (images, vocabulary, threshold),
detecting with a :class:`vild_d2.ViLDPredictor`, and the answer in the layout of
``tools/demo.py --json``. No web framework is imported here."""

import atexit
import io
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances

from ..text.categories import BUILTIN_VOCABULARIES
from ..data.images import SAMPLE_PHOTOS, sample_photo
from ..engine.detections import detections_to_json, draw_detections, json_header
from ..engine.predictor import ViLDPredictor
from ..text import Vocabulary, parse_names

__all__ = ["BadInput", "DetectionService", "Detections", "Limits", "parse_names_text"]

logger = logging.getLogger(__name__)

MODEL_VOCABULARY = "model"  # the built-in choice "the vocabulary stored with the weights"
OFFERED_BUILTINS = ("lvis", "coco", "voc", "objects365")


class BadInput(ValueError):
    """A request the server refuses; ``status`` is the HTTP status (4xx) the API answers."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; above it the request is refused with a message."""

    max_names: int = 2000  # typed class names (LVIS has 1203); built-in vocabularies are exempt
    max_megapixels: float = 25.0  # per image
    # per request, all images together: the decoded images are held until the answer is made
    # (3 bytes a pixel, plus one full-size mask at a time: masks are pasted one by one)
    max_request_megapixels: float = 100.0
    max_upload_mb: float = 64.0  # per file, checked as the upload arrives
    max_images: int = 16  # per request
    # Slow clients: a request's headers within this many seconds, its body within it plus 1 s
    # per 16 KB (vild_d2.serve.guard); an idle connection is closed after keep_alive_s.
    slow_timeout_s: float = 20.0
    keep_alive_s: float = 5.0


@dataclass
class Detections:
    """One request's answer: the vocabulary, per image (name, BGR image, Instances on CPU
    already filtered by the threshold), and the time taken."""

    vocabulary: Vocabulary
    novel: torch.Tensor  # (K,) bool
    threshold: float
    images: List[Tuple[str, np.ndarray, Instances]]
    timing_ms: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The layout of ``tools/demo.py --json``, plus ``novel_classes``, ``threshold`` and
        ``time_ms``."""
        names = self.vocabulary.names
        out = json_header(names)
        out["novel_classes"] = [n for n, is_novel in zip(names, self.novel.tolist()) if is_novel]
        out["threshold"] = self.threshold
        out["images"] = [
            {
                "file_name": name,
                "height": bgr.shape[0],
                "width": bgr.shape[1],
                "detections": detections_to_json(instances, names),
            }
            for name, bgr, instances in self.images
        ]
        out["errors"] = []  # a request with a bad input is refused whole (BadInput)
        out["time_ms"] = dict(self.timing_ms)
        return out

    def pictures(self) -> List[Tuple[np.ndarray, str]]:
        """(RGB picture with boxes and masks, caption) per image; novel classes marked."""
        meta = Metadata(name="vild_d2_serve", thing_classes=list(self.vocabulary.names))
        novel = self.novel.tolist()
        return [
            (draw_detections(bgr, instances, meta, novel)[:, :, ::-1], name)
            for name, bgr, instances in self.images
        ]


def parse_names_text(text: str) -> List[str]:
    """A request's typed names by :func:`vild_d2.text.parse_names` (the tools' rule); no name
    at all, or an empty item between names, is a 400."""
    try:
        names = parse_names(text)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if not names:
        raise BadInput("empty vocabulary: type class names separated by commas, or pick one")
    return names


Upload = Union[bytes, BinaryIO]  # an uploaded file's bytes, or the file (binary, seekable)


def open_image(data: Upload, name: str, limits: Limits) -> Image.Image:
    """The uploaded image, opened (its header read, no pixel decoded yet) and checked: not
    empty, not over the per-file and per-image limits. A file is read from where it lies (a
    temporary file of the upload), never whole into memory."""
    if isinstance(data, (bytes, bytearray)):
        size, stream = len(data), io.BytesIO(data)
    else:
        size, stream = data.seek(0, io.SEEK_END), data
        stream.seek(0)
    if not size:
        raise BadInput(f"{name}: empty file")
    if size > limits.max_upload_mb * 2**20:
        raise BadInput(
            f"{name}: {size / 2**20:.1f} MB, above this server's {limits.max_upload_mb:g} MB "
            "per file",
            413,
        )
    try:
        image = Image.open(stream)
    except UnidentifiedImageError:
        raise BadInput(f"{name}: not an image (PNG, JPEG, BMP, WebP, TIFF, ...)", 415) from None
    except Image.DecompressionBombError as e:  # PIL's own bound, far above ours
        raise BadInput(f"{name}: {e}", 413) from None
    w, h = image.size
    if w * h > limits.max_megapixels * 1e6:
        raise BadInput(
            f"{name}: {w}x{h} px ({w * h / 1e6:.1f} megapixels), above this server's "
            f"{limits.max_megapixels:g} megapixels: downscale it (the model sees it at about "
            "1 megapixel anyway)",
            413,
        )
    return image


def decode_image(data, name: str, limits: Limits) -> np.ndarray:
    """Uploaded bytes (or an image from :func:`open_image`) -> BGR uint8 (H, W, 3), as
    ``cv2.imread`` reads the file (EXIF rotation applied). The size is checked from the header,
    before any pixel is decoded."""
    image = data if isinstance(data, Image.Image) else open_image(data, name, limits)
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16-bit (or 32-bit) grayscale
            # PIL's convert("RGB") clips such values at 255 (a near-white picture); the tools'
            # rule (runtime/vild_d2_runtime/contract.py, check_image): value // 257.
            gray = (np.asarray(image).astype(np.int64) // 257).clip(0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
        image = image.convert("RGB")
    except Exception as e:  # truncated or corrupt data: PIL's errors are open-ended
        raise BadInput(f"{name}: cannot decode the image (corrupt or truncated?): {e}") from None
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def find_samples(cfg, limit: int = 6) -> Tuple[Dict[str, str], Optional[str]]:
    """Sample images for the page: the first images of the config's test dataset when they are
    on disk and its annotation file is small (the shapes world's val images), else
    scikit-image's photos, written to a temporary folder (removed at exit). Returns ({name:
    path}, that folder or None)."""
    for dataset in cfg.DATASETS.TEST:
        json_file = MetadataCatalog.get(dataset).get("json_file", None)
        # LVIS's val annotations are ~200 MB: not worth loading for a few sample pictures.
        if not (json_file and Path(json_file).is_file()):
            continue
        if Path(json_file).stat().st_size > 20e6:
            continue
        try:
            dicts = DatasetCatalog.get(dataset)
        except Exception as e:  # samples are a nicety: never stop the server for them
            logger.warning("No samples from %s: %s", dataset, e)
            continue
        paths = [d["file_name"] for d in dicts[: 4 * limit] if Path(d["file_name"]).is_file()]
        if paths:
            return {Path(p).name: p for p in paths[:limit]}, None
    folder = Path(tempfile.mkdtemp(prefix="vild_d2_samples_"))
    atexit.register(shutil.rmtree, folder, True)  # also when the server is not shut down cleanly
    samples = {}
    for name in SAMPLE_PHOTOS:
        path = folder / f"{name}.png"
        Image.fromarray(sample_photo(name)).save(path)
        samples[path.name] = str(path)
    return samples, str(folder)


class DetectionService:
    """
    Detects a vocabulary in uploaded images with one :class:`ViLDPredictor`, for any number of
    concurrent requests: each request's vocabulary goes with its own forward (the predictor's
    lock), resolved vocabularies stay in the predictor's LRU and the text encoder's disk cache.
    """

    def __init__(
        self,
        predictor: ViLDPredictor,
        *,
        limits: Limits = Limits(),
        samples: Optional[Dict[str, str]] = None,
        threshold: float = 0.5,
        title: str = "",
    ):
        """
        Args:
            samples: {name: path} of sample images the page offers (None: :func:`find_samples`).
            threshold: default score threshold.
            title: what the page calls the model (e.g. the config file).
        """
        self.predictor = predictor
        self.limits = limits
        self._temporary: List[str] = []  # folders this service made (removed by close())
        if samples is None:
            samples, folder = find_samples(predictor.cfg)
            self._temporary += [folder] if folder else []
        self.samples = dict(samples)
        self.threshold = threshold
        self.title = title
        # The built-in vocabularies offered: the model's own, the test datasets', the usual
        # ones. Resolved on first use (then cached), so the server starts at once.
        datasets = [d for d in predictor.cfg.DATASETS.TEST if d in DatasetCatalog.list()]
        self.builtins = [MODEL_VOCABULARY, *datasets, *OFFERED_BUILTINS]
        self._model_vocabulary = predictor.vocabulary
        assert set(OFFERED_BUILTINS) <= set(BUILTIN_VOCABULARIES)

    def temporary_folder(self, prefix: str, parent: Optional[str] = None) -> str:
        """A new temporary folder of this service (in ``parent``, default the system's),
        removed by :meth:`close` (and at exit)."""
        folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
        atexit.register(shutil.rmtree, folder, True)
        self._temporary.append(folder)
        return folder

    def close(self) -> None:
        """Remove the temporary folders this service wrote (sample photos, the page's JSON
        downloads): the server calls it on shutdown."""
        while self._temporary:
            shutil.rmtree(self._temporary.pop(), ignore_errors=True)

    def info(self) -> dict:
        """What a client needs to know: the vocabularies offered, the limits, the samples."""
        return {
            "model": self.title,
            "model_vocabulary": list(self._model_vocabulary.names),
            "builtin_vocabularies": self.builtins,
            "threshold": self.threshold,
            "score_floor": float(self.predictor.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
            "limits": vars(self.limits),
            "samples": list(self.samples),
        }

    # ----------------------------------------------------------------------------------------
    def vocabulary(self, names: str = "", builtin: str = "") -> Vocabulary:
        """The request's vocabulary: typed names (comma-separated) or a built-in one."""
        if names and names.strip() and builtin:
            raise BadInput("give either class names or a built-in vocabulary, not both")
        if builtin:
            if builtin not in self.builtins:
                raise BadInput(
                    f"unknown vocabulary {builtin!r}: choose one of {', '.join(self.builtins)}, "
                    "or type class names"
                )
            if builtin == MODEL_VOCABULARY:
                return self._model_vocabulary
            spec = builtin
        else:
            spec = parse_names_text(names)
            if len(spec) > self.limits.max_names:
                raise BadInput(
                    f"{len(spec)} class names, above this server's limit of "
                    f"{self.limits.max_names} (each new name is encoded by CLIP): use fewer, "
                    f"or a built-in vocabulary ({', '.join(OFFERED_BUILTINS)})",
                    413,
                )
        try:
            return self.predictor.resolve_vocabulary(spec)
        except (ValueError, FileNotFoundError) as e:  # duplicates, a missing dataset file ...
            raise BadInput(str(e)) from None

    @staticmethod
    def threshold_value(value, default: float) -> float:
        if value is None or (isinstance(value, str) and not value.strip()):
            return default
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise BadInput(f"threshold must be a number in [0, 1], got {value!r}") from None
        if not 0.0 <= value <= 1.0:
            raise BadInput(f"threshold must be in [0, 1], got {value}")
        return value

    def detect(
        self,
        files: Sequence[Tuple[str, Upload]],
        names: str = "",
        builtin: str = "",
        threshold=None,
    ) -> Detections:
        """
        Args:
            files: (name, encoded bytes or a binary file) per image, at least one.
            names, builtin: the vocabulary (:meth:`vocabulary`).
            threshold: score threshold in [0, 1] (None: the default).
        Raises:
            BadInput: anything wrong with the request; nothing is detected then.
        """
        start = time.perf_counter()
        if not files:
            raise BadInput("no image: send one or more image files (multipart field 'image')")
        if len(files) > self.limits.max_images:
            raise BadInput(f"{len(files)} images, above {self.limits.max_images} per request", 413)
        threshold = self.threshold_value(threshold, self.threshold)
        # Every input is checked before the model runs: a bad one refuses the request whole.
        # Headers first: the request's total pixels are known before any pixel is decoded.
        opened = [(name, open_image(data, name, self.limits)) for name, data in files]
        total = sum(image.size[0] * image.size[1] for _, image in opened)
        if total > self.limits.max_request_megapixels * 1e6:
            raise BadInput(
                f"{len(files)} images of {total / 1e6:.1f} megapixels in all, above this "
                f"server's {self.limits.max_request_megapixels:g} megapixels per request: send "
                "fewer images per request, or smaller ones",
                413,
            )
        images = [(name, decode_image(image, name, self.limits)) for name, image in opened]
        decoded = time.perf_counter()
        vocab = self.vocabulary(names, builtin)
        resolved = time.perf_counter()
        results = []
        for name, bgr in images:
            try:
                # Masks kept at the mask head's size, pasted one at a time for the answer.
                out = self.predictor(bgr, vocabulary=vocab, paste_masks=False)
                instances = out["instances"].to("cpu")
            except ValueError as e:  # the predictor's own checks (a 4000 x 3 strip, ...)
                raise BadInput(f"{name}: {e}") from None
            results.append((name, bgr, instances[instances.scores >= threshold]))
        done = time.perf_counter()
        timing = {
            "decode": (decoded - start) * 1e3,
            "vocabulary": (resolved - decoded) * 1e3,
            "detection": (done - resolved) * 1e3,
            "total": (done - start) * 1e3,
        }
        return Detections(
            vocab,
            self.predictor.novel_mask(vocab),
            threshold,
            results,
            {k: round(v, 1) for k, v in timing.items()},
        )

    def read_samples(self, chosen: Sequence[str]) -> List[Tuple[str, bytes]]:
        """(name, bytes) of the chosen sample images (only names the server offers)."""
        unknown = [c for c in chosen if c not in self.samples]
        if unknown:
            raise BadInput(f"unknown sample {unknown[0]!r}")
        return [(c, Path(self.samples[c]).read_bytes()) for c in chosen]
