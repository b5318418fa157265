"""``OfficialViLDRCNN`` (META_ARCHITECTURE): :class:`vild_d2.modeling.ViLDRCNN` with the
official input pipeline.

* every image: RGB, / 255, ImageNet mean/std (MODEL.PIXEL_MEAN / PIXEL_STD on the 0-255 scale,
  divided by 255 here), zero-padded to a fixed IMAGE_SIZE x IMAGE_SIZE canvas (larger
  training images to the backbone's size divisibility);
* test time: the image (the original one: set INPUT.MIN_SIZE_TEST 0 so the mapper leaves it)
  is first resized, its longer side to IMAGE_SIZE, with TF's legacy bilinear resize;
* the RPN and the box post-processing clip to the whole canvas, [0, IMAGE_SIZE - 1], as the
  official code does (its ``image_info[1]`` is the canvas); detections are then mapped back to
  the input image as the official evaluation does with the official configs (not clipped to
  the image, masks pasted by its ``paste_instance_masks``: OFFICIAL.CLIP_BOXES_TO_IMAGE False,
  OFFICIAL.PASTE_MASKS "official"; :mod:`vild_d2.official.masks`), or as detectron2 does
  (``detector_postprocess``).
"""

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances

from ..modeling import ViLDRCNN
from .masks import official_postprocess
from .preprocessing import legacy_resize_bilinear, official_scaled_size

__all__ = ["OfficialViLDRCNN"]


@META_ARCH_REGISTRY.register()
class OfficialViLDRCNN(ViLDRCNN):
    """ViLD with the official (TensorFlow) preprocessing; see the module docstring."""

    @configurable
    def __init__(self, *, image_size: int = 1024, paste_masks: str = "detectron2",
                 clip_boxes_to_image: bool = True, **kwargs):  # fmt: skip
        """
        Args:
            image_size: the square canvas (and the test-time longer side), 1024 officially.
            paste_masks: "official" (the official evaluation's ``paste_instance_masks``) or
                "detectron2" (``paste_masks_in_image``).
            clip_boxes_to_image: clip the detections to the input image and drop the ones left
                empty (detectron2's ``detector_postprocess``; the official evaluation does not).
            kwargs: as :class:`ViLDRCNN`.
        """
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.paste_masks = paste_masks
        self.clip_boxes_to_image = bool(clip_boxes_to_image)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        official = cfg.MODEL.VILD.OFFICIAL
        ret["image_size"] = official.IMAGE_SIZE
        ret["paste_masks"] = official.PASTE_MASKS
        ret["clip_boxes_to_image"] = official.CLIP_BOXES_TO_IMAGE
        return ret

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) 0-255 image in the input format -> RGB, / 255, mean/std normalised."""
        image = image.to(self.device).float()
        if self.input_format == "BGR":
            image = image.flip(0)
        mean = self.pixel_mean / 255.0
        std = self.pixel_std / 255.0
        if self.input_format == "BGR":  # PIXEL_MEAN / PIXEL_STD follow the input format
            mean, std = mean.flip(0), std.flip(0)
        return (image * (1.0 / 255.0) - mean) / std

    def _canvas(self, images: List[torch.Tensor]) -> ImageList:
        """Pad to the fixed canvas; its size is every image's clipping size."""
        div = self.backbone.size_divisibility
        side = max([self.image_size, *(max(x.shape[-2:]) for x in images)])
        side = int(math.ceil(side / div) * div)
        tensor = torch.stack(
            [F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2])) for x in images]
        )
        return ImageList(tensor, [(side, side)] * len(images))

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Training (and :meth:`ViLDRCNN.forward`): the mapper's images, normalised, padded."""
        return self._canvas([self._normalize(x["image"]) for x in batched_inputs])

    def preprocess_for_inference(self, batched_inputs: List[Dict]
                                 ) -> Tuple[ImageList, List[Tuple[int, int]]]:  # fmt: skip
        """Normalise, resize (longer side to the canvas, legacy bilinear), pad. Returns the
        canvas ImageList and each resized image's (h, w)."""
        images, sizes = [], []
        for x in batched_inputs:
            image = self._normalize(x["image"])
            size = official_scaled_size(image.shape[-2], image.shape[-1], self.image_size)
            if size != tuple(image.shape[-2:]):
                image = legacy_resize_bilinear(image, size)
            images.append(image)
            sizes.append(size)
        return self._canvas(images), sizes

    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        """As :meth:`GeneralizedRCNN.inference`. Without post-processing, the Instances are in
        the resized image's pixels and carry its size (what ``detector_postprocess`` needs)."""
        assert not self.training
        images, sizes = self.preprocess_for_inference(batched_inputs)
        features = self.backbone(images.tensor)
        if detected_instances is None:
            proposals, _ = self.proposal_generator(images, features, None)
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            detected_instances = [x.to(self.device) for x in detected_instances]
            results = self.roi_heads.forward_with_given_boxes(features, detected_instances)
        results = [Instances(size, **r.get_fields()) for r, size in zip(results, sizes)]
        if not do_postprocess:
            return results
        processed = []
        for r, x in zip(results, batched_inputs):
            height = x.get("height", x["image"].shape[-2])
            width = x.get("width", x["image"].shape[-1])
            processed.append({"instances": self.rescale_detections(r, height, width, True)})
        return processed

    def rescale_detections(self, results: Instances, height: int, width: int,
                           paste: bool = False) -> Instances:  # fmt: skip
        """:meth:`inference`'s un-postprocessed ``results`` -> the input image's ``height`` x
        ``width``, as the config's PASTE_MASKS and CLIP_BOXES_TO_IMAGE say (both detectron2's:
        ``detector_postprocess``). ``paste`` False keeps the masks (N, M, M), pasted one at a
        time when used (what :class:`vild_d2.ViLDPredictor` asks for)."""
        if paste and self.paste_masks == "detectron2" and self.clip_boxes_to_image:
            return detector_postprocess(results, height, width)
        return official_postprocess(results, height, width, self.paste_masks,
                                    self.clip_boxes_to_image, paste_now=paste)  # fmt: skip
