"""The official ViLD modules (vild_d2/official) against hand-worked / float64 values: TF 'SAME'
padding, anchors, box coding and its "+1", the RoI level rule and crop-and-resize, legacy
resize, BN settings, the converter's layouts and errors, post-processing."""

import vild_d2  # noqa: F401  (first: compat bridges)

import math

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes

from vild_d2.official import (
    OfficialAnchorGenerator,
    OfficialBox2BoxTransform,
    OfficialROIPooler,
    official_detections,
    official_roi_levels,
    official_variables,
)
from reference.random_weights import random_official_weights
from vild_d2.official.backbone import build_tf_resnet
from vild_d2.official.checkpoint.convert import (
    convert_official_weights,
    normalize_official_name,
    official_key_map,
)
from vild_d2.official.heads import OfficialBoxHead, OfficialMaskHead
from vild_d2.official.layers import Conv2dSame, MaxPool2dSame, official_norm, tf_same_padding
from vild_d2.official.preprocessing import legacy_resize_bilinear, official_scaled_size

GRID = torch.arange(16.0).reshape(1, 1, 4, 4)


def test_same_padding_is_asymmetric_on_even_inputs():
    assert tf_same_padding(4, 3, 2) == (0, 1)
    assert tf_same_padding(5, 3, 2) == (1, 1)
    assert tf_same_padding(7, 3, 1) == (1, 1)


def test_same_max_pool_by_hand():
    # Windows rows/cols {0,1,2} and {2,3}: TF pads after only. (PyTorch's padding=1 gives
    # windows {-1,0,1}, {1,2,3}: 5, 7, 13, 15.)
    out = MaxPool2dSame(3, 2)(GRID)
    assert out[0, 0].tolist() == [[10.0, 11.0], [14.0, 15.0]]


def test_same_strided_conv_by_hand():
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    out = conv(GRID)[0, 0]
    # (0,0): rows/cols 0..2 = 45; (1,1): rows/cols 2..3 (+ zero padding) = 10+11+14+15.
    assert out.tolist() == [[45.0, 39.0], [66.0, 50.0]]


def test_official_batch_norm_settings():
    resnet = build_tf_resnet(depth=50, norm=official_norm("BN"), out_features=["res5"])
    norms = [m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-4 and m.momentum == pytest.approx(0.003) for m in norms)
    with pytest.raises(ValueError, match="OFFICIAL.NORM"):
        official_norm("GN")(8)


def test_anchors_of_one_level_by_hand():
    gen = OfficialAnchorGenerator(strides=[4], aspect_ratios=[1.0, 2.0, 0.5], anchor_size=8)
    anchors = gen([torch.zeros(1, 1, 2, 2)])[0].tensor.double()
    assert anchors.shape == (12, 4)
    r = 32 * math.sqrt(2) / 2  # half of the long side of a 2:1 anchor of area 32^2
    s = 32 / math.sqrt(2) / 2
    expected = [
        [2 - 16, 2 - 16, 2 + 16, 2 + 16],  # location (y=2, x=2), ratio w/h 1
        [2 - r, 2 - s, 2 + r, 2 + s],  # ratio 2: wider than tall
        [2 - s, 2 - r, 2 + s, 2 + r],  # ratio 0.5
        [6 - 16, 2 - 16, 6 + 16, 2 + 16],  # next location: x = 6 (x fastest)
    ]
    assert torch.allclose(anchors[:4], torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(anchors[6], torch.tensor([2 - 16, 6 - 16, 2 + 16, 6 + 16.0]).double())


def test_box_coding_by_hand_order_and_plus_one():
    coder = OfficialBox2BoxTransform((10.0, 10.0, 5.0, 5.0))
    anchor = torch.tensor([[0.0, 0.0, 9.0, 19.0]] * 2)  # w = 10, h = 20 ("+1"), centre (5, 10)
    target = torch.tensor([[5.0, 10.0, 14.0, 29.0], [0.0, 0.0, 19.0, 9.0]])
    deltas = coder.get_deltas(anchor, target).double()
    expected = torch.tensor(
        [[10 * 0.5, 10 * 0.5, 0.0, 0.0],  # (dy, dx, dh, dw): dy = (20 - 10) / 20
         [10 * -0.25, 10 * 0.5, 5 * math.log(10 / 20), 5 * math.log(20 / 10)]],
        dtype=torch.float64,
    )  # fmt: skip
    assert torch.allclose(deltas, expected, atol=1e-6)
    assert torch.allclose(coder.apply_deltas(deltas.float(), anchor), target, atol=1e-4)
    # Zero deltas give the box back: the decoded box ends at x1 + w - 1.
    point = torch.tensor([[3.0, 4.0, 3.0, 4.0]])
    assert coder.apply_deltas(torch.zeros(1, 4), point).tolist() == point.tolist()


def test_box_coding_caps_the_scale():
    coder = OfficialBox2BoxTransform()
    out = coder.apply_deltas(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.zeros(1, 4))
    assert torch.isfinite(out).all() and out[0, 2] - out[0, 0] + 1 == pytest.approx(1000 / 16)


@pytest.mark.parametrize(
    "side, level", [(224, 4), (223, 3), (448, 5), (112, 3), (111.9, 2), (1, 2), (2000, 6), (0, 2)]
)
def test_roi_level_rule(side, level):
    # floor(log2(sqrt(area) / 224)) + 4, clamped to P2..P6; w = x2 - x1 (no "+1").
    box = torch.tensor([[10.0, 20.0, 10.0 + side, 20.0 + side]])
    assert official_roi_levels(box, 2, 6).item() == level


def test_crop_and_resize_samples_bin_centres():
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    level2 = (2 * ys + 3 * xs + 1)[None, None]  # bilinear sampling is exact on a plane
    feats = [level2, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4)]
    pooler = OfficialROIPooler(7, [1 / 4, 1 / 8, 1 / 16])
    box = Boxes(torch.tensor([[8.0, 4.0, 36.0, 32.0]]))  # level 2; in P2 pixels x 2..9, y 1..8
    out = pooler(feats, [box])[0, 0].double()
    y = 1 + torch.arange(7, dtype=torch.float64) + 0.5
    x = 2 + torch.arange(7, dtype=torch.float64) + 0.5
    assert torch.allclose(out, 2 * y[:, None] + 3 * x[None, :] + 1, atol=1e-4)
    # Beyond the last row/column the sample reads the edge; before the first it extrapolates.
    edge = pooler(feats, [Boxes(torch.tensor([[56.0, 56.0, 84.0, 84.0]]))])[0, 0]
    assert edge[-1, -1].item() == pytest.approx(2 * 15 + 3 * 15 + 1)


def test_legacy_resize_by_hand():
    out = legacy_resize_bilinear(GRID[0], (2, 2))[0]
    assert out.tolist() == [[0.0, 2.0], [8.0, 10.0]]  # no half-pixel centres
    up = legacy_resize_bilinear(torch.tensor([[[0.0, 10.0]]]), (1, 4))[0, 0]
    assert up.tolist() == [0.0, 5.0, 10.0, 10.0]


def test_scaled_size_rounds_like_tf():
    assert official_scaled_size(240, 200, 256) == (256, 213)
    assert official_scaled_size(200, 300, 256) == (171, 256)


def test_post_processing_per_class_nms_and_top_k():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2]])
    out = official_detections(boxes, scores, (40, 40), 0.0, 0.5, 1000, 4)
    # Class 0: box 1 overlaps box 0 (IoU 0.68) and goes; class 1 keeps it. Top 4 by score;
    # box 2 is clipped to [0, 39].
    assert out.scores.tolist() == pytest.approx([0.9, 0.7, 0.3, 0.2])
    assert out.pred_classes.tolist() == [0, 1, 0, 1]
    assert out.pred_boxes.tensor[2].tolist() == [39.0, 39.0, 39.0, 39.0]


def test_fc6_rows_follow_the_official_flattening():
    head = OfficialBoxHead(ShapeSpec(channels=256, height=7, width=7), conv_dims=[],
                           fc_dims=[4], norm=official_norm("BN"))  # fmt: skip
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((7 * 7 * 256, 4)).astype(np.float32)
    x_nhwc = rng.standard_normal((1, 7, 7, 256)).astype(np.float32)
    expected = x_nhwc.reshape(1, -1).astype(np.float64) @ kernel.astype(np.float64)
    key = "roi_heads.box_head.fcs.0.weight"
    layout = {k: lay for _, k, lay in official_key_map()}[key]
    from vild_d2.official.checkpoint.convert import _convert

    head.fcs[0].weight.data = torch.from_numpy(_convert(kernel, layout).copy())
    head.fcs[0].bias.data.zero_()
    out = head.fcs[0](torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).flatten(1))
    assert np.allclose(out.detach().numpy(), expected, atol=1e-3)


def test_transposed_conv_kernel_layout():
    from vild_d2.official.checkpoint.convert import _convert

    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 2, 3, 5))  # TF conv2d_transpose: (kh, kw, out, in)
    x = rng.standard_normal((2, 2, 5))  # (H, W, in)
    expected = np.zeros((4, 4, 3))
    for i, j, a, b in np.ndindex(2, 2, 2, 2):  # stride 2, 'valid': out[2i+a, 2j+b]
        expected[2 * i + a, 2 * j + b] += k[a, b] @ x[i, j]
    head = OfficialMaskHead(ShapeSpec(channels=5), conv_dims=[], norm=official_norm("BN"))
    head.deconv = torch.nn.ConvTranspose2d(5, 3, 2, stride=2, bias=False).double()
    head.deconv.weight.data = torch.from_numpy(_convert(k, "deconv").copy())
    out = head.deconv(torch.from_numpy(x).permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    assert np.allclose(out.detach().numpy(), expected)


def test_converter_names_every_problem_at_once():
    tf_vars = random_official_weights(official_variables(50), seed=3)
    tf_vars.pop("fpn/p6/kernel")
    tf_vars["fpn/l2/bias"] = np.zeros(3, np.float32)
    tf_vars["fpn/extra/kernel"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as err:
        convert_official_weights(tf_vars, 50)
    msg = str(err.value)
    assert "\n" not in msg and "1 missing (fpn/p6/kernel)" in msg
    assert "1 of another shape (fpn/l2/bias [3] (expected [256]))" in msg
    assert "1 unexpected (fpn/extra/kernel)" in msg


def test_converter_layouts_and_suffixes():
    variables = official_variables(50, ensemble=True)
    tf_vars = random_official_weights(variables, seed=1)
    renamed = {n.replace("resnet50/", "resnet50_sim_clr/") + ":0": v for n, v in tf_vars.items()}
    state, info = convert_official_weights(renamed, 50, ensemble=True)
    assert len(state) == len(variables) - 1  # all but the classifier, which is the vocabulary
    k = tf_vars["fpn/p6/kernel"]
    assert torch.equal(state["backbone.p6_conv.weight"], torch.from_numpy(k.transpose(3, 2, 0, 1)))
    bn = "resnet50/batch_normalization_1/moving_variance"
    assert torch.equal(state["backbone.bottom_up.res2.0.shortcut.norm.running_var"],
                       torch.from_numpy(tf_vars[bn]))  # fmt: skip
    classifier = tf_vars["frcnn_layer_0/fast_rcnn_head/class-predict/kernel"]
    assert torch.equal(info["classifier"], torch.from_numpy(classifier.T.copy()))
    assert normalize_official_name("resnet152/conv2d_sim_clr/kernel:0") == "resnet152/conv2d/kernel"


@pytest.mark.parametrize("depth", [101, 152])
def test_key_map_covers_deeper_resnets(depth):
    names = {n for n, _ in official_variables(depth, ensemble=True)}
    mapped = {n for n, _, _ in official_key_map(depth, ensemble=True)}
    assert names - mapped == {"frcnn_layer_0/fast_rcnn_head/class-predict/kernel"}
    assert mapped <= names


def test_rpn_proposals_by_hand():
    from vild_d2.official.rpn import official_rpn_proposals

    level_a = torch.tensor([[[0.0, 0, 10, 10], [1, 1, 11, 11], [5, 5, 25, 25]]])
    level_b = torch.tensor([[[0.0, 0, 10, 10]]])
    logits = [torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([[3.0]])]
    # IoU(box 0, box 1) = 81 / 119 = 0.68: kept at NMS 0.7, suppressed at 0.6. Levels have
    # their own NMS (level b's box equals box 0); 3 proposals overall.
    (out,) = official_rpn_proposals([level_a, level_b], logits, [(20, 20)], 0.7, 1000, 3)
    assert out.objectness_logits.tolist() == [3.0, 2.0, 1.0]
    (out,) = official_rpn_proposals([level_a, level_b], logits, [(20, 20)], 0.6, 1000, 3)
    assert out.objectness_logits.tolist() == [3.0, 2.0, 0.5]
    assert out.proposal_boxes.tensor[2].tolist() == [5.0, 5.0, 19.0, 19.0]  # clipped to 19


def test_official_preprocessing(tmp_path):
    from detectron2.modeling import build_model

    from vild_d2 import Vocabulary
    from vild_d2.config import load_config

    vocab = tmp_path / "v.pth"
    Vocabulary(["a", "b"], torch.randn(2, 512)).save(str(vocab))
    cfg = load_config("configs/LVIS-OVD/official/vild_R50_tf.yaml", [
        "MODEL.VILD.TRAIN_VOCABULARY", str(vocab), "MODEL.VILD.TEST_VOCABULARY", str(vocab),
        "MODEL.VILD.OFFICIAL.IMAGE_SIZE", "256",
        "MODEL.DEVICE", "cpu",
    ])  # fmt: skip
    model = build_model(cfg).eval()
    image = torch.full((3, 240, 200), 255, dtype=torch.uint8)
    image[0] = 0
    images, sizes = model.preprocess_for_inference([{"image": image}])
    assert images.tensor.shape == (1, 3, 256, 256) and sizes == [(256, 213)]
    assert images.image_sizes == [(256, 256)]  # boxes clip to the whole canvas
    expected = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]  # RGB input
    assert images.tensor[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert images.tensor[0, :, :, 213:].abs().max() == 0 and images.tensor[0, :, 255].any()


def test_post_processing_reads_slivers_like_tf():
    # A decoded box narrower than 1 px ends before it starts (x2 = x1 + w - 1): TF's padded NMS
    # sorts its corners, so two overlapping slivers suppress each other; an all-zero box is
    # padding to it and never kept.
    boxes = torch.tensor([[0.3, 10, 0.2, 30], [0.29, 11, 0.21, 31], [0.0, 0, 0, 0]])
    scores = torch.tensor([[0.9], [0.8], [0.95]])
    out = official_detections(boxes, scores, (40, 40), 0.0, 0.5, 1000, 10)
    assert out.scores.tolist() == pytest.approx([0.9])
    assert out.pred_boxes.tensor[0].tolist() == pytest.approx([0.3, 10, 0.2, 30])  # as decoded


def test_r152_ensemble_converts_and_loads(tmp_path):
    from detectron2.modeling import build_model

    from vild_d2.config import load_config
    from vild_d2.official import official_vocabulary

    tf_vars = random_official_weights(official_variables(152, ensemble=True), seed=0)
    state, info = convert_official_weights(tf_vars, 152, ensemble=True)
    official_vocabulary(info["classifier"]).save(str(tmp_path / "v.pth"))
    cfg = load_config("configs/LVIS-OVD/official/vild_ensemble_R152_tf.yaml", [
        "MODEL.VILD.TRAIN_VOCABULARY", str(tmp_path / "v.pth"),
        "MODEL.VILD.TEST_VOCABULARY", str(tmp_path / "v.pth"), "MODEL.DEVICE", "cpu",
    ])  # fmt: skip
    missing, unexpected = build_model(cfg).load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
