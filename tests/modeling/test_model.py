"""The ViLD model: math against float64 references, each variant end to end, vocabulary switch."""

import vild_d2  # noqa: F401  (first: compat bridges)

import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from vild_d2 import ViLDCheckpointer, ViLDOutputLayers, Vocabulary
from vild_d2.modeling import distillation_loss, ensemble_scores
from tiny_model import DIM, TEST_NAMES, TRAIN_NAMES, random_vocab, tiny_cfg, tiny_inputs


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    files = {}
    for key, names, seed in (("train", TRAIN_NAMES, 0), ("test", TEST_NAMES, 1)):
        files[key] = str(root / f"{key}.pth")
        random_vocab(names, seed).save(files[key])
    return files


def _predictor(**kwargs):
    torch.manual_seed(0)
    args = dict(
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        train_vocabulary=random_vocab(TRAIN_NAMES, 0),
        test_vocabulary=random_vocab(TEST_NAMES, 1),
        test_score_thresh=0.0,
        test_nms_thresh=1.0,
    )
    args.update(kwargs)
    return ViLDOutputLayers(ShapeSpec(channels=8), **args)


# ---------------------------------------------------------------------------------------------
# Math against independent float64 computations
def _ref_logits(pred, x, class_embeddings, temperature=0.01):
    x, W, b = (
        x.double(),
        pred.cls_score.projection.weight.double(),
        pred.cls_score.projection.bias.double(),
    )
    region = x @ W.t() + b
    region = region / region.norm(dim=1, keepdim=True)
    cls = torch.cat([class_embeddings.double(), pred.cls_score.background.double()[None]])
    cls = cls / cls.norm(dim=1, keepdim=True)
    return region @ cls.t() / temperature


def test_text_classifier_logits_and_loss_match_float64():
    pred = _predictor().train()
    x = torch.randn(6, 8)
    logits, deltas = pred(x)
    ref = _ref_logits(pred, x, pred.cls_score.train_vocabulary.embeddings)
    assert logits.shape == (6, len(TRAIN_NAMES) + 1) and deltas.shape == (6, 4)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-3)

    proposals = Instances((50, 50))
    proposals.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10]] * 6))
    proposals.gt_boxes = Boxes(torch.tensor([[1.0, 1, 11, 11]] * 6))
    proposals.gt_classes = torch.tensor([0, 1, 2, 3, 3, 1])  # 3 = background (K_train)
    with EventStorage():
        losses = pred.losses((logits, deltas), [proposals])
    # Softmax cross-entropy over K+1 columns, mean over RoIs, by hand in float64.
    gt = proposals.gt_classes
    ref_ce = (torch.logsumexp(ref, 1) - ref[torch.arange(6), gt]).mean()
    assert math.isclose(losses["loss_cls"].item(), ref_ce.item(), rel_tol=1e-4)
    assert losses["loss_box_reg"].item() > 0


def test_text_classifier_learns_separable_classes():
    """Optimisation sanity: frozen text embeddings + learned projection/background fit a
    separable 3-class + background problem with plain SGD (what the detector's head must do)."""
    torch.manual_seed(0)
    pred = _predictor().train()
    means = torch.randn(len(TRAIN_NAMES) + 1, 8) * 3

    def batch(n=256):
        y = torch.randint(0, len(TRAIN_NAMES) + 1, (n,))  # last index = background
        return means[y] + 0.3 * torch.randn(n, 8), y

    opt = torch.optim.SGD(pred.parameters(), lr=0.01, momentum=0.9)
    for _ in range(200):
        x, y = batch()
        loss = F.cross_entropy(pred(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch()
    accuracy = (pred(x)[0].argmax(1) == y).float().mean().item()
    assert accuracy > 0.95
    assert pred.cls_score.train_embeddings.grad is None  # the text classifier stays frozen


def test_test_vocabulary_in_eval_and_background_dropped_without_renormalising():
    pred = _predictor().eval()
    x = torch.randn(4, 8)
    logits, _ = pred(x)
    ref = _ref_logits(pred, x, pred.cls_score.test_vocabulary.embeddings)
    assert logits.shape == (4, len(TEST_NAMES) + 1)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-3)

    proposals = Instances((50, 60))
    proposals.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 45]] * 2))
    pred.test_topk_per_image = 100
    (inst,), _ = pred.inference(pred(x), [proposals])
    probs = ref.softmax(1)  # over K+1, background included
    # Every detection's score is its class's softmax probability over K+1 (not renormalised
    # over the K foreground classes after dropping background).
    roi = inst.pred_classes.new_tensor([0, 1, 2, 3]).repeat_interleave(len(TEST_NAMES))
    cls = torch.arange(len(TEST_NAMES)).repeat(4)
    expected = sorted(probs[roi, cls].tolist(), reverse=True)
    assert len(inst) == 4 * len(TEST_NAMES)
    assert inst.scores.tolist() == pytest.approx(expected, rel=1e-4)
    assert int(inst.pred_classes.max()) < len(TEST_NAMES)


def test_distillation_loss_matches_float64():
    region = F.normalize(torch.randn(7, DIM), dim=1)
    target = torch.randn(7, DIM) * 5  # un-normalised targets get normalised
    t = target.double() / target.double().norm(dim=1, keepdim=True)
    ref = (region.double() - t).abs().sum(1).mean()
    assert math.isclose(distillation_loss(region, target).item(), ref.item(), rel_tol=1e-5)
    empty = torch.zeros(0, DIM, requires_grad=True)
    zero = distillation_loss(empty, torch.zeros(0, DIM))
    assert zero.item() == 0.0 and zero.requires_grad


def test_ensemble_scores_hand_worked_and_float64():
    lam = 2.0 / 3.0
    p_t = torch.tensor([[0.8, 0.1]])
    p_i = torch.tensor([[0.2, 0.6]])
    is_base = torch.tensor([True, False])
    out = ensemble_scores(p_t, p_i, is_base, lam)
    # base: 0.8^(2/3) * 0.2^(1/3); novel: 0.1^(1/3) * 0.6^(2/3)
    assert out[0, 0].item() == pytest.approx(0.8 ** (2 / 3) * 0.2 ** (1 / 3), rel=1e-6)
    assert out[0, 1].item() == pytest.approx(0.1 ** (1 / 3) * 0.6 ** (2 / 3), rel=1e-6)

    p_t, p_i = torch.rand(5, 6), torch.rand(5, 6)
    is_base = torch.tensor([True, False, True, True, False, False])
    ref = torch.where(
        is_base,
        p_t.double() ** lam * p_i.double() ** (1 - lam),
        p_t.double() ** (1 - lam) * p_i.double() ** lam,
    )
    torch.testing.assert_close(ensemble_scores(p_t, p_i, is_base, lam).double(), ref)


# ---------------------------------------------------------------------------------------------
# Each variant end to end on a tiny model
EXPECTED_LOSSES = {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}


@pytest.mark.parametrize("variant", ["text", "image", "vild", "ensemble"])
def test_variant_train_step_and_inference(variant, vocab_files):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(variant, vocab_files))
    with EventStorage():
        losses = model(tiny_inputs())
    expected = EXPECTED_LOSSES | ({"loss_distill"} if variant != "text" else set())
    if variant == "image":
        expected = expected - {"loss_cls"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    if variant != "text":
        assert losses["loss_distill"].item() > 0
        head = (
            model.roi_heads.image_projection
            if variant == "ensemble"
            else model.roi_heads.box_predictor.cls_score.projection
        )
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    if variant == "ensemble":
        # The text-branch head receives no gradient from the distillation loss alone.
        model.zero_grad()
        with EventStorage():
            model(tiny_inputs())["loss_distill"].backward()
        assert (
            model.roi_heads.box_predictor.cls_score.projection.weight.grad is None
            or model.roi_heads.box_predictor.cls_score.projection.weight.grad.abs().sum() == 0
        )

    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": tiny_inputs()[0]["image"], "height": 64, "width": 80}])
    inst = out["instances"]
    assert len(inst) > 0
    assert int(inst.pred_classes.max()) < len(TEST_NAMES)
    assert inst.has("pred_masks") and inst.pred_masks.shape[1:] == (64, 80)
    assert float(inst.scores.max()) <= 1.0


def test_vild_image_has_no_text_term(vocab_files):
    """ViLD-image's total loss reaches the text classifier only through the distillation loss:
    the projection's gradient from the total equals its gradient from w * L_distill alone, and
    the background embedding (only the text cross-entropy would train it) gets none."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("image", vocab_files))
    classifier = model.roi_heads.box_predictor.cls_score
    with EventStorage():
        losses = model(tiny_inputs())
    total = sum(losses.values())
    from_total = torch.autograd.grad(total, classifier.projection.weight, retain_graph=True)[0]
    from_distill = torch.autograd.grad(
        losses["loss_distill"], classifier.projection.weight, retain_graph=True
    )[0]
    assert from_distill.abs().sum() > 0
    torch.testing.assert_close(from_total, from_distill, rtol=1e-6, atol=1e-9)
    (grad_bg,) = torch.autograd.grad(total, classifier.background, allow_unused=True)
    assert grad_bg is None or grad_bg.abs().sum() == 0

    # The same model as ViLD (text loss on) does give the text classifier a text gradient.
    torch.manual_seed(0)
    vild = build_model(tiny_cfg("vild", vocab_files))
    with EventStorage():
        vild_losses = vild(tiny_inputs())
    (grad_bg,) = torch.autograd.grad(
        sum(vild_losses.values()), vild.roi_heads.box_predictor.cls_score.background
    )
    assert grad_bg.abs().sum() > 0


def test_vild_image_scores_by_hand(vocab_files):
    """At test time ViLD-image scores a box by softmax over the test classes (no background) of
    cos / T, times sigmoid(objectness) ** w: recomputed here in float64 from its own RoIs."""
    torch.manual_seed(0)
    cfg = tiny_cfg("image", vocab_files, **{"MODEL.VILD.TEMPERATURE": 0.5})
    model = build_model(cfg).eval()
    rh = model.roi_heads
    image = tiny_inputs()[0]["image"]
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        (got,) = rh(images, features, proposals)[0]
        feats = [features[f] for f in rh.box_in_features]
        pooled = rh.box_pooler(feats, [p.proposal_boxes for p in proposals])
        emb = rh.box_predictor.cls_score.embed(rh.box_head(pooled)).double()
    text = rh.box_predictor.cls_score.test_embeddings.double()
    text = text / text.norm(dim=1, keepdim=True)
    probs = (emb @ text.t() / 0.5).softmax(1)
    ref = probs * proposals[0].objectness_logits.double().sigmoid()[:, None] ** 0.5
    # Every kept detection's score is its RoI's score for its class (up to float32).
    best = ref.max().item()
    assert abs(got.scores.max().item() - best) < 1e-5
    assert int(got.pred_classes[got.scores.argmax()]) == int(ref.max(0).values.argmax())


def test_empty_annotations_and_empty_distillation(vocab_files):
    torch.manual_seed(0)
    for variant in ("vild", "ensemble"):
        model = build_model(tiny_cfg(variant, vocab_files))
        with EventStorage():
            # Image 0 has no annotations, image 1 no distillation boxes.
            losses = model(tiny_inputs(num_distill=(4, 0), with_gt=(False, True)))
            assert all(torch.isfinite(v) for v in losses.values())
            # No distillation box in the whole batch: zero loss, still differentiable.
            losses = model(tiny_inputs(num_distill=(0, 0)))
        assert losses["loss_distill"].item() == 0.0
        sum(losses.values()).backward()


def test_ensemble_base_novel_from_training_vocabulary(vocab_files):
    model = build_model(tiny_cfg("ensemble", vocab_files))
    is_base = model.roi_heads.box_predictor.cls_score.test_is_base.tolist()
    assert is_base == [n in TRAIN_NAMES for n in TEST_NAMES]
    # An explicit novel mask in the vocabulary wins.
    novel = torch.tensor([False, True, False, True, True])
    model.set_vocabulary(random_vocab(TEST_NAMES, 1, novel=novel))
    assert model.roi_heads.box_predictor.cls_score.test_is_base.tolist() == (~novel).tolist()


# ---------------------------------------------------------------------------------------------
# Vocabulary switching and checkpoints
def _detect(model, seed=3):
    model.eval()
    with torch.no_grad():
        return model([{"image": tiny_inputs(seed=seed)[0]["image"], "height": 64, "width": 80}])[0][
            "instances"
        ]


def test_vocabulary_switch_without_rebuilding_and_checkpoint(vocab_files, tmp_path):
    torch.manual_seed(0)
    # A soft temperature so that untrained scores are not all saturated at 1.0.
    cfg = tiny_cfg("vild", vocab_files, **{"MODEL.VILD.TEMPERATURE": 0.5})
    model = build_model(cfg)
    before = _detect(model)
    other = random_vocab(["cat", "dog"], seed=7)
    predictor = model.roi_heads.box_predictor
    model.set_vocabulary(other)
    assert model.roi_heads.box_predictor is predictor  # same module, no rebuild
    assert "cls_score.test_embeddings" in dict(predictor.named_buffers())  # still a buffer
    switched = _detect(model)
    assert model.vocabulary.names == ["cat", "dog"]
    assert int(switched.pred_classes.max()) < 2
    assert len(before) != len(switched) or not torch.allclose(before.scores, switched.scores)

    # Saved with the checkpoint; load() restores it into a model built with the config's.
    ViLDCheckpointer(model, str(tmp_path)).save("switched")
    fresh = build_model(cfg)
    assert fresh.vocabulary.names == TEST_NAMES
    ViLDCheckpointer(fresh, str(tmp_path)).load(str(tmp_path / "switched.pth"))
    assert fresh.vocabulary.names == ["cat", "dog"]
    again = _detect(fresh)
    torch.testing.assert_close(again.scores, switched.scores)
    assert torch.equal(again.pred_classes, switched.pred_classes)

    # Loading weights only (train_net --eval-only) keeps the config's vocabulary (transfer).
    weights_only = build_model(cfg)
    ViLDCheckpointer(weights_only).resume_or_load(str(tmp_path / "switched.pth"), resume=False)
    assert weights_only.vocabulary.names == TEST_NAMES
    torch.testing.assert_close(_detect(weights_only).scores, before.scores)

    # Switching back restores the original outputs exactly.
    model.set_vocabulary(vocab_files["test"])
    torch.testing.assert_close(_detect(model).scores, before.scores)


# ---------------------------------------------------------------------------------------------
# Bad input
def test_width_mismatch_is_a_clear_error(vocab_files, tmp_path):
    wide = str(tmp_path / "wide.pth")
    random_vocab(TEST_NAMES, 1, dim=DIM * 2).save(wide)
    with pytest.raises(ValueError, match=rf"{2 * DIM}-d.*{DIM}-d"):
        build_model(tiny_cfg("vild", {"train": vocab_files["train"], "test": wide}))
    model = build_model(tiny_cfg("vild", vocab_files))
    with pytest.raises(ValueError, match=rf"{2 * DIM}-d.*{DIM}-d"):
        model.set_vocabulary(wide)
    # Distillation targets from another CLIP width.
    with EventStorage(), pytest.raises(ValueError, match=rf"{DIM * 2}-d.*{DIM}-d"):
        model(tiny_inputs(dim=DIM * 2))


def test_missing_distillation_inputs_and_bad_variant(vocab_files):
    model = build_model(tiny_cfg("vild", vocab_files))
    inputs = tiny_inputs()
    for x in inputs:
        del x["distill"]
    with EventStorage(), pytest.raises(ValueError, match="distill"):
        model(inputs)
    with pytest.raises(ValueError, match="VARIANT"):
        build_model(tiny_cfg("clip", vocab_files))
    with pytest.raises(ValueError, match="empty vocabulary"):
        model.set_vocabulary(Vocabulary([], torch.zeros(0, DIM)))


def test_vild_box_head_norm_after_every_layer_and_plain_math():
    from vild_d2.modeling import ViLDConvFCHead

    shape = ShapeSpec(channels=4, height=3, width=3)
    head = ViLDConvFCHead(shape, conv_dims=[32], fc_dims=[32, 64], norm="GN")  # GN: 32 groups
    assert head.output_shape.channels == 64
    assert [type(n).__name__ for n in head.fc_norms] == ["GroupNorm", "GroupNorm"]
    assert head(torch.randn(2, 4, 3, 3)).shape == (2, 64)
    assert head(torch.zeros(0, 4, 3, 3)).shape == (0, 64)

    # Without norm: relu(fc2(relu(fc1(flatten(relu(conv(x))))))), computed in float64.
    head = ViLDConvFCHead(shape, conv_dims=[5], fc_dims=[6, 7], norm="").double()
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    conv = head.convs[0]
    y = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)).flatten(1)
    for fc in head.fcs:
        y = F.relu(y @ fc.weight.t() + fc.bias)
    torch.testing.assert_close(head(x), y)


# ---------------------------------------------------------------------------------------------
# Wiring of the distillation and ensemble branches, against references computed separately
def _features_and_proposals(model, seed=5):
    inputs = tiny_inputs(seed=seed)
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    rh = model.roi_heads
    return inputs, [features[f] for f in rh.box_in_features], features


@pytest.mark.parametrize("variant", ["vild", "ensemble"])
def test_distillation_loss_wiring_matches_per_image_reference(variant, vocab_files):
    """loss_distill equals w * L1 of each image's own distillation boxes, pooled alone through
    the branch that should embed them (same head for ViLD, the image head for the ensemble)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(variant, vocab_files)).eval()  # eval: no proposal sampling noise
    rh = model.roi_heads
    with torch.no_grad(), EventStorage():
        inputs, feats, features = _features_and_proposals(model)
        distill = [x["distill"] for x in inputs]
        proposals = []
        for x in inputs:  # a few arbitrary labelled RoIs per image
            p = Instances((64, 80))
            p.proposal_boxes = x["instances"].gt_boxes
            p.gt_boxes, p.gt_classes = x["instances"].gt_boxes, x["instances"].gt_classes
            proposals.append(p)
        rh.train()
        losses = rh._forward_box_with_distillation(feats, proposals, distill)
        rh.eval()
        ref = []
        for i, d in enumerate(distill):
            pooled = rh.box_pooler([f[i : i + 1] for f in feats], [d.boxes])
            if variant == "vild":
                emb = rh.box_predictor.cls_score.embed(rh.box_head(pooled))
            else:
                emb = rh.embed_image_branch(pooled)
            target = d.embeddings.double() / d.embeddings.double().norm(dim=1, keepdim=True)
            ref.append((emb.double() - target).abs().sum(1))
        expected = rh.distill_weight * torch.cat(ref).mean()
    assert losses["loss_distill"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_ensemble_inference_matches_float64_reference(vocab_files):
    torch.manual_seed(0)
    cfg = tiny_cfg("ensemble", vocab_files, **{"MODEL.VILD.TEMPERATURE": 0.5})
    model = build_model(cfg).eval()
    rh = model.roi_heads
    pred = rh.box_predictor
    pred.test_score_thresh, pred.test_nms_thresh, pred.test_topk_per_image = -1.0, 1.0, 1000
    with torch.no_grad():
        _, feats, _ = _features_and_proposals(model)
        p = Instances((64, 80))
        p.proposal_boxes = Boxes(
            torch.tensor([[2.0, 3, 30, 40], [35, 5, 78, 60], [10, 10, 50, 50]])
        )
        (inst,) = rh._forward_box({f: x[:1] for f, x in zip(rh.box_in_features, feats)}, [p])
        pooled = rh.box_pooler([f[:1] for f in feats], [p.proposal_boxes])
        # Text branch: softmax over K+1 (background dropped); image branch: softmax over K.
        logits_t = pred(rh.box_head(pooled))[0].double()
        p_t = logits_t.softmax(1)[:, :-1]
        emb_i = rh.image_projection(rh.image_box_head(pooled).flatten(1)).double()
        emb_i = emb_i / emb_i.norm(dim=1, keepdim=True)
        cls = pred.cls_score.test_embeddings.double()
        cls = cls / cls.norm(dim=1, keepdim=True)
        p_i = (emb_i @ cls.t() / 0.5).softmax(1)
        lam = 2.0 / 3.0
        is_base = torch.tensor([n in TRAIN_NAMES for n in TEST_NAMES])
        expected = torch.where(is_base, p_t**lam * p_i ** (1 - lam), p_t ** (1 - lam) * p_i**lam)
    assert len(inst) == 3 * len(TEST_NAMES)
    assert sorted(inst.scores.tolist(), reverse=True) == pytest.approx(
        sorted(expected.flatten().tolist(), reverse=True), rel=1e-4
    )
    # Each detection's class carries its own (roi, class) score: check the top one exactly.
    top = expected.flatten().argmax().item()
    assert int(inst.pred_classes[0]) == top % len(TEST_NAMES)


def test_images_with_empty_width_unknown_distillation_are_skipped(vocab_files):
    """A mapper output for an image without boxes can have (0, 0) embeddings (width unknown)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("vild", vocab_files))
    inputs = tiny_inputs(num_distill=(3, 0))
    inputs[1]["distill"].embeddings = torch.zeros(0, 0)
    with EventStorage():
        losses = model(inputs)
    assert torch.isfinite(losses["loss_distill"]) and losses["loss_distill"].item() > 0


def test_vocabulary_follows_model_dtype_and_class_specific_heads_are_refused(vocab_files):
    model = build_model(tiny_cfg("vild", vocab_files)).half()
    model.set_vocabulary(random_vocab(["cat", "dog"], seed=7))
    assert model.roi_heads.box_predictor.cls_score.test_embeddings.dtype == torch.float16
    with pytest.raises(ValueError, match="class-agnostic"):
        build_model(
            tiny_cfg("vild", vocab_files, **{"MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK": False})
        )


def test_precomputed_proposals_and_one_box_image_branch(vocab_files):
    torch.manual_seed(0)
    overrides = {
        "MODEL.LOAD_PROPOSALS": True,
        "MODEL.PROPOSAL_GENERATOR.NAME": "PrecomputedProposals",
    }
    model = build_model(tiny_cfg("ensemble", vocab_files, **overrides))
    assert model.proposal_generator is None
    inputs = tiny_inputs(num_distill=(1, 0))  # one distillation box in the whole batch
    for x in inputs:
        p = Instances((64, 80))
        p.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 40, 40], [30, 10, 79, 60]]))
        p.objectness_logits = torch.zeros(2)
        x["proposals"] = p
    with EventStorage():
        losses = model(inputs)
    assert "loss_rpn_cls" not in losses
    # Fewer than 2 boxes: the image branch is skipped (zero loss) rather than crash a BN head.
    assert losses["loss_distill"].item() == 0.0 and losses["loss_distill"].requires_grad


def test_vocabulary_from_another_clip_of_the_same_width_warns(vocab_files, caplog):
    model = build_model(tiny_cfg("vild", vocab_files))
    model.roi_heads.box_predictor.cls_score.train_vocabulary.clip_model = "ViT-B/32"
    other = Vocabulary(["cat", "dog"], torch.randn(2, DIM), clip_model="ViT-B/16")
    with caplog.at_level("WARNING"):
        model.set_vocabulary(other)
    assert "ViT-B/16" in caplog.text and "ViT-B/32" in caplog.text


def test_predictor_and_model_share_one_text_encoder(vocab_files):
    cfg = tiny_cfg("vild", vocab_files)
    model = build_model(cfg)
    # The encoder that made the vocabularies serves run-time switches: CLIP loads at most once.
    assert model.text_encoder is model.roi_heads.box_predictor.text_encoder
    assert model.text_encoder is not None


def test_checkpoint_from_before_the_text_classifier_module_loads(vocab_files, tmp_path):
    """Checkpoints written when the projection and background sat on the box predictor itself
    (``box_predictor.projection.*``, ``box_predictor.background``) load into the
    ``cls_score`` (TextClassifier) and give the same detections."""
    torch.manual_seed(0)
    cfg = tiny_cfg("vild", vocab_files, **{"MODEL.VILD.TEMPERATURE": 0.5})
    model = build_model(cfg).eval()
    old = {}
    for key, value in model.state_dict().items():
        old[
            key.replace("box_predictor.cls_score.projection.", "box_predictor.projection.").replace(
                "box_predictor.cls_score.background", "box_predictor.background"
            )
        ] = value
    assert "roi_heads.box_predictor.projection.weight" in old  # the old layout
    torch.save({"model": old}, tmp_path / "old.pth")

    torch.manual_seed(1)  # other random weights, all of which the checkpoint must replace
    fresh = build_model(cfg).eval()
    ViLDCheckpointer(fresh).load(str(tmp_path / "old.pth"))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    a, b = _detect(model), _detect(fresh)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
