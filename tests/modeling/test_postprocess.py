"""The exportable per-class NMS (vild_d2/modeling/postprocess.py): a hand-worked case, and the
traced TorchScript and ONNX graphs against detectron2's eager ``fast_rcnn_inference`` on random
boxes, at a score threshold and at 0, with another number of classes than the traced one."""

import vild_d2  # noqa: F401  (first: compat bridges)

import numpy as np
import pytest
import torch

from vild_d2.modeling.postprocess import per_class_detections

SHAPE = (60, 80)  # (H, W): boxes are clipped to it


class _Detections(torch.nn.Module):
    """per_class_detections on one image as a module to trace: (R, 4), (R, K) -> 3 tensors."""

    def __init__(self, score_thresh: float, topk: int):
        super().__init__()
        self.score_thresh, self.topk = score_thresh, topk

    def forward(self, boxes, scores):
        out, kept = per_class_detections(
            [boxes], [scores], [SHAPE], self.score_thresh, 0.5, self.topk
        )
        return out[0].pred_boxes.tensor, out[0].scores, out[0].pred_classes


def _eager(boxes, scores, score_thresh, topk):
    with torch.no_grad():
        return _Detections(score_thresh, topk)(boxes, scores)


def _random(r: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(r, 2, generator=g) * torch.tensor([70.0, 50.0])
    wh = 4 + torch.rand(r, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + wh], dim=1)  # some cross the image's edge: clipped
    # Clustered boxes (so NMS suppresses) with distinct scores per class.
    boxes[r // 2 :] = boxes[: r - r // 2] + torch.rand(r - r // 2, 4, generator=g) * 3
    scores = (
        (6 * torch.rand(r, k, generator=g)).softmax(1) if k > 1 else torch.rand(r, 1, generator=g)
    )
    return boxes, scores


def test_a_hand_worked_case():
    a, b, c = [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]
    boxes = torch.tensor([a, b, c])  # IoU(a, b) = 81 / 119 = 0.68 > 0.5
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.1, 0.05]])
    # class 0: a kept, b suppressed by a, c kept; class 1: b kept, a suppressed by b,
    # c below the threshold 0.06. Sorted by score: (a, 0) 0.9, (b, 1) 0.7, (c, 0) 0.1.
    got_boxes, got_scores, got_classes = _eager(boxes, scores, 0.06, 100)
    assert got_boxes.tolist() == [a, b, c]
    assert got_scores.tolist() == pytest.approx([0.9, 0.7, 0.1])
    assert got_classes.tolist() == [0, 1, 0]
    traced = torch.jit.trace(_Detections(0.06, 2), (boxes, scores), check_trace=False)
    got_boxes, got_scores, got_classes = traced(boxes, scores)
    assert got_boxes.tolist() == [a, b] and got_classes.tolist() == [0, 1]  # top 2


@pytest.mark.parametrize("score_thresh", [0.0, 0.05])
def test_torchscript_and_onnx_match_detectron2(score_thresh, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    example = _random(50, 7, seed=0)
    module = _Detections(score_thresh, topk=40).eval()
    traced = torch.jit.trace(module, example, check_trace=False)
    path = tmp_path / "nms.onnx"
    torch.onnx.export(
        module,
        example,
        str(path),
        opset_version=16,
        input_names=["boxes", "scores"],
        output_names=["pred_boxes", "scores_out", "pred_classes"],
        dynamic_axes={"boxes": {0: "r"}, "scores": {0: "r", 1: "k"}},
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Other sizes than the traced ones: 1 class, 3, and 60 (R x K = 12000 pairs).
    for r, k, seed in [(50, 7, 1), (120, 1, 2), (80, 3, 3), (200, 60, 4)]:
        boxes, scores = _random(r, k, seed)
        ref = [t.numpy() for t in _eager(boxes, scores, score_thresh, 40)]
        assert 0 < len(ref[1]) <= 40
        script = [t.numpy() for t in traced(boxes, scores)]
        onnx = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})
        for name, got in (("torchscript", script), ("onnx", onnx)):
            assert len(got[1]) == len(ref[1]), (name, r, k)
            np.testing.assert_array_equal(got[2], ref[2], err_msg=f"{name} classes {r}x{k}")
            np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-7, err_msg=name)
            np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-4, err_msg=name)


def test_the_traced_step_is_not_one_nms_over_all_pairs():
    """The point of it: a trace of detectron2's code records torchvision's coordinate trick
    (one NMS over R x K boxes); ours records a per-class loop (TorchScript) instead."""
    traced = torch.jit.trace(_Detections(0.0, 100), _random(30, 4, seed=0), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "prim::Loop" in graph and "torchvision::nms" in graph
