"""Export a ViLD model with its vocabulary baked in: TorchScript (tracing) and ONNX.

The model is traced through detectron2's ``TracingAdapter`` on one (3, H, W) image tensor (already
resized, in ``INPUT.FORMAT`` order, see :meth:`vild_d2.ViLDPredictor.preprocess`). The test
vocabulary is a registered buffer, so the trace holds the chosen classes' embeddings; switch the
vocabulary (``model.set_vocabulary``) BEFORE exporting. The exported graph returns detectron2's
flattened Instances fields (:data:`OUTPUT_FIELDS` order, then the (2,) resized image size) in
the resized image's coordinates, before ``detector_postprocess`` (as detectron2's own deployment
exports do); :func:`outputs_to_instances` turns them back into Instances.
"""

import contextlib
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.modeling import GeneralizedRCNN, detector_postprocess
from detectron2.structures import Boxes, Instances

from .compat import tracing_adapter_class

__all__ = [
    "OUTPUT_FIELDS",
    "tracing_adapter",
    "export_torchscript",
    "export_onnx",
    "outputs_to_instances",
]

logger = logging.getLogger(__name__)

# Order of the flattened outputs: TracingAdapter flattens an Instances' fields sorted by name.
OUTPUT_FIELDS = ("pred_boxes", "pred_classes", "pred_masks", "scores")


@contextlib.contextmanager
def _quiet_tracer():
    """Silence the tracer's warnings about detectron2's Python asserts and config branches
    (shape checks, class-agnostic flags): they are constants of one model, not of its input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _inference_without_postprocess(model, inputs):
    instances = model.inference(inputs, do_postprocess=False)[0]
    return [{"instances": instances}]


def tracing_adapter(model: nn.Module, image: torch.Tensor) -> nn.Module:
    """
    Args:
        model: a ViLD (or any :class:`GeneralizedRCNN`) model in eval mode.
        image: (3, H, W) uint8/float image tensor, already resized for the model.
    Returns:
        a ``TracingAdapter``: ``adapter(image)`` -> tuple of tensors (:data:`OUTPUT_FIELDS`).
    """
    if not isinstance(model, GeneralizedRCNN):
        raise TypeError(f"export needs a GeneralizedRCNN-like model, got {type(model).__name__}")
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before exporting it")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got {tuple(image.shape)}")
    adapter_cls = tracing_adapter_class()
    # eval() too: a new Module is in training mode, and exporters that restore the mode they
    # found (torch.onnx.export) would otherwise put the whole model back into training.
    return adapter_cls(model, [{"image": image}], _inference_without_postprocess).eval()


def export_torchscript(model: nn.Module, image: torch.Tensor, path: str) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``image`` ((3, H, W), resized) and save the TorchScript to ``path``.
    Other image sizes work with the traced model too (sizes are traced as tensor ops)."""
    adapter = tracing_adapter(model, image)
    with torch.no_grad(), _quiet_tracer():
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(Path(path).expanduser()))
    return traced


def export_onnx(model: nn.Module, image: torch.Tensor, path: str, opset_version: int = 16) -> None:
    """
    Export ``model`` traced on ``image`` to ONNX (TorchScript-based exporter; RoIAlign needs
    opset >= 16 for its ``aligned`` mode). Needs the ``onnx`` package.
    """
    if importlib.util.find_spec("onnx") is None:
        raise RuntimeError(
            "ONNX export needs the 'onnx' package (pip install onnx); to run the exported "
            "model, 'onnxruntime' too"
        )
    adapter = tracing_adapter(model, image)
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_tracer():
        torch.onnx.export(
            adapter,
            (image,),
            str(Path(path).expanduser()),
            opset_version=opset_version,
            input_names=["image"],
            output_names=[*OUTPUT_FIELDS, "image_size"],
            dynamic_axes={"image": {1: "height", 2: "width"}},
            dynamo=False,
        )


def outputs_to_instances(
    outputs: Sequence[torch.Tensor],
    original_size: Optional[Tuple[int, int]] = None,
    mask_threshold: float = 0.5,
) -> Instances:
    """
    Rebuild Instances from an exported model's flattened outputs (:data:`OUTPUT_FIELDS`, or
    without ``pred_masks`` for a box-only model, then the (2,) resized image size) and, with
    ``original_size`` (H, W), rescale them to the original image like the predictor does.
    """
    outputs = [torch.as_tensor(o) for o in outputs]
    if len(outputs) == len(OUTPUT_FIELDS) + 1:
        names = OUTPUT_FIELDS
    elif len(outputs) == len(OUTPUT_FIELDS):
        names = tuple(f for f in OUTPUT_FIELDS if f != "pred_masks")
    else:
        raise ValueError(
            f"expected {len(OUTPUT_FIELDS) + 1} outputs ({', '.join(OUTPUT_FIELDS)}, image size) "
            f"or {len(OUTPUT_FIELDS)} without masks, got {len(outputs)}"
        )
    fields = dict(zip(names, outputs))
    inst = Instances(tuple(int(x) for x in outputs[-1]))
    inst.pred_boxes = Boxes(fields["pred_boxes"])
    inst.scores = fields["scores"]
    inst.pred_classes = fields["pred_classes"]
    if "pred_masks" in fields:
        inst.pred_masks = fields["pred_masks"]
    if original_size is None:
        return inst
    return detector_postprocess(inst, original_size[0], original_size[1], mask_threshold)
