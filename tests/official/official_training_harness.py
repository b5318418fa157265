"""Training parity with the official TensorFlow ViLD (issue 28): the fixture's one training step
(tests/fixtures/official_vild/train_*.npz, FORMAT.md "Training fixture") replayed on vild_d2's
official training path with the recorded random choices, and compared quantity by quantity.

Test harness, not library code (it stays out of the wheel). Shape shorthand: B = 2 images,
S = 512 sampled RoIs, Q = 300 distillation slots, M = 128 mask RoIs, V = official variables.
"""

import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.structures import Boxes, Instances, pairwise_iou

from vild_d2.config import load_config
from vild_d2.official.checkpoint import convert as convert_module
from vild_d2.official.checkpoint.convert import (
    convert_official_weights,
    official_key_map,
    official_vocabulary,
)
from reference.parity import CONFIGS, FIXTURE_DIR
from reference.random_weights import random_official_weights
from vild_d2.official.training import RecordedShuffles, official_l2_loss
from vild_d2.official.checkpoint.variables import official_variables

ROOT = Path(__file__).resolve().parents[2]
FORMAT_VERSION = 1
# (fixture key, our loss key, factor applied to ours)
LOSSES = [
    ("loss_rpn_score", "loss_rpn_cls", 1.0),
    ("loss_rpn_box", "loss_rpn_loc", 1.0),
    ("loss_class", "loss_cls", 1.0),
    ("loss_box", "loss_box_reg", 1.0),
    ("loss_mask", "loss_mask", 1.0),
    ("loss_distill", "loss_distill", None),
]
PREDICTORS = (
    "rpn-class/",
    "rpn-box/",
    "box-predict/",
    "background-class-predict/",
    "mask_fcn_logits/",
    "project-to-clip/",
)
# Layers followed by a batch norm: their bias's true gradient is 0.
BN_FED = (
    "fpn/post_hoc_d",
    "fpn/p6/",
    "rpn_head/rpn/",
    "rpn_head/rpn-1/",
    "/conv_",
    "/fc6/",
    "/fc7/",
    "/distill_conv_",
    "/distill_fc",
    "mask-conv-l",
    "conv5-mask/",
)
# The tolerances ("Done when"); BN-fed biases: |ours - official| / the layer's kernel
# gradient norm (both sides are float noise around a true 0).
TOL = {
    "loss": 1e-4,
    "head_grad": 1e-3,
    "predictor": 1e-3,
    "other_rel": 3e-2,
    "other_cos": 0.999,
    "bn_bias": 1e-3,
    "bn_stats": 1e-4,
    # The L1 distillation gradient is +-c per element: a sign may differ only where
    # |embedding - target| is below this (the kink, within forward float noise).
    "distill_flip_gap": 1e-4,
}
# What the test asserts, by the fixture's `bn_moments` (FORMAT.md, "Training fixture").
# "float64_layers" (the committed fixtures): the official graph with its BN, convolutions, dense
# layers and RoIAlign reduced in float64 (tools/official_train_reference.py --exact-layers,
# wrappers): the tolerances, every one (docs/OFFICIAL.md, changes 4 and 5), with the L1
# distillation's subgradient replayed from the fixture at its kink (`_pin_l1_ties`): at most
# `l1_pins_max` elements, each within `l1_pin_gap` of the kink (measured: 2 and 1, <= 1.8e-6).
LIMITS_LAYERS = dict(TOL, l1_pin_gap=1e-5, l1_pins_max=8)
# "float64" (--exact-bn-moments, the fixtures before): every figure met the tolerance
# except one group, whose limit is the measured figure with a margin:
LIMITS = dict(
    TOL,
    # measured 3.5e-2: the ensemble's fpn/p4-bn/beta gradient and so its update (a small one:
    # norm 0.019, against 0.17 for p3-bn/beta; the only one of 255 above 3e-2, median 1e-2);
    # cosine still >= 0.999 (the issue's). ViLD: 1.7e-2.
    other_rel=5e-2,
)
# "tf" (plain official graph, `tf.nn.moments` in float32): its BN moments are off by 4.8e-5 at
# the first BN and it grows along the network (docs/OFFICIAL.md "Training parity";
# tests/official/official_training_noise.py reproduces it), so these limits are the figures measured
# against such a fixture, with a margin.
LIMITS_TF_MOMENTS = dict(
    TOL,
    loss_box=1e-3,  # measured 3.4e-4 (the box deltas of 20 + 13 foreground RoIs)
    head_grad=2e-2,  # measured 7.5e-3 (class logits: softmax at temperature 100)
    predictor=5e-3,  # measured 1.9e-3 (rpn-box, box-predict kernels)
    l1_predictor=0.15,  # measured 5.1e-2 (ensemble: 16 sign flips of the L1 gradient)
    other_rel=0.25,  # measured 0.11 (the first ResNet stages)
    other_cos=0.98,  # measured 0.9938
    bn_stats=5e-3,  # measured 1.1e-3 (fpn/p6-bn, 32 values per channel)
    distill_flip_gap=1e-3,  # measured 2.5e-4 (11 and 16 of ~19k elements flip)
)


def limits_for(bn_moments: str) -> Dict:
    """The limits the test asserts for a fixture whose `bn_moments` is this. "float64_bn" (the
    reference's BN wholly in float64, tools/official_reference.py --exact-bn; not committed):
    as "float64", its worst "other" gradient measured 3.8e-2 (rpn_head/rpn-l5-bn/beta)."""
    modes = {
        "float64_layers": LIMITS_LAYERS,
        "float64_bn": LIMITS,
        "float64": LIMITS,
        "tf": LIMITS_TF_MOMENTS,
    }
    if bn_moments not in modes:
        raise FixtureError(f"bn_moments {bn_moments!r}: expected one of {sorted(modes)}")
    return modes[bn_moments]


class FixtureError(ValueError):
    """The fixture does not fit this test (another seed, format or shape)."""


def load(name: str) -> Dict[str, np.ndarray]:
    with np.load(FIXTURE_DIR / f"{name}.npz", allow_pickle=False) as f:
        return dict(f)


def fixture_paths(name: str) -> List[Path]:
    return [
        FIXTURE_DIR / "common.npz",
        FIXTURE_DIR / "train_common.npz",
        FIXTURE_DIR / f"train_{name}.npz",
    ]


def check_fixture(common, ref, tf_vars: Dict[str, np.ndarray], variables) -> None:
    """One clear error for a fixture of another format, seed or model."""
    for key, f in (("train_common", common), (str(ref.get("config", "")), ref)):
        if int(f.get("format_version", -1)) != FORMAT_VERSION:
            raise FixtureError(
                f"{key}: format_version {f.get('format_version')} (this test reads "
                f"{FORMAT_VERSION})"
            )
    limits_for(str(ref.get("bn_moments", "tf")))  # a mode this test knows
    names = [n for n, _ in variables]
    if list(ref["var_names"]) != names:
        raise FixtureError(
            f"fixture variables ({len(ref['var_names'])}) are not "
            f"official_variables ({len(names)}) in order"
        )
    sums = np.array([tf_vars[n].sum(dtype=np.float64) for n in names])
    if ref["weight_sums"].shape != sums.shape or not np.allclose(
        ref["weight_sums"], sums, rtol=1e-6, atol=1e-6
    ):
        raise FixtureError(
            f"the fixture's weights are not random_official_weights(seed="
            f"{int(ref['seed'])}): weight_sums differ (another seed or generator)"
        )
    a = int(common["anchors"].shape[0])
    for key, shape in (
        ("rpn_score_targets", (2, a)),
        ("gt_boxes", (2, 300, 4)),
        ("roi_boxes", (2, 300, 4)),
        ("gt_visual_feat", (2, 300, 512)),
    ):
        if tuple(common[key].shape) != shape:
            raise FixtureError(f"train_common {key}: shape {common[key].shape}, expected {shape}")
    for key, shape in (
        ("roi_perm", (2, 1300)),
        ("sampled_indices", (2, 512)),
        ("mask_targets", (2, 128, 28, 28)),
        ("grad_box_deltas", (2, 512, 4)),
        ("grad_mask_logits", (2, 128, 28, 28)),
    ):
        if tuple(ref[key].shape) != shape:
            raise FixtureError(
                f"train_{ref['config']} {key}: shape {ref[key].shape}, " f"expected {shape}"
            )


def build(name: str, seed: int, workdir: str):
    """The official config's model (train mode, BN, official training path, the official
    all-LVIS vocabulary with rare masking, as vild_resnet.yaml), its cfg, the TF variables."""
    ensemble = name == "vild_ensemble"
    variables = official_variables(50, ensemble)
    tf_vars = random_official_weights(variables, seed)
    state, info = convert_official_weights(tf_vars, 50, ensemble)
    vocab_file = f"{workdir}/{name}_train_vocabulary.pth"
    official_vocabulary(info["classifier"]).save(vocab_file)
    cfg = load_config(
        str(ROOT / CONFIGS[name]),
        [
            "MODEL.VILD.TRAIN_VOCABULARY",
            vocab_file,
            "MODEL.VILD.TEST_VOCABULARY",
            vocab_file,
            "MODEL.VILD.OFFICIAL.IMAGE_SIZE",
            "256",
            "MODEL.VILD.OFFICIAL.NORM",
            "BN",
            "MODEL.VILD.OFFICIAL.MASK_RARE",
            "True",
            "MODEL.DEVICE",
            "cpu",
        ],
    )
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model.train(), cfg, tf_vars, variables


def _xyxy(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a[..., [1, 0, 3, 2]])).float()


def inputs(model, images: Dict[str, np.ndarray], common: Dict[str, np.ndarray]):
    """The network input (the inference fixture's preprocessing: no jitter, no flip), targets
    and distillation boxes as the official parser gives them."""
    raw = [{"image": torch.from_numpy(images[f"image_{i}"]).permute(2, 0, 1)} for i in range(2)]
    canvas, _ = model.preprocess_for_inference(raw)
    x = canvas.tensor.double()
    sums = x.sum(dim=(1, 2, 3)).numpy()
    scale = x.abs().sum(dim=(1, 2, 3)).numpy()
    if (
        common["images_sum"].shape != (2,)
        or (np.abs(sums - common["images_sum"]) > 1e-5 * scale).any()
    ):
        raise FixtureError(
            f"the network input differs from the fixture's: sums {sums}, fixture "
            f"images_sum {common['images_sum']}"
        )
    size = tuple(canvas.tensor.shape[-2:])
    targets, distill = [], []
    for i in range(2):
        n = int(common["num_gt"][i])
        t = Instances(size)
        t.gt_boxes = Boxes(_xyxy(common["gt_boxes"][i][:n]))
        t.gt_classes = torch.from_numpy(common["gt_classes"][i][:n]).long() - 1  # LVIS id - 1
        t.gt_mask_crops = torch.from_numpy(common["gt_masks"][i][:n]).float()
        targets.append(t)
        d = Instances(size)
        d.boxes = Boxes(_xyxy(common["roi_boxes"][i]))
        d.embeddings = torch.from_numpy(common["gt_visual_feat"][i]).float()
        distill.append(d)
    return canvas, targets, distill


def _shufflers(common, ref):
    rpn = RecordedShuffles(
        [common[f"anchor_shuffle_{i}_{k}"] for i in range(2) for k in ("pos", "neg")],
        "anchor sampling",
    )
    roi = RecordedShuffles(list(ref["roi_perm"]), "RoI sampling")
    rpn.record, roi.record = {}, {}
    return rpn, roi


def _official_proposals(ref, size) -> List[Instances]:
    out = []
    for i in range(2):
        inst = Instances(size)
        inst.proposal_boxes = Boxes(_xyxy(ref["proposals"][i]))
        out.append(inst)
    return out


def forward_losses(model, features, canvas, targets, distill, common, ref):
    """The RPN's and the RoI heads' losses with the recorded choices, on the official proposals
    (ours are compared separately). Returns (losses, rpn shuffler, roi shuffler, our proposals)."""
    rpn, roi = _shufflers(common, ref)
    model.proposal_generator.shuffler = rpn
    model.roi_heads.shuffler = roi
    proposals, rpn_losses = model.proposal_generator(canvas, features, targets)
    _, det = model.roi_heads(
        canvas, features, _official_proposals(ref, canvas.image_sizes[0]), targets, distill
    )
    rpn.check_used_up()
    roi.check_used_up()
    return {**rpn_losses, **det}, rpn, roi, proposals


# --- variables in the TF layout ---------------------------------------------------------------
def tf_layout_maps(variables, ensemble: bool) -> Dict[str, tuple]:
    """TF name -> (state-dict key, (n,) int64 index: TF flat index of each element of the
    PyTorch tensor, flattened). The converter only re-lays elements out, so pushing the index
    through it gives the map."""
    shapes = dict(variables)
    out = {}
    for tf_name, pt_key, layout in official_key_map(50, ensemble):
        n = int(np.prod(shapes[tf_name]))
        idx = np.arange(n, dtype=np.int64).reshape(shapes[tf_name])
        out[tf_name] = (pt_key, np.ascontiguousarray(convert_module._convert(idx, layout)).ravel())
    return out


def to_tf(values: Dict[str, torch.Tensor], maps, variables) -> Dict[str, np.ndarray]:
    """PyTorch tensors by state-dict key -> flat float64 arrays in the TF layout, by TF name."""
    out = {}
    for name, shape in variables:
        if name not in maps or maps[name][0] not in values:
            continue
        key, idx = maps[name]
        flat = np.zeros(int(np.prod(shape)), np.float64)
        flat[idx] = values[key].detach().double().numpy().ravel()
        out[name] = flat
    return out


def count_sketch(x: np.ndarray, seed: int, v: int) -> np.ndarray:
    """FORMAT.md's count sketch of variable index ``v``."""
    rng = np.random.default_rng([seed, 5, v])
    bucket = rng.integers(0, 128, x.size)
    sign = rng.integers(0, 2, x.size) * 2 - 1
    return np.bincount(bucket, weights=sign * x, minlength=128)


def _category(name: str) -> str:
    if "distill-project-to-clip/" in name:
        # Fed by the L1 distillation loss alone: its gradient is a sum of +-1 signs, and every
        # element whose |embedding - target| is within forward float noise may flip.
        return "l1_predictor"
    if any(p in name for p in PREDICTORS):
        return "predictor"
    if name.endswith("/bias") and any(p in name for p in BN_FED):
        return "bn_bias"
    return "other"


def compare_variables(
    ours: Dict[str, np.ndarray], ref, kind: str, seed: int, weights: Dict[str, np.ndarray] = None
) -> Dict:
    """``kind`` "grad" or "update": every trainable variable against the fixture (full values
    where stored, else the exact norm + the count sketch of the difference)."""
    names = [str(n) for n in ref["var_names"]]
    full, offset = {}, 0
    sizes = dict(zip(names, ref["var_sizes"].tolist()))
    lr = np.float32(ref["learning_rate"])
    for n in ref["full_names"]:
        g = ref["full_grad"][offset : offset + sizes[str(n)]]
        if kind == "update":  # TF's step-0 update is exactly float32(w - float32(lr) g) - w
            w = weights[str(n)].astype(np.float32).ravel()
            g = (w - lr * g.astype(np.float32)).astype(np.float64) - w
        full[str(n)] = g.astype(np.float64)
        offset += sizes[str(n)]
    worst = {
        "predictor": (0.0, ""),
        "l1_predictor": (0.0, ""),
        "bn_bias": (0.0, ""),
        "other_rel": (0.0, ""),
        "other_cos": (1.0, ""),
    }
    figures = {}
    for v, name in enumerate(names):
        if not ref["var_trainable"][v]:
            continue
        mine = ours[name]
        cat = _category(name)
        if name in full:
            theirs = full[name]
            diff = float(np.linalg.norm(mine - theirs))
            norm_t = float(np.linalg.norm(theirs))
            abs_max = float(np.abs(mine - theirs).max())
            cos = float(mine @ theirs / max(np.linalg.norm(mine) * norm_t, 1e-30))
        else:
            norm_t = float(ref[f"{kind}_norm"][v])
            diff = float(np.linalg.norm(count_sketch(mine, seed, v) - ref[f"{kind}_sketch"][v]))
            norm_m = float(np.linalg.norm(mine))
            cos = (norm_m**2 + norm_t**2 - diff**2) / max(2 * norm_m * norm_t, 1e-30)
            abs_max = None
        rel = diff / max(norm_t, 1e-30)
        figures[name] = (cat, rel, cos, abs_max)
        if cat == "bn_bias":
            # True gradient 0; both sides carry float noise (TF's ~1e-4: a sum of 2 x 812 x 49
            # terms). Measured against the layer's kernel gradient norm.
            kernel = names.index(name[: -len("bias")] + "kernel")
            value = (abs_max if abs_max is not None else diff) / max(
                float(ref[f"{kind}_norm"][kernel]), 1e-30
            )
            figures[name] = (cat, value, cos, abs_max)
            if value > worst["bn_bias"][0]:
                worst["bn_bias"] = (value, name)
        elif cat in ("predictor", "l1_predictor"):
            if rel > worst[cat][0]:
                worst[cat] = (rel, name)
        else:
            if rel > worst["other_rel"][0]:
                worst["other_rel"] = (rel, name)
            if cos < worst["other_cos"][0]:
                worst["other_cos"] = (cos, name)
    return {"worst": worst, "figures": figures}


def variables_ok(entry: Dict, tol: Dict) -> bool:
    w = entry["worst"]
    return (
        w["predictor"][0] <= tol["predictor"]
        and w["l1_predictor"][0] <= tol.get("l1_predictor", tol["predictor"])
        and w["other_rel"][0] <= tol["other_rel"]
        and w["other_cos"][0] >= tol["other_cos"]
        and w["bn_bias"][0] <= tol["bn_bias"]
    )


def verdicts(report: Dict, tol: Dict) -> Dict[str, bool]:
    """Which groups of figures are within ``tol`` (:data:`TOL` or :data:`LIMITS`)."""
    heads = report["head_grads"]
    return {
        "losses": all(v["rel"] <= tol.get(k, tol["loss"]) for k, v in report["losses"].items()),
        "bn": report["bn_worst"][1] <= tol["bn_stats"],
        "head_grads": all(v <= tol["head_grad"] for v in heads.values())
        and report["distill_grad_flip_max_gap"] <= tol["distill_flip_gap"]
        # the replayed kink ties: bounded where the limits pin them (the TOL has no pins)
        and report["distill_ties_pinned"] <= tol.get("l1_pins_max", float("inf"))
        and report["distill_grad_magnitude_rel"] <= tol["head_grad"],
        "grads": variables_ok(report["grads"], tol),
        "updates": variables_ok(report["updates"], tol),
    }


# --- the run ----------------------------------------------------------------------------------
def _bn_hooks(model, ref, ensemble: bool):
    """Forward hooks on the fixture's named BN layers: their batch mean and biased variance."""
    modules = dict(model.named_modules())
    key = {tf: pt for tf, pt, _ in official_key_map(50, ensemble)}
    stats, hooks = {}, []
    for name in ref["bn_names"]:
        module = modules[key[f"{name}/gamma"][: -len(".weight")]]

        def hook(m, args, out, name=str(name)):
            x = args[0].detach().double()
            stats[name] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))

        hooks.append(module.register_forward_hook(hook))
    return stats, hooks, [modules[key[f"{n}/gamma"][: -len(".weight")]] for n in ref["bn_names"]]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _pin_l1_ties(embeddings: torch.Tensor, gap: torch.Tensor, ref, pin_gap: float) -> Dict:
    """The L1 distillation's subgradient at its kink, replayed (docs/OFFICIAL.md "Change 5").
    Where |embedding - target| (``gap``, (2, 300, D)) is below ``pin_gap`` and vild_d2's
    gradient sign differs from the fixture's, the element gets the fixture's gradient (a
    backward hook on ``embeddings``, so everything upstream sees it): at the kink any value in
    [-c, c] is a subgradient, and float rounding picks the side. A sign that differs farther
    from the kink is left alone, and fails the comparison. Returns {"mask": the pinned elements
    (set by the hook), "handle": the hook's, to remove after the backward pass}."""
    theirs = torch.as_tensor(ref["grad_distill_embeddings"])
    ties = gap < pin_gap
    pinned = {"mask": torch.zeros_like(ties)}

    def hook(grad):
        g = grad.view(2, 300, -1)
        pinned["mask"] = ties & (torch.sign(g) != torch.sign(theirs.to(g.dtype)))
        return torch.where(pinned["mask"], theirs.to(g.dtype), g).view_as(grad)

    pinned["handle"] = embeddings.register_hook(hook)
    return pinned


def run_step(name: str, images, common, ref, workdir: str, reverts: bool = True) -> Dict:
    """Build, check the fixture, one forward/backward/SGD step; every figure compared."""
    model, cfg, tf_vars, variables = build(name, int(ref["seed"]), workdir)
    check_fixture(common, ref, tf_vars, variables)
    ensemble = name == "vild_ensemble"
    canvas, targets, distill = inputs(model, images, common)
    stats, hooks, bn_modules = _bn_hooks(model, ref, ensemble)
    try:
        features = model.backbone(canvas.tensor)
        losses, rpn, roi, proposals = forward_losses(
            model, features, canvas, targets, distill, common, ref
        )
    finally:
        for h in hooks:
            h.remove()
    # Fixtures written before the option existed are plain TF.
    report = {"bn_moments": str(ref.get("bn_moments", "tf"))}
    if reverts:
        from official_training_reverts import reverted_figures

        report["reverts"] = reverted_figures(
            model, cfg, features, canvas, targets, distill, common, ref
        )
    # Sampled anchors, RoIs, masks: identical.
    report["anchors_identical"] = bool(
        np.array_equal(
            torch.stack(rpn.record["rpn_score_targets"]).numpy(), common["rpn_score_targets"]
        )
    )
    report["rois_identical"] = bool(
        np.array_equal(torch.stack(roi.record["roi_indices"]).numpy(), ref["sampled_indices"])
    )
    report["masks_identical"] = bool(
        np.array_equal(torch.stack(roi.record["mask_indices"]).numpy(), ref["mask_indices"])
    )
    # Our own proposals (not used: sampling runs on the official ones): the fraction of the
    # official boxes found at IoU >= 0.999.
    report["own_proposals_matched"] = [
        float(
            (pairwise_iou(Boxes(_xyxy(ref["proposals"][i])), p.proposal_boxes).amax(dim=1) >= 0.999)
            .float()
            .mean()
        )
        for i, p in enumerate(proposals)
    ]
    # Losses.
    l2 = official_l2_loss(model, cfg.SOLVER.WEIGHT_DECAY)
    model_loss = sum(losses.values())
    figures = {}
    for key, ours_key, _ in LOSSES:
        ours = float(losses[ours_key])
        if key == "loss_distill":
            ours /= model.roi_heads.distill_weight  # the fixture's is before the weight
        figures[key] = (ours, float(ref[key]))
    figures["loss_model"] = (float(model_loss), float(ref["loss_model"]))
    figures["loss_l2"] = (float(l2), float(ref["loss_l2"]))
    figures["loss_total"] = (float(model_loss + l2), float(ref["loss_total"]))
    report["losses"] = {
        k: {"ours": a, "official": b, "rel": abs(a - b) / max(abs(b), 1e-30)}
        for k, (a, b) in figures.items()
    }
    # BN batch statistics (biased) and moving averages after the step.
    offs = np.cumsum([0, *ref["bn_sizes"].tolist()])
    bn = {}
    for j, n in enumerate(ref["bn_names"]):
        mean, var = stats[str(n)]
        sl = slice(offs[j], offs[j + 1])
        bn[str(n)] = max(
            _rel(mean, ref["bn_mean"][sl]),
            _rel(var, ref["bn_var"][sl]),
            _rel(bn_modules[j].running_mean, ref["bn_moving_mean_after"][sl]),
            _rel(bn_modules[j].running_var, ref["bn_moving_var_after"][sl]),
        )
    report["bn_worst"] = max(bn.items(), key=lambda kv: kv[1])
    # Gradients of the head outputs (loss_total: the L2 term does not reach them).
    rec = roi.record
    tgt = F.normalize(torch.cat([d.embeddings for d in distill]).double(), dim=1, eps=1e-8)
    gap = (rec["region_embeddings"][0].detach().double() - tgt).abs().view(2, 300, -1)
    pin_gap = limits_for(report["bn_moments"]).get("l1_pin_gap", 0.0)  # 0: nothing is pinned
    pinned = _pin_l1_ties(rec["region_embeddings"][0], gap, ref, pin_gap)
    model_loss.backward()
    pinned["handle"].remove()
    report["distill_ties_pinned"] = int(pinned["mask"].sum())
    mask = pinned["mask"]
    report["distill_ties_pinned_max_gap"] = float(gap[mask].max()) if mask.any() else 0.0
    g_cls = rec["class_logits"][0].grad.view(2, 512, -1)
    g_cls = torch.cat([g_cls[..., -1:], g_cls[..., :-1]], dim=-1)  # official: background first
    heads = {
        "class_logits": (
            torch.take_along_dim(g_cls, torch.as_tensor(ref["class_rows"]).long()[..., None], 1),
            ref["grad_class_logits_rows"],
        ),
        "class_logits_rownorm": (g_cls.norm(dim=-1), ref["grad_class_logits_rownorm"]),
        "box_deltas": (rec["box_deltas"][0].grad.view(2, 512, 4), ref["grad_box_deltas"]),
        "mask_logits": (rec["mask_logits"][0].grad.view(2, 128, 28, 28), ref["grad_mask_logits"]),
    }
    report["head_grads"] = {k: _rel(a.numpy(), b) for k, (a, b) in heads.items()}
    # The L1 distillation gradient is +-c per element: compared by sign, and a differing sign is
    # allowed only where |embedding - target| is within float noise (the L1 kink).
    ours_g = rec["region_embeddings"][0].grad.view(2, 300, -1).numpy()
    theirs_g = ref["grad_distill_embeddings"]
    flip = np.sign(ours_g) != np.sign(theirs_g)
    gap = gap.numpy()
    report["distill_grad_sign_flips"] = int(flip.sum())
    report["distill_grad_flip_max_gap"] = float(gap[flip].max()) if flip.any() else 0.0
    report["distill_grad_magnitude_rel"] = _rel(np.abs(ours_g), np.abs(theirs_g))
    # Variable gradients of loss_total = model loss + 4e-5 sum ||W||^2 / 2 (kernels).
    maps = tf_layout_maps(variables, ensemble)
    params = dict(model.named_parameters())
    decayed = {k for k, _ in official_l2_params(model)}
    grads = {
        k: p.grad + (cfg.SOLVER.WEIGHT_DECAY * p.detach() if k in decayed else 0.0)
        for k, p in params.items()
        if p.grad is not None
    }
    tf_grads = to_tf(grads, maps, variables)
    report["grads"] = compare_variables(tf_grads, ref, "grad", int(ref["seed"]))
    # One SGD step with detectron2's optimiser and scheduler under the official config.
    before = {k: p.detach().clone() for k, p in params.items()}
    classifier = model.roi_heads.box_predictor.cls_score.train_embeddings.clone()
    optimizer = build_optimizer(cfg, model)
    # The fixture's step is taken at its global step (500: mid warm-up; at step 0 the update,
    # lr x g ~ 3e-7, is a few float32 spacings of a weight near 1 and its rounding dominates).
    scheduler = build_lr_scheduler(cfg, optimizer)  # the warm-up learning rate of step 0
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(int(ref["global_step"]) if "global_step" in ref else 0):
            scheduler.step()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    updates = {k: p.detach() - before[k] for k, p in params.items()}
    # SGD's own rule (momentum's first step: -lr x gradient), to one rounding of the weight.
    eps = torch.finfo(torch.float32).eps
    rule = max(
        float(((updates[k] + lr * grads[k]).abs() - eps * before[k].abs()).clamp(min=0).max())
        / max(float((lr * grads[k]).abs().max()), 1e-30)
        for k in grads
    )
    report["lr"] = (lr, float(ref["learning_rate"]))
    report["own_update_rule_maxdev"] = rule
    report["official_update_rule_maxdev"] = float(ref["update_rule_maxdev"])
    report["updates"] = compare_variables(
        to_tf(updates, maps, variables), ref, "update", int(ref["seed"]), tf_vars
    )
    report["classifier_unchanged"] = bool(
        torch.equal(classifier, model.roi_heads.box_predictor.cls_score.train_embeddings)
        and bool(ref["classifier_unchanged"])
    )
    report["_state"] = (model, cfg, features, canvas, targets, distill)
    return report


def official_l2_params(model):
    from vild_d2.official.training import official_decay_parameters

    return list(official_decay_parameters(model).items())
