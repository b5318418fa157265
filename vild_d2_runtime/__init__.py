"""vild_d2_runtime: an exported ViLD detector with any vocabulary, without PyTorch or detectron2.

Imports only numpy, onnxruntime, ftfy and regex (CLIP's tokenizer rules), and is deliberately
outside the ``vild_d2`` package (whose ``__init__`` imports torch and detectron2). It runs the
files of ``tools/export_model.py --format onnx --vocabulary-input``: ``model.onnx`` (inputs
image, class_embeddings, novel_mask) and ``text_encoder.onnx`` (CLIP's text tower); the prompt
ensemble, preprocessing and post-processing are numpy. See docs/DEPLOY.md.

    from vild_d2_runtime import Detector
    detector = Detector("exported/model.onnx", cache_dir="~/.cache/vild_d2_runtime")
    dets = detector(cv2.imread("photo.jpg"), ["red star", "blue cross"])
"""

from .detector import Detector, check_vocabulary, detections_to_json, json_header
from .graphs import GraphKindError, graph_kind
from .image import check_image
from .prompts import fill_prompts, parse_names, process_name
from .text import TextEncoder
from .tokenizer import Tokenizer

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
]
