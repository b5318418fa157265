"""Dataset mapper that carries ViLD's distillation boxes through the training augmentations.

Dataset dict fields added by this project (both optional, but given together):

* ``"distill_boxes"``: array-like, shape (M, 4), float. Distillation boxes (precomputed
  class-agnostic proposals) in XYXY_ABS, in the coordinates of the ORIGINAL image
  (``file_name`` as stored on disk, before any augmentation).
* ``"distill_embeddings"``: array-like, shape (M, D), float. The CLIP image embedding of each
  box (row i belongs to box i).

With ``MODEL.VILD.DISTILL.STORES`` both are :class:`LazyTarget` references into precomputed
stores, joined to the dicts by ``image_id`` when the dataset is loaded
(:mod:`vild_d2.distill.targets`); the mapper reads them with an explicit ``load()`` (a disk
read, or online a CLIP forward). In training, the mapper
pops both and returns ``dataset_dict["distill"]``, an
:class:`Instances` of the output image size with fields ``boxes`` (:class:`Boxes`, (M', 4)
float32, output-image coordinates) and ``embeddings`` (Tensor (M', D) float32), where M' <= M
after boxes that a crop made empty are dropped. At inference the two fields are dropped.
"""

import abc
import logging

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances

__all__ = ["LazyTarget", "ViLDDatasetMapper", "build_lsj_augmentation"]

logger = logging.getLogger(__name__)


class LazyTarget(abc.ABC):
    """A dataset-dict value read only when the mapper needs it (a few bytes in the dict until
    then, so a dataset of 100k images holds no targets in memory)."""

    @abc.abstractmethod
    def load(self) -> np.ndarray:
        """The array: (M, 4) boxes or (M, D) embeddings, float32."""


def _load_target(value, dtype) -> np.ndarray:
    """A distillation field as an array: a :class:`LazyTarget` is loaded, anything else (an
    array, a list) is taken as it is."""
    if isinstance(value, LazyTarget):
        value = value.load()
    return np.asarray(value, dtype=dtype)


DISTILL_BOXES = "distill_boxes"
DISTILL_EMBEDDINGS = "distill_embeddings"


def build_lsj_augmentation(cfg):
    """
    Large-scale jitter (official ViLD recipe): random flip, resize so that the image fits in
    ``IMAGE_SIZE * s`` (s ~ U[MIN_SCALE, MAX_SCALE]), then a random crop / pad to
    ``IMAGE_SIZE x IMAGE_SIZE``.

    Returns:
        list[Augmentation]
    """
    lsj = cfg.MODEL.VILD.LSJ
    size = lsj.IMAGE_SIZE
    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    augs.append(T.ResizeScale(lsj.MIN_SCALE, lsj.MAX_SCALE, target_height=size, target_width=size))
    augs.append(T.FixedSizeCrop(crop_size=(size, size)))
    return augs


class ViLDDatasetMapper(DatasetMapper):
    """
    :class:`DatasetMapper` that also maps the distillation boxes and embeddings (see the module
    docstring), with optional large-scale jitter (``cfg.MODEL.VILD.LSJ``).

    The distillation boxes are transformed by the very same ``transforms`` object as the image
    and the gt annotations (one sampled transform list per image). The official ViLD code flips
    them with an independent coin, so about half of its targets are mirrored;
    ``official_double_flip`` (MODEL.VILD.OFFICIAL.DOUBLE_FLIP) reproduces that.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, official_double_flip: bool = False, **kwargs):
        super().__init__(is_train, **kwargs)
        self.official_double_flip = official_double_flip

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["official_double_flip"] = is_train and cfg.MODEL.VILD.OFFICIAL.DOUBLE_FLIP
        if is_train and cfg.MODEL.VILD.LSJ.ENABLED:
            if cfg.INPUT.CROP.ENABLED:
                logger.warning("MODEL.VILD.LSJ.ENABLED: INPUT.CROP is ignored (LSJ crops itself).")
            ret.update(
                augmentations=build_lsj_augmentation(cfg),
                # Like detectron2 for crops: a cropped mask's tight box can be smaller than the
                # crop of its box.
                recompute_boxes=cfg.MODEL.MASK_ON,
            )
        return ret

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one image in Detectron2 Dataset format, optionally with
                "distill_boxes" (M, 4) and "distill_embeddings" (M, D).

        Returns:
            dict: as :class:`DatasetMapper`, plus "distill" (:class:`Instances`) in training
                when the input had distillation fields.
        """
        try:
            return self._map(dataset_dict)
        except OSError as e:  # PIL's "image file is truncated" does not say which file
            file_name = dataset_dict.get("file_name", "<no file_name>")
            if file_name in str(e):
                raise
            raise OSError(
                f"{file_name}: cannot read image ({type(e).__name__}: {e}); training stops on an "
                "unreadable image: replace the file, or remove it from the dataset's annotations"
            ) from e

    def _map(self, dataset_dict):
        has_distill = DISTILL_BOXES in dataset_dict or DISTILL_EMBEDDINGS in dataset_dict
        if not has_distill:
            return super().__call__(dataset_dict)

        # Shallow copy: the caller's dict must not change; the base class deep-copies it.
        dataset_dict = dict(dataset_dict)
        if not self.is_train:
            dataset_dict.pop(DISTILL_BOXES, None)
            dataset_dict.pop(DISTILL_EMBEDDINGS, None)
            return super().__call__(dataset_dict)

        # DatasetMapper.__call__ only calls _transform_annotations (the one hook that sees the
        # sampled transforms) when "annotations" exists. An image without gt then gets an empty
        # "instances", which is what it is.
        dataset_dict.setdefault("annotations", [])
        return super().__call__(dataset_dict)

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        if DISTILL_BOXES in dataset_dict or DISTILL_EMBEDDINGS in dataset_dict:
            boxes, embeddings = _read_distill_fields(dataset_dict)
            if self.official_double_flip:
                transforms = independent_flip(transforms, dataset_dict["width"])
            dataset_dict["distill"] = transform_distill_boxes(
                boxes, embeddings, transforms, image_shape
            )


def independent_flip(transforms, width: int):
    """The official parser's flip of the distillation boxes (vild_parser.py: image, gt AND
    distillation boxes flipped with one coin, then image and gt flipped AGAIN with another, so
    the distillation boxes follow a coin independent of the image's): ``transforms`` with its
    horizontal flip of the ``width``-pixel original image replaced by a fresh fair coin."""
    rest = [t for t in transforms.transforms if not isinstance(t, T.HFlipTransform)]
    if np.random.rand() < 0.5:
        rest.insert(0, T.HFlipTransform(width))
    return T.TransformList(rest)


def _read_distill_fields(dataset_dict):
    """
    Pop and check the distillation fields.

    Returns:
        boxes (ndarray (M, 4) float64), embeddings (ndarray (M, D) float32; (0, 0) if M = 0
        and D is unknown)
    """
    file_name = dataset_dict.get("file_name", "<no file_name>")
    if DISTILL_BOXES not in dataset_dict or DISTILL_EMBEDDINGS not in dataset_dict:
        raise ValueError(
            f"{file_name}: '{DISTILL_BOXES}' and '{DISTILL_EMBEDDINGS}' must be given together."
        )
    # float64 like detectron2's path for XYXY_ABS gt boxes (transform, then float32), so that a
    # distillation box and a gt box with the same input coordinates come out bit-identical.
    boxes = _load_target(dataset_dict.pop(DISTILL_BOXES), np.float64)
    embeddings = _load_target(dataset_dict.pop(DISTILL_EMBEDDINGS), np.float32)
    # An empty list has shape (0,): accept it as "no boxes".
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if embeddings.size == 0 and embeddings.ndim != 2:
        embeddings = embeddings.reshape(0, 0)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{file_name}: '{DISTILL_BOXES}' must have shape (M, 4) in XYXY_ABS, got "
            f"{tuple(boxes.shape)}."
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"{file_name}: '{DISTILL_EMBEDDINGS}' must have shape (M, D), got "
            f"{tuple(embeddings.shape)}."
        )
    if len(boxes) != len(embeddings):
        raise ValueError(
            f"{file_name}: {len(boxes)} '{DISTILL_BOXES}' but {len(embeddings)} "
            f"'{DISTILL_EMBEDDINGS}'; they must match one to one."
        )
    return boxes, embeddings


def transform_distill_boxes(boxes, embeddings, transforms, image_shape):
    """
    Apply the image's transforms to the distillation boxes, clip them to the output image and
    drop those that became empty, together with their embeddings.

    Args:
        boxes (ndarray): (M, 4) XYXY_ABS in the original image.
        embeddings (ndarray): (M, D).
        transforms (TransformList): the transforms applied to the image.
        image_shape (tuple): (h, w) of the transformed image.

    Returns:
        Instances: of size ``image_shape``, with ``boxes`` (Boxes (M', 4)) and
        ``embeddings`` (Tensor (M', D)).
    """
    if len(boxes):
        # Same calls as utils.transform_instance_annotations for gt boxes.
        boxes = transforms.apply_box(boxes)
    boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    boxes.clip(image_shape)
    # Same threshold as utils.filter_empty_instances for gt boxes.
    keep = boxes.nonempty(threshold=1e-5)
    instances = Instances(image_shape)
    instances.boxes = boxes[keep]
    instances.embeddings = torch.as_tensor(embeddings, dtype=torch.float32)[keep]
    return instances
