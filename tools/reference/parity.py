"""Stage-by-stage comparison of :class:`OfficialViLDRCNN` with the official TensorFlow ViLD's
outputs (tests/fixtures/official_vild, FORMAT.md there), and the revertible differences that
the parity ablation turns back one at a time (tools/official_parity_ablation.py).

Shape shorthand: B = 2 images, R = 1000 RoIs, K = 1203 classes; fixture maps are NHWC with a
channel subset ``[::C // 8]``; fixture boxes are (y1, x1, y2, x2) in the 256x256 canvas.
"""

import contextlib
from pathlib import Path
from typing import Callable, Dict, Iterator
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou

from vild_d2.config import load_config
from vild_d2.modeling import cosine_logits
from vild_d2.official.box_coding import clip_boxes_official
from vild_d2.official.checkpoint.convert import convert_official_weights, official_vocabulary
from vild_d2.official.checkpoint.variables import official_variables

from .random_weights import random_official_weights

__all__ = ["FIXTURE_DIR", "CONFIGS", "build_reference_model", "run_reference", "compare",
           "DIFFERENCES", "revert"]  # fmt: skip

MASKED = 32  # detections per image whose masks are computed
FIXTURE_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official_vild"
CONFIGS = {
    "vild": "configs/LVIS-OVD/official/vild_R50_tf.yaml",
    "vild_ensemble": "configs/LVIS-OVD/official/vild_ensemble_R50_tf.yaml",
}


def build_reference_model(name: str, seed: int, image_size: int, workdir: str):
    """The fixture's model: official config ``name``, random official weights of ``seed``
    through the converter, the official classifier as vocabulary, eval mode on the CPU."""
    ensemble = name == "vild_ensemble"
    tf_vars = random_official_weights(official_variables(50, ensemble), seed)
    state, info = convert_official_weights(tf_vars, 50, ensemble)
    vocab = official_vocabulary(info["classifier"])
    vocab.save(f"{workdir}/{name}_vocabulary.pth")
    config = Path(__file__).resolve().parents[2] / CONFIGS[name]
    cfg = load_config(str(config), [
        "MODEL.VILD.TRAIN_VOCABULARY", f"{workdir}/{name}_vocabulary.pth",
        "MODEL.VILD.TEST_VOCABULARY", f"{workdir}/{name}_vocabulary.pth",
        "MODEL.VILD.OFFICIAL.IMAGE_SIZE", str(image_size), "MODEL.VILD.OFFICIAL.NORM", "BN",
        "MODEL.DEVICE", "cpu",
    ])  # fmt: skip
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model.eval(), vocab


def _nhwc(x: torch.Tensor, subset: bool = True) -> np.ndarray:
    if subset:
        x = x[:, :: x.shape[1] // 8]
    return x.permute(0, 2, 3, 1).detach().numpy()


def _yxyx(boxes: torch.Tensor) -> np.ndarray:
    return boxes[..., [1, 0, 3, 2]].detach().numpy()


def _xyxy(boxes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(boxes[..., [1, 0, 3, 2]])).float()


@torch.no_grad()
def run_reference(model, common: Dict[str, np.ndarray], heads: bool = True) -> Dict:
    """One batch of the fixture's two images through ``model``: every stage the fixture holds.
    The box head runs once, on the OFFICIAL proposals (so its outputs compare row by row);
    detections and masks come from them; ``rois`` are this model's own proposals. Without
    ``heads``, only the stages up to the proposals (a few seconds)."""
    captured = {}

    def keep(name):
        return lambda module, inputs, output: captured.__setitem__(name, output)

    roi_heads = model.roi_heads
    hooks = [model.backbone.bottom_up.register_forward_hook(keep("bottom_up")),
             model.proposal_generator.rpn_head.register_forward_hook(keep("rpn")),
             roi_heads.box_pooler.register_forward_hook(keep("pooled")),
             roi_heads.box_head.register_forward_hook(keep("box_features")),
             roi_heads.box_predictor.register_forward_hook(keep("predictions"))]  # fmt: skip
    try:
        inputs = [{"image": torch.from_numpy(common[f"image_{i}"]).permute(2, 0, 1)}
                  for i in range(2)]  # fmt: skip
        images, _ = model.preprocess_for_inference(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        official = []
        for i, size in enumerate(images.image_sizes):
            valid = common["roi_scores"][i] > -1
            inst = Instances(size)
            inst.proposal_boxes = Boxes(_xyxy(common["rois"][i][valid]))
            scores = torch.from_numpy(common["roi_scores"][i][valid]).clamp(1e-7, 1 - 1e-7)
            inst.objectness_logits = torch.logit(scores)
            official.append(inst)
        if heads:
            detections = roi_heads._forward_box(features, official)
            # Masks of the first detections only (the fixture has the first 16's): the mask head
            # on all 300 would double the test's time.
            firsts = [d[:MASKED] for d in detections]
            firsts = roi_heads.forward_with_given_boxes(features, firsts)
    finally:
        for h in hooks:
            h.remove()
    out = {"preprocessed": images.tensor[:, :, ::2, ::2].permute(0, 2, 3, 1).numpy()}
    for level in range(2, 6):
        out[f"backbone_c{level}"] = _nhwc(captured["bottom_up"][f"res{level}"])
    logits, deltas = captured["rpn"]
    anchors = model.proposal_generator.anchor_generator([features[f"p{lv}"] for lv in range(2, 7)])
    for k, level in enumerate(range(2, 7)):
        out[f"fpn_p{level}"] = _nhwc(features[f"p{level}"])
        out[f"rpn_scores_p{level}"] = _nhwc(logits[k], subset=False)
        out[f"rpn_deltas_p{level}"] = _nhwc(deltas[k], subset=False)
        out[f"anchors_p{level}"] = _yxyx(anchors[k].tensor)
    out["rois"] = [_yxyx(p.proposal_boxes.tensor) for p in proposals]
    if not heads:
        return out
    num = [len(p) for p in official]
    pooled = captured["pooled"].split(num)
    box_features = captured["box_features"].split(num)
    scores, box_deltas = (x.split(num) for x in captured["predictions"])
    predictor = roi_heads.box_predictor
    boxes = predictor.predict_boxes(captured["predictions"], official)
    classifier = predictor.cls_score
    out.update(roi_features=[], projection=[], class_logits=[], box_deltas=[], decoded_boxes=[],
               class_scores=[], image_projection=[], image_class_logits=[])  # fmt: skip
    for i in range(2):
        first = slice(0, 32)
        out["roi_features"].append(_nhwc(pooled[i][first]))
        out["projection"].append(classifier.projection(box_features[i][first]).numpy())
        out["class_logits"].append(roi_heads.official_class_logits(box_features[i][first]).numpy())
        out["box_deltas"].append(box_deltas[i].numpy())
        out["decoded_boxes"].append(_yxyx(clip_boxes_official(boxes[i], images.image_sizes[i])))
        preds = (scores[i][first], box_deltas[i][first])
        out["class_scores"].append(roi_heads._class_scores(pooled[i][first], preds, None).numpy())
        if roi_heads.variant == "ensemble":
            proj = roi_heads.image_projection(roi_heads.image_box_head(pooled[i][first]))
            out["image_projection"].append(proj.numpy())
            emb = F.normalize(proj, dim=1, eps=1e-8)
            logits_i = cosine_logits(emb, classifier.test_embeddings, classifier.temperature)
            out["image_class_logits"].append(logits_i.numpy())
    out["detections"] = detections
    out["masks"] = [d.pred_masks[:, 0].numpy() for d in firsts]
    return out


# Stage -> (fixture keys, tolerance on max |ours - official| / max |official|).
TENSOR_STAGES = {
    "preprocessing": (["preprocessed"], 1e-4),
    "backbone": ([f"backbone_c{lv}" for lv in range(2, 6)], 1e-4),
    "fpn": ([f"fpn_p{lv}" for lv in range(2, 7)], 1e-4),
    "anchors": ([f"anchors_p{lv}" for lv in range(2, 7)], 1e-6),
    "rpn": ([f"rpn_{k}_p{lv}" for k in ("scores", "deltas") for lv in range(2, 7)], 1e-4),
    "roi_features": (["roi_features"], 1e-4),
    "head": (
        [
            "projection",
            "class_logits",
            "box_deltas",
            "decoded_boxes",
            "class_scores",
            "image_projection",
            "image_class_logits",
        ],
        1e-3,
    ),
}
# Outputs with a row per official proposal, empty slots included.
PER_ROI = ("box_deltas", "decoded_boxes")
# Matched fractions: proposals (IoU >= 0.999), detections (same class, IoU >= 0.99, score
# within 1e-4), masks of matched detections (mask IoU at 0.5 >= 0.99).
MATCH_TOLERANCES = {"proposals": 0.99, "detections": 0.98, "masks": 0.99}


def _rel_diff(ours: np.ndarray, ref: np.ndarray) -> Dict[str, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return {"max_abs": float("inf"), "scale": float(np.abs(ref).max()), "rel": float("inf")}
    diff = float(np.abs(ours - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 1.0
    return {"max_abs": diff, "scale": scale, "rel": diff / max(scale, 1e-12)}


def _iou(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return pairwise_iou(Boxes(_xyxy(a)), Boxes(_xyxy(b)))


def _same_box(a: np.ndarray, b: np.ndarray, min_iou: float) -> torch.Tensor:
    """(A, B) bool: IoU >= ``min_iou``, or every coordinate within 1e-3 px (boxes of zero or
    negative width or height, clipped to an edge or narrower than 1 px, have no IoU)."""
    if not len(a) or not len(b):
        return torch.zeros(len(a), len(b), dtype=torch.bool)
    close = (torch.from_numpy(a)[:, None] - torch.from_numpy(b)[None]).abs().amax(-1) <= 1e-3
    return (_iou(a, b) >= min_iou) | close


def _match_detections(det: Instances, masks: np.ndarray, ref: Dict[str, np.ndarray], i: int):
    """(matched fraction, mask IoUs of the matched among the first 16, max mask prob diff)."""
    n = int(ref["num_detections"][i])
    boxes, classes = ref["detection_boxes"][i][:n], ref["detection_classes"][i][:n] - 1
    scores = ref["detection_scores"][i][:n]
    ours = det.pred_boxes.tensor[:, [1, 0, 3, 2]].numpy()
    same = _same_box(boxes, ours, 0.99).numpy()
    ok = ((classes[:, None] == det.pred_classes.numpy()[None]) & same
          & (np.abs(scores[:, None] - det.scores.numpy()[None]) <= 1e-4))  # fmt: skip
    used, match = set(), {}
    for r in range(n):
        for c in np.nonzero(ok[r])[0]:
            if c not in used:
                used.add(c)
                match[r] = c
                break
    mask_ious, mask_diff = [], 0.0
    for r in range(min(16, n)):
        if r in match and match[r] < len(masks):
            mine, theirs = masks[match[r]], ref["detection_masks"][i][r]
            a, b = mine >= 0.5, theirs >= 0.5
            union = (a | b).sum()
            mask_ious.append(float((a & b).sum() / union) if union else 1.0)
            mask_diff = max(mask_diff, float(np.abs(mine - theirs).max()))
    return len(match) / max(n, 1), mask_ious, mask_diff


def compare(out: Dict, ref: Dict[str, np.ndarray], common: Dict[str, np.ndarray]) -> Dict:
    """Per stage and image: measured figures and whether they are within tolerance.

    Returns:
        {"stages": {stage: {"image_i": {...}, "ok": bool}}, "ok": bool}.
    """
    expected = {**common, **ref}
    stages = {}
    for stage, (keys, tol) in TENSOR_STAGES.items():
        keys = [k for k in keys if k in expected and k in out]
        if not keys:
            continue
        entry = {}
        for i in range(2):
            figures = {}
            for k in keys:
                ours = out[k] if k.startswith("anchors") else out[k][i]
                theirs = expected[k] if k.startswith("anchors") else expected[k][i]
                if k in PER_ROI:  # the official rows go on over the empty proposal slots
                    theirs = theirs[: int((common["roi_scores"][i] > -1).sum())]
                figures[k] = _rel_diff(ours, theirs)
            worst = max(figures, key=lambda k: figures[k]["rel"])
            entry[f"image_{i}"] = {
                "max_rel": figures[worst]["rel"],
                "max_abs": figures[worst]["max_abs"],  # of that output
                "worst": worst,
            }
        entry["tolerance"] = tol
        entry["ok"] = all(entry[f"image_{i}"]["max_rel"] <= tol for i in range(2))
        stages[stage] = entry
    proposals, detections, masks = {}, {}, {}
    heads = "detections" in out
    for i in range(2):
        valid = common["roi_scores"][i] > -1
        theirs = common["rois"][i][valid]
        same = _same_box(theirs, out["rois"][i], 0.999)
        matched = float(same.any(1).float().mean()) if len(theirs) else 1.0
        proposals[f"image_{i}"] = {"matched": matched, "official": int(valid.sum()),
                                   "ours": len(out["rois"][i])}  # fmt: skip
        if not heads:
            continue
        frac, mask_ious, mask_diff = _match_detections(
            out["detections"][i], out["masks"][i], ref, i
        )
        detections[f"image_{i}"] = {"matched": frac, "official": int(ref["num_detections"][i]),
                                    "ours": len(out["detections"][i])}  # fmt: skip
        masks[f"image_{i}"] = {"min_iou": min(mask_ious, default=0.0), "compared": len(mask_ious),
                               "max_prob_diff": mask_diff}  # fmt: skip
    tol = MATCH_TOLERANCES
    images = [f"image_{i}" for i in range(2)]
    proposals["tolerance"] = tol["proposals"]
    proposals["ok"] = all(proposals[k]["matched"] >= tol["proposals"] for k in images)
    stages["proposals"] = proposals
    if heads:
        detections["tolerance"] = tol["detections"]
        detections["ok"] = all(detections[k]["matched"] >= tol["detections"] for k in images)
        masks["tolerance"] = tol["masks"]
        masks["ok"] = all(masks[k]["compared"] and masks[k]["min_iou"] >= tol["masks"]
                          for k in images)  # fmt: skip
        stages.update(detections=detections, masks=masks)
    return {"stages": stages, "ok": all(s["ok"] for s in stages.values())}


# ---------------------------------------------------------------------------------------------
# The ablation: each difference from detectron2's Mask R-CNN turned back on its own (inside a
# context, on this package's classes only), to show that parity then fails.


def _swap_yx(deltas: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(deltas.shape[1]).view(-1, 4)[:, [1, 0, 3, 2]].flatten()
    return deltas[:, idx]


def _decode_without_plus_one(self, deltas, boxes):
    """The official decode with detectron2's width convention (w = x2 - x1, no "- 1")."""
    deltas, boxes = deltas.float(), boxes.to(torch.float32)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    x, y = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    wy, wx, wh, ww = self.weights
    cy = deltas[:, 0::4] / wy * h[:, None] + y[:, None]
    cx = deltas[:, 1::4] / wx * w[:, None] + x[:, None]
    ph = torch.exp(torch.clamp(deltas[:, 2::4] / wh, max=self.scale_clamp)) * h[:, None]
    pw = torch.exp(torch.clamp(deltas[:, 3::4] / ww, max=self.scale_clamp)) * w[:, None]
    out = torch.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], dim=2)
    return out.reshape(deltas.shape)


@contextlib.contextmanager
def _patch(target, name: str, value) -> Iterator[None]:
    with mock.patch.object(target, name, value):
        yield


def _differences() -> Dict[str, Callable[[], contextlib.AbstractContextManager]]:
    from vild_d2.official import backbone, box_coding, layers, meta_arch

    coder = box_coding.OfficialBox2BoxTransform
    apply_deltas = coder.apply_deltas
    return {
        # PyTorch's symmetric padding=1 instead of TF 'SAME' (0 before, 1 after).
        "maxpool_padding": lambda: _patch(
            backbone.TFStem, "forward",
            lambda self, x: F.max_pool2d(F.relu(self.conv1(x)), 3, 2, padding=1)),
        # P6's 3x3/2 conv with PyTorch's symmetric padding instead of TF 'SAME'.
        "p6_padding": lambda: _patch(
            layers.Conv2dSame, "forward",
            lambda self, x: F.conv2d(x, self.weight, self.bias, self.stride, 1)),
        # Deltas read as detectron2's (dx, dy, dw, dh).
        "box_coding_order": lambda: _patch(
            coder, "apply_deltas", lambda self, d, b: apply_deltas(self, _swap_yx(d), b)),
        # detectron2's widths (x2 - x1) instead of the official x2 - x1 + 1.
        "plus_one": lambda: _patch(coder, "apply_deltas", _decode_without_plus_one),
        # PyTorch's bilinear resize (half-pixel centres) instead of TF's legacy one.
        "legacy_resize": lambda: _patch(
            meta_arch, "legacy_resize_bilinear",
            lambda image, size: F.interpolate(image[None], size=size, mode="bilinear",
                                              align_corners=False)[0]),
    }  # fmt: skip


DIFFERENCES = tuple(_differences())


def revert(name: str) -> contextlib.AbstractContextManager:
    """A context in which the official difference ``name`` (one of :data:`DIFFERENCES`) is
    turned back to detectron2's / PyTorch's behaviour."""
    return _differences()[name]()
