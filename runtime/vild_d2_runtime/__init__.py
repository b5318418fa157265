"""vild_d2_runtime: an exported ViLD detector with any vocabulary, without PyTorch or detectron2.

Imports only numpy, onnxruntime, ftfy and regex (CLIP's tokenizer rules), and is deliberately
outside the ``vild_d2`` package (whose ``__init__`` imports torch and detectron2). It runs the
files of ``tools/export_model.py --format onnx --vocabulary-input``: ``model.onnx`` (inputs
image, class_embeddings, novel_mask) and ``text_encoder.onnx`` (CLIP's text tower); the prompt
ensemble, preprocessing and post-processing are numpy. What the exporter and the runtime agree on
(graph input and output names, input checks, class names and prompts, the JSON layout) is
:mod:`vild_d2_runtime.contract`, which ``vild_d2`` imports too. See docs/DEPLOY.md.

    from vild_d2_runtime import Detector
    detector = Detector("exported/model.onnx", cache_dir="~/.cache/vild_d2_runtime")
    dets = detector(cv2.imread("photo.jpg"), ["red star", "blue cross"])
"""

import importlib

# Imported when first used (PEP 562): ``vild_d2`` imports the contract (.contract, .names)
# without onnxruntime, which only the graphs (.graphs, .detector, .text) need.
_PUBLIC = {
    "Detector": ".detector",
    "check_image": ".contract",
    "check_vocabulary": ".contract",
    "detections_to_json": ".contract",
    "fill_prompts": ".contract",
    "graph_kind": ".contract",
    "json_header": ".contract",
    "parse_names": ".contract",
    "process_name": ".contract",
    "GraphKindError": ".graphs",
    "run_detector": ".graphs",
    "TextEncoder": ".text",
    "Tokenizer": ".tokenizer",
}

__all__ = [
    "Detector",
    "GraphKindError",
    "TextEncoder",
    "Tokenizer",
    "check_image",
    "check_vocabulary",
    "detections_to_json",
    "fill_prompts",
    "graph_kind",
    "json_header",
    "parse_names",
    "process_name",
    "run_detector",
]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
