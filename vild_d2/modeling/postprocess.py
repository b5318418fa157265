"""Per-class detections from class-agnostic boxes and class scores: detectron2's
``fast_rcnn_inference`` semantics (a score threshold, NMS for each class independently, the
image's top-k) in a form that exports.

Eager code runs detectron2's own ``fast_rcnn_inference``. While a graph is traced (TorchScript
or ONNX export) the same semantics run as one per-class NMS step whose cost is
K x (boxes above the threshold of one class), not the (R x K)^2 of one NMS over all pairs
(torchvision's coordinate trick, which a trace of detectron2's code records): in ONNX it is
the ``NonMaxSuppression`` operator with the (K, R) scores, in TorchScript a scripted loop over
the classes. At most ``topk`` boxes are kept per class: exact, because the image keeps only its
``topk`` best after NMS and a class's later survivors never rank among them.

Shape shorthand: R = boxes (proposals), K = classes, S = kept (box, class) pairs.
"""

from typing import List, Sequence, Tuple

import torch
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances
from torchvision.ops import nms

__all__ = ["per_class_detections", "per_class_nms"]


@torch.jit.script_if_tracing
def _nms_each_class(
    boxes: torch.Tensor, scores: torch.Tensor, score_thresh: float, iou: float, topk: int
) -> torch.Tensor:
    """(R, 4) boxes, (R, K) scores -> (S, 2) int64 (box index, class) kept by NMS within each
    class among the boxes scoring above ``score_thresh``, at most ``topk`` per class."""
    kept: List[torch.Tensor] = [torch.zeros((0, 2), dtype=torch.long, device=boxes.device)]
    for c in range(scores.shape[1]):
        idx = (scores[:, c] > score_thresh).nonzero().view(-1)
        keep = idx[nms(boxes[idx], scores[idx, c], iou)[:topk]]
        kept.append(torch.stack([keep, torch.full_like(keep, c)], dim=1))
    return torch.cat(kept)


class _OnnxNMS(torch.autograd.Function):
    """ONNX's NonMaxSuppression over (1, R, 4) boxes and (1, K, R) scores (one NMS per class,
    the score threshold applied first); the eager forward is only the exporter's example run."""

    @staticmethod
    def forward(ctx, boxes, scores, score_thresh: float, iou: float, topk: int):
        return _nms_each_class(boxes, scores, score_thresh, iou, topk)

    @staticmethod
    def symbolic(g, boxes, scores, score_thresh: float, iou: float, topk: int):
        zero = g.op("Constant", value_t=torch.tensor([0], dtype=torch.long))
        selected = g.op(  # (S, 3): batch, class, box
            "NonMaxSuppression",
            g.op("Unsqueeze", boxes, zero),
            g.op("Unsqueeze", g.op("Transpose", scores, perm_i=[1, 0]), zero),
            g.op("Constant", value_t=torch.tensor([topk], dtype=torch.long)),
            g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float)),
            g.op("Constant", value_t=torch.tensor([score_thresh], dtype=torch.float)),
        )
        columns = g.op("Constant", value_t=torch.tensor([2, 1], dtype=torch.long))
        return g.op("Gather", selected, columns, axis_i=1)


def per_class_nms(
    boxes: torch.Tensor, scores: torch.Tensor, score_thresh: float, iou: float, topk: int
) -> torch.Tensor:
    """(R, 4) XYXY boxes shared by all classes, (R, K) scores -> (S, 2) int64 (box index,
    class): for each class, NMS at ``iou`` over its boxes scoring above ``score_thresh``, at
    most ``topk`` kept, in that class's score order."""
    if torch.onnx.is_in_onnx_export():
        return _OnnxNMS.apply(boxes, scores, float(score_thresh), float(iou), int(topk))
    return _nms_each_class(boxes, scores, float(score_thresh), float(iou), int(topk))


def _traced_single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk):
    """One image of :func:`per_class_detections` as graph ops; (R, 4) boxes, (R, K) scores."""
    boxes = Boxes(boxes.reshape(-1, 4))
    boxes.clip(image_shape)
    boxes = boxes.tensor
    # A negative topk keeps all: per class then at most every box.
    kept = per_class_nms(boxes, scores, score_thresh, nms_thresh, topk if topk >= 0 else 1 << 31)
    # Ties in score keep detectron2's order (its NMS sorts stably over the (box, class) pairs
    # in row-major order): pairs in that order first, then a stable sort by score.
    kept = kept[(kept[:, 0] * scores.shape[1] + kept[:, 1]).argsort()]
    kept_scores = scores[kept[:, 0], kept[:, 1]]
    if torch.onnx.is_in_onnx_export():  # exports as TopK, whose ties keep the lower index
        order = kept_scores.argsort(descending=True)
    else:
        order = kept_scores.sort(descending=True, stable=True)[1]
    if topk >= 0:
        order = order[:topk]
    kept = kept[order]
    result = Instances(image_shape)
    result.pred_boxes = Boxes(boxes[kept[:, 0]])
    result.scores = kept_scores[order]
    result.pred_classes = kept[:, 1]
    return result, kept[:, 0]


def per_class_detections(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    image_shapes: Sequence[Tuple[int, int]],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
) -> Tuple[List[Instances], List[torch.Tensor]]:
    """
    detectron2's ``fast_rcnn_inference`` for class-agnostic boxes and scores without a
    background column.

    Args:
        boxes: per image (R_i, 4) class-agnostic boxes.
        scores: per image (R_i, K) class scores.
    Returns:
        per image Instances (pred_boxes, scores, pred_classes), and the kept boxes' indices.
    """
    if torch.jit.is_tracing():
        out = [
            _traced_single_image(b, s, shape, score_thresh, nms_thresh, topk_per_image)
            for b, s, shape in zip(boxes, scores, image_shapes)
        ]
        return [o[0] for o in out], [o[1] for o in out]
    # fast_rcnn_inference reads K+1 columns, the last one background, which it drops.
    scores = [torch.cat([s, s.new_zeros(len(s), 1)], dim=1) for s in scores]
    return fast_rcnn_inference(
        boxes, scores, image_shapes, score_thresh, nms_thresh, topk_per_image
    )
