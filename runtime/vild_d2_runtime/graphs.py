"""Opening and running exported graphs: an ONNX Runtime session, what kind of graph it is (read
from its input names, :func:`.contract.graph_kind`) and the deployment settings the exporter
stored in its metadata; a detector graph run on checked inputs (:func:`run_detector`)."""

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime

from .contract import METADATA_KEY, detector_feeds, graph_kind

__all__ = ["GraphKindError", "open_graph", "run_detector"]


class GraphKindError(ValueError):
    """An ONNX file of another kind than the one asked for (e.g. a baked-vocabulary detector
    where a vocabulary-input one is needed)."""


def open_graph(
    path: str, want: str, threads: int = 0, providers: Optional[Sequence[str]] = None
) -> Tuple[onnxruntime.InferenceSession, dict]:
    """
    Open ``path`` as a graph of kind ``want`` (a value of :data:`.contract.GRAPH_KINDS`);
    returns (session, metadata). Raises FileNotFoundError, GraphKindError naming what the file
    is and what to do, or ValueError for a file ONNX Runtime cannot load (empty, truncated, not
    ONNX) or metadata that is not the exporter's.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not an ONNX file")
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not an ONNX model: export it again")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(
            str(path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as e:  # ONNX Runtime's own errors (InvalidProtobuf, Fail, ...): no base
        why = str(e).split("failed:", 1)[-1].strip().splitlines()[0][:200]
        raise ValueError(
            f"{path}: not a loadable ONNX model (truncated, corrupt, or another kind of file?): "
            f"{why}"
        ) from None
    names = tuple(i.name for i in session.get_inputs())
    kind = graph_kind(names)
    if kind != want:
        hint = ""
        if kind == "detector with a baked vocabulary":
            hint = (
                ": its classes were fixed at export; export the model again with `tools/"
                "export_model.py --format onnx --vocabulary-input` to choose them at run time"
            )
        elif kind == "detector with a vocabulary input":
            hint = ": pass it as the detector (--model), and text_encoder.onnx as the text encoder"
        elif kind == "text encoder":
            hint = ": pass it as the text encoder, and model.onnx as the detector"
        raise GraphKindError(f"{path} is a {kind} (inputs: {', '.join(names)}), not a {want}{hint}")
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise GraphKindError(
            f"{path} has no '{METADATA_KEY}' metadata: it was not written by "
            "tools/export_model.py --vocabulary-input"
        )
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise GraphKindError(f"{path}: its '{METADATA_KEY}' metadata is not the exporter's JSON")
    return session, meta


def run_detector(
    session: onnxruntime.InferenceSession, image, class_embeddings=None, novel_mask=None
) -> List[np.ndarray]:
    """
    Run an exported detector (baked or vocabulary-input) on a resized (3, H, W) uint8 image
    and, for a vocabulary-input graph, its vocabulary: (K, D) float32 class embeddings and, for
    ViLD-ensemble, the (K,) bool novel mask. Every input is checked, and a call of the other
    kind refused, before the graph runs (ValueError, :func:`.contract.detector_feeds`).

    Returns:
        the outputs, :data:`.contract.DETECTOR_OUTPUTS` (no pred_masks for a box-only model).
    """
    inputs = session.get_inputs()
    names = tuple(i.name for i in inputs)
    dim = inputs[1].shape[1] if len(inputs) > 1 else None
    feeds = detector_feeds(
        names, image, class_embeddings, novel_mask, dim=dim if isinstance(dim, int) else None
    )
    return session.run(None, feeds)
