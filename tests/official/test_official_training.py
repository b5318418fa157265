"""The official training path's pieces (vild_d2/official/training), each on a hand-worked case:
samplers with given permutations, anchor matching, RoI sampling, mask targets, the losses'
reductions, the batch norm, the optimiser settings. Expected values are worked out by hand
(in the comments) from the official code's rules (docs/OFFICIAL.md "Training")."""

import vild_d2  # noqa: F401  (first: compat bridges)

import math

import pytest
import torch
from detectron2.solver import build_lr_scheduler
from detectron2.solver.build import get_default_optimizer_params
from torch import nn

from vild_d2.config import load_config
from vild_d2.official.layers import OfficialBatchNorm2d
from vild_d2.official.training import (
    RecordedShuffles,
    balanced_subsample,
    bbox_overlap,
    crop_gt_masks,
    crop_mask_in_target_box,
    distillation_loss,
    fast_rcnn_box_loss,
    fast_rcnn_class_loss,
    first_foreground,
    mask_loss,
    official_anchor_match,
    official_decay_parameters,
    official_learning_rate,
    official_rpn_targets,
    official_sample_rois,
    rpn_box_loss,
    rpn_score_loss,
    static_balanced_subsample,
    subsample_indicator,
    sum_by_nonzero_weights,
)
from vild_d2.official.training.anchor_labels import encode_rpn_targets
from vild_d2.text import Vocabulary
from vild_d2.modeling.text_classifier import TextClassifier

T, F_ = True, False
OFFICIAL_YAML = "configs/LVIS-OVD/official/vild_R50_tf.yaml"


def _b(*flags):
    return torch.tensor(flags, dtype=torch.bool)


# --- samplers --------------------------------------------------------------------------------
def test_subsample_indicator_keeps_the_first_of_the_shuffled_ids():
    # ids [1, 2, 4] shuffled by [2, 0, 1] -> [4, 1, 2]; keep 2 -> {4, 1}
    out = subsample_indicator(_b(F_, T, T, F_, T), 2, RecordedShuffles([[2, 0, 1]]))
    assert out.tolist() == [F_, T, F_, F_, T]


def test_balanced_subsample_draws_positives_then_negatives():
    # positives {0, 3}: shuffle [1, 0] -> [3, 0], keep int(4 * 0.5) = 2 -> both;
    # negatives {1, 4, 5}: shuffle [2, 1, 0] -> [5, 4, 1], keep 4 - 2 = 2 -> {5, 4}
    shuffles = RecordedShuffles([[1, 0], [2, 1, 0]])
    out = balanced_subsample(_b(T, T, F_, T, T, T), _b(T, F_, F_, T, F_, F_), 4, 0.5, shuffles)
    assert out.tolist() == [T, F_, F_, T, T, T]
    shuffles.check_used_up()


def test_static_subsample_by_hand():
    # perm [5..0]: keys j0 -1 (idx 5), j1 +2 (idx 4), j2 -3 (3), j3 0 (2), j4 -5 (1), j5 +6 (0);
    # sorted [6, 2, 0, -1, -3, -5]; 2 positives (6, 2) and the last 2 (-3, -5) -> positions
    # 5, 1, 2, 4 -> indices 0, 4, 3, 1.
    out = static_balanced_subsample(
        _b(T, T, F_, T, T, T),
        _b(T, F_, F_, F_, T, F_),
        4,
        0.5,
        RecordedShuffles([[5, 4, 3, 2, 1, 0]]),
    )
    assert out.tolist() == [T, T, F_, T, T, F_]
    # Two candidates for 3 samples: the first non-candidate (index 1) is added; identity perm:
    # keys -1, -2, 0, -4, 0 -> the last 3: -1, -2, -4 -> indices 0, 1, 3.
    out = static_balanced_subsample(
        _b(T, F_, F_, T, F_), _b(F_, F_, F_, F_, F_), 3, 0.5, RecordedShuffles([[0, 1, 2, 3, 4]])
    )
    assert out.tolist() == [T, T, F_, T, F_]


def test_recorded_shuffles_reject_a_wrong_recording():
    with pytest.raises(
        ValueError, match="call 0 needs a permutation of 3, the recorded one has shape"
    ):
        RecordedShuffles([[0, 1]], "anchors")(3)
    with pytest.raises(ValueError, match="is not a permutation"):
        RecordedShuffles([[0, 0, 1]])(3)
    shuffles = RecordedShuffles([[0]])
    shuffles(1)
    with pytest.raises(ValueError, match="only 1 were recorded"):
        shuffles(1)


# --- anchors ---------------------------------------------------------------------------------
def test_anchor_match_thresholds_and_forced_matches():
    iou = torch.tensor([[0.8, 0.2, 0.5, 0.1], [0.75, 0.25, 0.1, 0.1]])
    # a0: 0.8 -> gt 0; a1: 0.25 < 0.3 -> -1; a2: 0.5 -> ignored -2; a3 -> -1. Both gts force a0:
    # the first (gt 0) wins.
    assert official_anchor_match(iou).tolist() == [0, -1, -2, -1]
    iou[1] = torch.tensor([0.1, 0.25, 0.1, 0.25])  # gt 1's best (first of the tie): a1, forced
    assert official_anchor_match(iou).tolist() == [0, 1, -2, -1]
    assert official_anchor_match(torch.zeros(0, 3)).tolist() == [-1, -1, -1]


def test_rpn_box_encoding_has_no_plus_one():
    # anchor (x 0..10, y 0..20): centre (5, 10); gt (2..12, 4..24): centre (7, 14), same size.
    d = encode_rpn_targets(
        torch.tensor([[2.0, 4, 12, 24]], dtype=torch.float64),
        torch.tensor([[0.0, 0, 10, 20]], dtype=torch.float64),
    )
    assert torch.allclose(d, torch.tensor([[4 / 20, 2 / 10, 0.0, 0.0]], dtype=torch.float64))


def test_rpn_targets_cover_every_matched_anchor_but_sample_some():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60]])
    gt = torch.tensor([[0.0, 0, 10, 10.5]])
    # IoUs: 10/10.5, 10/10.5 (>= 0.7: both matched), 0 (negative). At most int(2 * 0.5) = 1
    # positive: shuffle [1, 0] of ids [0, 1] keeps anchor 1; then 1 negative (anchor 2).
    scores, boxes = official_rpn_targets(anchors, gt, RecordedShuffles([[1, 0], [0]]), batch_size=2)
    assert scores.tolist() == [-1, 1, 0]
    assert (boxes[:2] != 0).any(dim=1).all() and (boxes[2] == 0).all()


# --- RoIs ------------------------------------------------------------------------------------
def test_bbox_overlap_padding():
    iou = bbox_overlap(
        torch.tensor([[0.0, 0, 10, 10], [-1, -1, -1, -1]]),
        torch.tensor([[0.0, 0, 10, 10], [-1, -1, -1, -1]]),
    )
    assert torch.allclose(iou, torch.tensor([[1.0, -1], [0, -1]]))


def test_roi_sampling_by_hand():
    # candidates: p0 (IoU 0.6: fg), p1 (IoU 0: bg), slot 2 = zero box (bg), gt slot 0 (IoU 1:
    # fg), gt slot 1 = padding (IoU 0: bg). One positive at most (4 x 0.25). Identity perm:
    # keys +1, -2, -3, +4, -5 -> positive 4 (index 3), negatives -2, -3, -5 (indices 1, 2, 4).
    out = official_sample_rois(
        torch.tensor([[0.0, 0, 10, 6], [20, 20, 30, 30]]),
        torch.tensor([[0.0, 0, 10, 10]]),
        torch.tensor([4]),
        RecordedShuffles([list(range(5))]),
        num_proposals=3,
        max_instances=2,
        num_samples=4,
    )
    assert out.indices.tolist() == [1, 2, 3, 4]  # candidate order
    assert out.gt_classes.tolist() == [0, 0, 5, 0]  # official class = dataset class + 1
    assert out.gt_indices.tolist() == [0, 0, 0, 0]
    assert out.rois[2].tolist() == [0, 0, 10, 10]  # the gt slot
    assert out.rois[-1].tolist() == [-1, -1, -1, -1]  # the padding slot, sampled as background


def test_roi_sampling_iou_of_one_half_is_no_candidate():
    # IoU of (0, 0, 10, 5) with the gt: 50 / (100 + 1e-8) = 0.5 in float32: neither foreground
    # (> 0.5) nor background (< 0.5), so not sampled; the gt slot and the padding slot are.
    out = official_sample_rois(
        torch.tensor([[0.0, 0, 10, 5]]),
        torch.tensor([[0.0, 0, 10, 10]]),
        torch.tensor([0]),
        RecordedShuffles([[0, 1, 2]]),
        num_proposals=1,
        max_instances=2,
        num_samples=2,
        fg_fraction=0.5,
    )
    assert out.indices.tolist() == [1, 2] and out.gt_classes.tolist() == [1, 0]


def test_first_foreground_then_background_fillers():
    assert first_foreground(torch.tensor([0, 3, 0, 2, 0]), 3).tolist() == [1, 3, 0]


# --- masks -----------------------------------------------------------------------------------
def test_crop_gt_masks_corner_aligned():
    # mask value = row index; box y 0..3 of 4 rows: samples y = i * (3/4 * 3) / 3 = 0.75 i.
    mask = torch.arange(4.0)[:, None].expand(4, 4)[None]
    out = crop_gt_masks(mask, torch.tensor([[0.0, 0, 3, 3]]), size=4)
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 0.75, 1.5, 2.25]))


def test_crop_mask_in_target_box_samples_bin_centres():
    # crop value = column index; padded by 2 -> column c holds c - 2. RoI = gt box: samples at
    # x = 2 + (j + 0.5) * 112 / 28 = 4 + 4 j -> value 2 + 4 j (exact bilinear on a ramp).
    crop = torch.arange(112.0)[None, :].expand(112, 112)[None]
    box = torch.tensor([[10.0, 20, 66, 76]])
    out = crop_mask_in_target_box(crop, box, box, 28)
    assert torch.allclose(out[0, 5], 2 + 4 * torch.arange(28.0), atol=1e-4)


# --- losses ----------------------------------------------------------------------------------
def test_sum_by_nonzero_weights():
    assert (
        float(sum_by_nonzero_weights(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 0, 2]))) == 3.5
    )
    assert float(sum_by_nonzero_weights(torch.tensor([1.0]), torch.tensor([0.0]))) == 0.0


def test_rpn_losses_by_hand():
    # score: sampled anchors (targets 1, 0) of 2 images, / (2 x 256); -1 left out.
    logits = [torch.tensor([[0.0, 2.0], [1.0, 5.0]], dtype=torch.float64)]
    targets = [torch.tensor([[1, 0], [-1, 1]])]
    expected = (math.log(2) + math.log(1 + math.e**2) + math.log(1 + math.e**-5)) / 512
    assert math.isclose(float(rpn_score_loss(logits, targets)), expected, rel_tol=1e-12)
    # box: huber(1/9) over non-zero targets only: x = 0.05 -> 0.5 x^2; x = 0.5 -> (1/9)(0.5 -
    # 1/18); the zero-target coordinate does not count: / 2.
    deltas = [torch.tensor([[[0.05, 0.5, 3.0, 0.0]]], dtype=torch.float64)]
    tgt = [torch.tensor([[[0.1, 1.0, 0.0, 0.0]]], dtype=torch.float64)]
    expected = (0.5 * 0.05**2 + (0.5 - 1 / 18) / 9) / 2
    assert math.isclose(float(rpn_box_loss(deltas, tgt)), expected, rel_tol=1e-12)


def test_fast_rcnn_losses_by_hand():
    # rare class 1 (of K = 2, background last): its logit 5 becomes 0, still in the softmax.
    logits = torch.tensor([[2.0, 5.0, 1.0]], dtype=torch.float64)
    rare = _b(F_, T, F_)
    expected = -2 + math.log(math.e**2 + 1 + math.e)
    assert math.isclose(float(fast_rcnn_class_loss(logits, torch.tensor([0]), rare)), expected)
    # box: foreground RoI 0 only, / 4 coordinates: huber(1) of 0.5 and 2 -> 0.125 + 1.5.
    d = torch.tensor([[0.5, 2.0, 0, 0], [9, 9, 9, 9]], dtype=torch.float64)
    loss = fast_rcnn_box_loss(d, torch.zeros(2, 4, dtype=torch.float64), _b(T, F_))
    assert math.isclose(float(loss), (0.125 + 1.5) / 4)
    # mask: mean over the foreground mask's pixels; logits 0 -> log 2 whatever the soft target.
    ml = torch.zeros(2, 2, 2, dtype=torch.float64)
    assert math.isclose(float(mask_loss(ml, torch.full_like(ml, 0.3), _b(F_, T))), math.log(2))
    # distillation: target (3, 4) -> (0.6, 0.8); |(1, 0) - it| summed = 1.2; the invalid row
    # does not count.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    tgt = torch.tensor([[3.0, 4.0], [-1.0, -1.0]], dtype=torch.float64)
    assert math.isclose(float(distillation_loss(emb, tgt, _b(T, F_))), 1.2)


# --- batch norm, optimiser -------------------------------------------------------------------
def test_batch_norm_uses_the_biased_variance_for_the_moving_average():
    bn = OfficialBatchNorm2d(1, eps=0.0, momentum=1.0).train()
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(4, 1, 1, 1)  # mean 3, biased var 14 / 4 = 3.5
    y = bn(x)
    assert torch.allclose(bn.running_var, torch.tensor([3.5]))
    assert torch.allclose(y.flatten(), (x.flatten() - 3) / math.sqrt(3.5))


def test_tf_like_bn_moments_switch_sums_in_float32_in_order():
    # The training-parity noise experiment (tests/official/official_training_noise.py): under the
    # switch the batch mean is a plain float32 running sum (here one block), worked out below
    # element by element; outside it, the exact mean. Values near 1000 make float32 sums visibly
    # off.
    import numpy as np
    from official_training_noise import tf_like_bn_moments

    values = 1000.0 + torch.arange(5000, dtype=torch.float64).remainder(7) / 7 + 1e-3
    x = values.float().view(1, 1, 50, 100).requires_grad_()
    exact = float(x.detach().double().mean())
    total = np.float32(0.0)
    for v in x.detach().flatten().numpy():
        total = np.float32(total + v)
    float32_mean = float(total / np.float32(5000))
    assert abs(float32_mean - exact) > 5e-4  # 8 float32 ulps at 1000: the rounding shows
    original = OfficialBatchNorm2d.forward
    with tf_like_bn_moments(blocks=1):
        bn = OfficialBatchNorm2d(1, momentum=1.0).train()
        bn(x).sum().backward()
    assert OfficialBatchNorm2d.forward is original
    assert float(bn.running_mean) == pytest.approx(float32_mean, abs=1e-6)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    plain = OfficialBatchNorm2d(1, momentum=1.0).train()
    plain(x.detach())
    assert float(plain.running_mean) == pytest.approx(exact, abs=6.2e-5)  # 1 ulp (storage)


def test_official_schedule_and_kernel_only_decay():
    cfg = load_config(OFFICIAL_YAML)
    for step, lr in (
        (0, 0.0032),
        (500, 0.0032 + 0.5 * 0.3168),
        (999, 0.0032 + 0.999 * 0.3168),
        (1000, 0.32),
        (161999, 0.32),
        (162000, 0.032),
        (171000, 0.0032),
    ):
        assert math.isclose(official_learning_rate(step), lr, rel_tol=1e-6)
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    seen = {}
    for it in range(1001):
        seen[it] = opt.param_groups[0]["lr"]
        sched.step()
    for step in (0, 500, 1000):
        assert math.isclose(seen[step], official_learning_rate(step), rel_tol=1e-6)
    # detectron2's parameter groups under the official SOLVER keys decay exactly the kernels.
    vocab = Vocabulary(["a", "b"], torch.randn(2, 4))
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        OfficialBatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4, 4),
        TextClassifier(4, vocab),
    )
    groups = get_default_optimizer_params(
        model,
        base_lr=0.1,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in official_decay_parameters(model).values()}
    assert set(official_decay_parameters(model)) == {
        "0.weight",
        "3.weight",
        "4.projection.weight",
        "4.background",
    }
    assert cfg.SOLVER.MOMENTUM == 0.9 and not cfg.SOLVER.NESTEROV
    assert not cfg.SOLVER.CLIP_GRADIENTS.ENABLED


def test_gt_mask_crops_rasterise_polygons():
    from detectron2.structures import Boxes, Instances, PolygonMasks

    from vild_d2.official.training.roi_training import gt_mask_crops

    # A polygon covering pixels 4..11 of a 16 x 16 image, cropped at (4, 4, 11, 11): the
    # official normalisation by H (not H - 1) puts the samples at 4 * 15/16 + i * 15/16 =
    # 3.75, 4.69, ..., 10.31: the first row and column read 0.75 of the square, the corner
    # 0.75^2, the rest lies inside.
    inst = Instances((16, 16))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 11.0, 11.0]]))
    inst.gt_masks = PolygonMasks([[[4.0, 4.0, 12.0, 4.0, 12.0, 12.0, 4.0, 12.0]]])
    crops = gt_mask_crops(inst, 8)
    expected = torch.ones(1, 8, 8)
    expected[:, 0, :] *= 0.75
    expected[:, :, 0] *= 0.75
    assert torch.allclose(crops, expected, atol=1e-6)


def test_official_double_flip_gives_the_distillation_boxes_their_own_coin(tmp_path):
    # vild_parser.py flips image, gt and distillation boxes with one coin, then image and gt
    # again with another: the distillation boxes' flip is independent of the image's.
    import cv2
    import numpy as np
    from detectron2.data import transforms as T
    from detectron2.structures import BoxMode

    from vild_d2.data import ViLDDatasetMapper

    path = str(tmp_path / "img.png")
    assert cv2.imwrite(path, np.full((40, 80, 3), 128, np.uint8))
    box = [10.0, 5.0, 30.0, 25.0]  # mirrored in the 80-px width: [50, 5, 70, 25]

    def combos(double_flip):
        m = ViLDDatasetMapper(True, augmentations=[T.RandomFlip(prob=0.5)], image_format="BGR",
                              official_double_flip=double_flip)  # fmt: skip
        seen = set()
        for seed in range(40):
            np.random.seed(seed)
            ann = {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}
            d = dict(file_name=path, height=40, width=80, annotations=[ann], distill_boxes=[box])
            d["distill_embeddings"] = np.ones((1, 2), np.float32)
            out = m(d)
            gt, distill = out["instances"].gt_boxes.tensor[0], out["distill"].boxes.tensor[0]
            for b in gt, distill:  # either the box or its mirror image, exactly
                assert b.tolist() in (box, [50.0, 5.0, 70.0, 25.0])
            seen.add((bool(gt[0] > 40), bool(distill[0] > 40)))
        return seen

    assert combos(False) == {(False, False), (True, True)}
    assert combos(True) == {(False, False), (True, True), (False, True), (True, False)}
    cfg = load_config(OFFICIAL_YAML, ["MODEL.VILD.OFFICIAL.DOUBLE_FLIP", "True"])
    assert ViLDDatasetMapper(cfg, True).official_double_flip
    assert not ViLDDatasetMapper(cfg, False).official_double_flip
