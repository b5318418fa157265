"""Export a ViLD model (TorchScript by tracing, and ONNX), its vocabulary baked in or an input.

The model is traced through detectron2's ``TracingAdapter`` on one (3, H, W) image tensor (already
resized, in ``INPUT.FORMAT`` order, see :meth:`vild_d2.ViLDPredictor.preprocess`). The test
vocabulary is a registered buffer, so the trace holds the chosen classes' embeddings; switch the
vocabulary (``model.set_vocabulary``) BEFORE exporting. The exported graph returns detectron2's
flattened Instances fields (:data:`OUTPUT_FIELDS` order, then the (2,) resized image size) in
the resized image's coordinates, before ``detector_postprocess`` (as detectron2's own deployment
exports do); :func:`outputs_to_instances` turns them back into Instances.

With ``vocabulary_input=True`` the graph takes the vocabulary as inputs instead
(:data:`VOCABULARY_INPUTS`): ``class_embeddings`` (K, D) float32, one L2-normalised CLIP text
embedding per class, K free, and for ViLD-ensemble ``novel_mask`` (K,) bool (True = the novel
rule of :func:`vild_d2.modeling.ensemble_scores`); ``pred_classes`` index those K rows. One file
then serves every vocabulary; :func:`export_text_encoder_onnx` exports CLIP's text tower for
making the embeddings without PyTorch (``vild_d2_runtime``, docs/DEPLOY.md).

The graphs' input and output names, the metadata key and the input checks are the deployment
contract's (``vild_d2_runtime.contract``), which the runtime reads with; an exported ONNX file
runs with ``vild_d2_runtime.run_detector`` (any kind) or ``vild_d2_runtime.Detector``.
"""

import contextlib
import copy
import importlib.util
import json
import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.modeling import GeneralizedRCNN, detector_postprocess
from detectron2.structures import Boxes, Instances
from vild_d2_runtime.contract import (
    DEPLOY_FORMAT,
    DETECTOR_OUTPUTS,
    METADATA_KEY,
    OUTPUT_FIELDS,
    TEXT_ENCODER_FORMAT,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    VOCABULARY_INPUTS,
    check_graph_image,
    check_vocabulary,
)

from .compat import tracing_adapter_class

__all__ = [
    "OUTPUT_FIELDS",
    "VOCABULARY_INPUTS",
    "METADATA_KEY",
    "tracing_adapter",
    "export_torchscript",
    "export_onnx",
    "outputs_to_instances",
    "deploy_metadata",
    "export_text_encoder_onnx",
]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_tracer():
    """Silence the tracer's warnings about detectron2's Python asserts and config branches
    (shape checks, class-agnostic flags): they are constants of one model, not of its input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


# detectron2 modules whose len() must stay a traced size (TracingAdapter patches detectron2's
# own): our inference with scores sizes its background column and per-image split with len().
_LEN_PATCHED = ["vild_d2.modeling.vild_fast_rcnn"]


def _inference_without_postprocess(model, inputs):
    instances = model.inference(inputs, do_postprocess=False)[0]
    return [{"instances": instances}]


def _uses_novel_mask(model) -> bool:
    return model.roi_heads.variant == "ensemble"


def _embed_dim(model) -> int:
    return model.roi_heads.box_predictor.cls_score.embed_dim


def _check_vocabulary_inputs(model, image, class_embeddings, novel_mask):
    """The contract's checks (:func:`vild_d2_runtime.contract.check_vocabulary`) on an eager
    call's tensors: the messages a user of the exported graph gets from the runtime."""
    check_graph_image(image.detach().cpu())
    check_vocabulary(
        class_embeddings.detach().cpu(),
        None if novel_mask is None else novel_mask.detach().cpu(),
        dim=_embed_dim(model),
        uses_novel_mask=_uses_novel_mask(model),
    )
    if class_embeddings.dtype != torch.float32:  # the graph's input type
        raise ValueError(f"class_embeddings: expected float32, got {class_embeddings.dtype}")


@contextlib.contextmanager
def _vocabulary_bound_to(classifier, class_embeddings, novel_mask):
    """The test vocabulary's buffers bound to the graph's inputs for one forward, then put
    back: the trace then reads the inputs where the baked export reads constants. Only the
    tensors the test-time forward reads are bound (its names and novel list stay)."""
    saved = classifier.test_embeddings, classifier.test_is_base
    classifier.test_embeddings = class_embeddings
    if novel_mask is not None:
        classifier.test_is_base = ~novel_mask
    try:
        yield
    finally:
        classifier.test_embeddings, classifier.test_is_base = saved


def _inference_with_vocabulary(model, inputs, class_embeddings, novel_mask=None):
    if not torch.jit.is_tracing():
        _check_vocabulary_inputs(model, inputs[0]["image"], class_embeddings, novel_mask)
    patch_len = _patch_builtin_len()
    with patch_len(_LEN_PATCHED), _vocabulary_bound_to(
        model.roi_heads.box_predictor.cls_score, class_embeddings, novel_mask
    ):
        return _inference_without_postprocess(model, inputs)


def _patch_builtin_len():
    tracing_adapter_class()  # loads detectron2.export (through the bridge if needed)
    from detectron2.export.torchscript_patch import patch_builtin_len

    return patch_builtin_len


def _example_vocabulary(model) -> Tuple[torch.Tensor, ...]:
    """The model's test vocabulary as example inputs to trace with."""
    classifier = model.roi_heads.box_predictor.cls_score
    embeddings = classifier.test_embeddings.detach().float().clone()
    if not _uses_novel_mask(model):
        return (embeddings,)
    return embeddings, ~classifier.test_is_base.detach().clone()


def tracing_adapter(
    model: nn.Module, image: torch.Tensor, vocabulary_input: bool = False
) -> nn.Module:
    """
    Args:
        model: a ViLD (or any :class:`GeneralizedRCNN`) model in eval mode.
        image: (3, H, W) uint8/float image tensor, already resized for the model.
        vocabulary_input: the vocabulary as inputs (a ViLD model only); traced with the
            model's current test vocabulary as the example.
    Returns:
        a ``TracingAdapter``: ``adapter(image)`` (``adapter(image, class_embeddings[,
        novel_mask])`` with ``vocabulary_input``) -> tuple of tensors (:data:`OUTPUT_FIELDS`,
        then the image size).
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
    if not vocabulary_input:
        return adapter_cls(model, [{"image": image}], _inference_without_postprocess).eval()
    if not hasattr(model, "set_vocabulary") or model.roi_heads.variant not in (
        "text",
        "vild",
        "ensemble",
    ):
        raise ValueError(
            "vocabulary-input export needs a ViLD model of variant text, vild or ensemble"
        )
    inputs = ([{"image": image}], *_example_vocabulary(model))
    return adapter_cls(model, inputs, _inference_with_vocabulary).eval()


def deploy_metadata(predictor) -> dict:
    """What a runtime without detectron2 needs besides the graph (JSON-ready): the inputs, how
    to preprocess (``INPUT.FORMAT``, resize), the embedding width, the variant and the training
    vocabulary's names (the classes outside it are novel). ``predictor``: a ViLDPredictor."""
    model, cfg = predictor.model, predictor.cfg
    classifier = model.roi_heads.box_predictor.cls_score
    return {
        "format": DEPLOY_FORMAT,
        "inputs": list(VOCABULARY_INPUTS[: 3 if _uses_novel_mask(model) else 2]),
        "outputs": list(DETECTOR_OUTPUTS),
        "variant": model.roi_heads.variant,
        "embedding_dim": _embed_dim(model),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "mask_threshold": 0.5,
        "train_names": list(classifier.train_vocabulary.names),
        "clip_model": classifier.train_vocabulary.clip_model,
    }


def export_torchscript(
    model: nn.Module,
    image: torch.Tensor,
    path: str,
    vocabulary_input: bool = False,
    metadata: Optional[dict] = None,
) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``image`` ((3, H, W), resized) and save the TorchScript to ``path``.
    Other image sizes work with the traced model too (sizes are traced as tensor ops), and with
    ``vocabulary_input`` other vocabularies (see :func:`tracing_adapter`). ``metadata`` (e.g.
    :func:`deploy_metadata`) is saved as the extra file :data:`METADATA_KEY`.json."""
    adapter = tracing_adapter(model, image, vocabulary_input)
    with torch.no_grad(), _quiet_tracer():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    extra = {f"{METADATA_KEY}.json": json.dumps(metadata)} if metadata else {}
    traced.save(str(Path(path).expanduser()), _extra_files=extra)
    return traced


def export_onnx(
    model: nn.Module,
    image: torch.Tensor,
    path: str,
    opset_version: int = 16,
    vocabulary_input: bool = False,
    metadata: Optional[dict] = None,
) -> None:
    """
    Export ``model`` traced on ``image`` to ONNX (TorchScript-based exporter; RoIAlign needs
    opset >= 16 for its ``aligned`` mode). Needs the ``onnx`` package. ``vocabulary_input``:
    see :func:`tracing_adapter` (K is a dynamic axis); ``metadata`` (e.g.
    :func:`deploy_metadata`) is stored as JSON under :data:`METADATA_KEY` in ``metadata_props``.
    """
    _require_onnx()
    adapter = tracing_adapter(model, image, vocabulary_input)
    names = list(VOCABULARY_INPUTS[: len(adapter.flattened_inputs)])
    dynamic = {"image": {1: "height", 2: "width"}}
    dynamic.update({n: {0: "classes"} for n in names[1:]})
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_tracer():
        torch.onnx.export(
            adapter,
            adapter.flattened_inputs,
            str(path),
            opset_version=opset_version,
            input_names=names,
            output_names=list(DETECTOR_OUTPUTS),
            dynamic_axes=dynamic,
            dynamo=False,
        )
    if metadata:
        _set_onnx_metadata(path, {METADATA_KEY: json.dumps(metadata)})


class _TextTower(nn.Module):
    """CLIP's text tower: (N, L) int64 token ids -> (N, D) float32 embeddings, not normalised
    (the prompt ensemble normalises, averages and normalises again, outside the graph)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(token_ids).float()


def export_text_encoder_onnx(text_encoder, path: str, opset_version: int = 16) -> dict:
    """
    Export the CLIP text tower of ``text_encoder`` (a :class:`vild_d2.text.TextEncoder`) to
    ONNX: input ``token_ids`` (N, L) int64 (L = CLIP's context length, 77 for OpenAI's; N
    dynamic), output ``text_embeddings`` (N, D) float32. Its metadata (:data:`METADATA_KEY`)
    holds the prompt templates, L and the CLIP identity; returns that metadata.
    """
    _require_onnx()
    clip_model = text_encoder.model
    if next(clip_model.parameters()).device.type != "cpu":
        clip_model = copy.deepcopy(clip_model).cpu()  # ONNX is traced on the CPU
    tower = _TextTower(clip_model.float()).eval()
    length = int(clip_model.context_length)
    # Two example prompts of the token layout the encoder makes (start, words, end, zeros).
    tokens = torch.zeros(2, length, dtype=torch.long)
    tokens[:, 0] = _SOT
    tokens[:, 1:3] = 320
    tokens[:, 3] = _EOT
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_tracer():
        torch.onnx.export(
            tower,
            (tokens,),
            str(path),
            opset_version=opset_version,
            input_names=list(TEXT_INPUTS),
            output_names=list(TEXT_OUTPUTS),
            dynamic_axes={name: {0: "prompts"} for name in (*TEXT_INPUTS, *TEXT_OUTPUTS)},
            dynamo=False,
        )
    metadata = {
        "format": TEXT_ENCODER_FORMAT,
        "context_length": length,
        "embedding_dim": int(clip_model.text_projection.shape[1]),
        "templates": list(text_encoder.templates),
        "clip_model": text_encoder.identity,
    }
    _set_onnx_metadata(path, {METADATA_KEY: json.dumps(metadata)})
    return metadata


# CLIP's start and end of text token ids (clip.simple_tokenizer's vocabulary).
_SOT, _EOT = 49406, 49407


def _require_onnx() -> None:
    if importlib.util.find_spec("onnx") is None:
        raise RuntimeError(
            "ONNX export needs the 'onnx' package (pip install onnx); to run the exported "
            "model, 'onnxruntime' too"
        )


def _set_onnx_metadata(path: Path, props: dict) -> None:
    import onnx

    graph = onnx.load(str(path))
    for key, value in props.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


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
