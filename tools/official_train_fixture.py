"""The training fixture's contents: hand-made annotations, count sketches, the saved arrays.

numpy only (no TensorFlow): used by `tools/official_train_reference.py`, which runs the official
graph. `count_sketch` is the recipe that FORMAT.md ("Training fixture") documents.
"""

import numpy as np

FORMAT_VERSION = 1
SKETCH_BUCKETS = 128
CLASS_ROWS, CLASS_ROWS_FG = 40, 24  # rows kept of the class-logit / embedding gradients
FROZEN = "frcnn_layer_0/fast_rcnn_head/class-predict/kernel"
HEAD = "frcnn_layer_0/fast_rcnn_head/"
PREDICTOR_KERNELS = (
    "rpn_head/rpn-class/kernel",
    "rpn_head/rpn-box/kernel",
    HEAD + "box-predict/kernel",
    HEAD + "background-class-predict/kernel",
    "mask_head/mask_fcn_logits/kernel",
)
ROW_SAMPLES = {  # variable -> number of rows kept (of the (prod(shape[:-1]), shape[-1]) view)
    HEAD + "project-to-clip/kernel": 128,
    HEAD + "distill-project-to-clip/kernel": 128,
    HEAD + "fc6/kernel": 16,
    HEAD + "fc7/kernel": 16,
    HEAD + "distill_fc6/kernel": 16,
    HEAD + "distill_fc7/kernel": 16,
    HEAD + "conv_0/kernel": 16,
    "rpn_head/rpn/kernel": 16,
    "mask_head/mask-conv-l0/kernel": 16,
    "fpn/l2/kernel": 16,
    "resnet50/conv2d/kernel": 16,
}

BN_LAYERS = (
    "resnet50/batch_normalization",
    "resnet50/batch_normalization_52",
    "fpn/p2-bn",
    "fpn/p6-bn",
    "rpn_head/rpn-l2-bn",
    "rpn_head/rpn-l6-bn-1",
    HEAD + "batch_normalization",  # conv_0
    HEAD + "batch_normalization_3",  # conv_3
    HEAD + "batch_normalization_4",  # fc6
    HEAD + "batch_normalization_5",  # fc7
    HEAD + "batch_normalization_6",  # ensemble: distill_conv_0
    HEAD + "batch_normalization_11",  # ensemble: distill_fc7
    "mask_head/batch_normalization",
    "mask_head/batch_normalization_4",  # conv5-mask (deconv)
)


def count_sketch(x, index, seed, buckets=SKETCH_BUCKETS):
    """(buckets,) float64 count sketch of x (any shape, read in C order); see FORMAT.md."""
    x = np.asarray(x, np.float64).ravel()
    rng = np.random.default_rng([seed, 5, index])
    bucket = rng.integers(0, buckets, x.size)
    sign = rng.integers(0, 2, x.size) * 2 - 1
    return np.bincount(bucket, weights=sign * x, minlength=buckets)


def _ellipse(h, w, box):
    """(h, w) uint8 mask: the ellipse inscribed in a normalised (y1, x1, y2, x2) box."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    y1, x1, y2, x2 = box[0] * h, box[1] * w, box[2] * h, box[3] * w
    cy, cx, ry, rx = (y1 + y2) / 2, (x1 + x2) / 2, (y2 - y1) / 2, (x2 - x1) / 2
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)


def annotations(images, rare_mask, seed):
    """Hand-made decoder outputs per image: boxes, base classes, crowd, masks, distill RoIs."""
    base_ids = np.flatnonzero(rare_mask[1:] > 0) + 1
    boxes = [  # small ones too, so that some anchors reach IoU 0.7 and some proposals 0.5
        [[0.08, 0.30, 0.50, 0.78], [0.42, 0.05, 1.00, 0.95], [0.60, 0.02, 0.85, 0.30]]
        + [[0.10, 0.05, 0.22, 0.20], [0.25, 0.80, 0.40, 0.97], [0.70, 0.55, 0.78, 0.66]]
        + [[0.30, 0.40, 0.45, 0.60]],
        [[0.18, 0.12, 0.86, 0.72], [0.55, 0.04, 0.97, 0.96], [0.00, 0.70, 0.30, 1.00]]
        + [[0.05, 0.05, 0.25, 0.20], [0.30, 0.78, 0.50, 0.92], [0.62, 0.40, 0.75, 0.52]]
        + [[0.10, 0.40, 0.35, 0.65]],
    ]
    crowd = [[False] * 7, [False, False, True] + [False] * 4]
    out = []
    for i, image in enumerate(images):
        rng = np.random.default_rng([seed, 4, i])
        h, w = image.shape[:2]
        b = np.array(boxes[i], np.float32)
        m = 40 if i == 0 else 24
        # Distillation boxes: jittered copies of the gt boxes, then random boxes.
        jitter = b[rng.integers(0, len(b), m // 2)] + rng.uniform(-0.06, 0.06, (m // 2, 4))
        y1x1 = rng.uniform(0.0, 0.75, (m - m // 2, 2))
        hw = rng.uniform(0.06, 0.5, (m - m // 2, 2))
        rand = np.concatenate([y1x1, y1x1 + hw], 1)
        roi = np.clip(np.concatenate([jitter, rand]), 0.0, 1.0).astype(np.float32)
        roi[:, 2:] = np.maximum(roi[:, 2:], roi[:, :2] + 0.02)
        out.append(
            {
                "boxes": b,
                "classes": rng.choice(base_ids, len(b), replace=False).astype(np.int64),
                "is_crowd": np.array(crowd[i]),
                "masks": np.stack([_ellipse(h, w, bb) for bb in b]),
                "roi_boxes": roi,
                "roi_features": rng.standard_normal((m, 512)).astype(np.float32),
            }
        )
    return out


def stack_labels(results):
    """The model's labels dict (numpy, batch axis first), as the input reader batches them."""

    def stack(get):
        return np.stack([get(r["labels"]) for r in results])

    labels = {}
    for key in ("rpn_score_targets", "rpn_box_targets", "anchor_boxes"):
        labels[key] = {
            lv: stack(lambda x, k=key, lv=lv: x[k][lv]) for lv in results[0]["labels"][key]
        }
    for key in ("image_info", "gt_boxes", "gt_classes", "gt_masks", "roi_boxes", "gt_visual_feat"):
        labels[key] = stack(lambda x, k=key: x[k])
    return labels


def class_rows(classes):
    """(2, 40) int32 sampled-RoI positions whose head gradients are kept, ascending per image.

    The first min(#fg, 24) foreground positions, then background ones evenly spread over
    0, 8, ..., 504 (the sampled RoIs are in candidate order, so fg ones cluster).
    """
    rows = []
    for cls in classes:
        fg = np.flatnonzero(cls > 0)[:CLASS_ROWS_FG]
        rest = np.setdiff1d(np.arange(0, len(cls), 8), fg)
        pick = np.linspace(0, len(rest) - 1, CLASS_ROWS - len(fg)).round().astype(int)
        rows.append(np.sort(np.concatenate([fg, rest[pick]])))
    return np.stack(rows).astype(np.int32)


def _rows(x, n_rows):
    view = x.reshape(-1, x.shape[-1])
    step = max(1, view.shape[0] // n_rows)
    return step, view[::step]


def summarise(name, out, weights, after, variables, seed):
    """The per-config fixture dict (FORMAT.md, "train_vild.npz and train_vild_ensemble.npz")."""
    names = [n for n, _ in variables]
    grads, lr = out["grads"], np.float32(out["learning_rate"])
    train = set(out["train_names"])
    if set(grads) != train:
        raise SystemExit(f"{name}: variables without a gradient: {sorted(train - set(grads))}")
    res = {
        "format_version": np.int64(FORMAT_VERSION),
        "seed": np.int64(seed),
        "config": np.array(name),
        "weight_sums": np.array([weights[n].sum(dtype=np.float64) for n in names]),
        "var_names": np.array(names),
        "var_sizes": np.array([weights[n].size for n in names], np.int64),
        "var_trainable": np.array([n in train for n in names]),
        "var_frozen": np.array([n in out["trainable_names"] and n not in train for n in names]),
        "var_decayed": np.array([n in out["decay_names"] for n in names]),
        "learning_rate": np.float64(lr),
    }
    for key in ("proposals", "roi_candidates", "roi_positive", "roi_sampled_indicator"):
        res[key] = out[key]
    for key in ("sampled_indices", "sampled_rois", "sampled_gt_boxes", "box_targets"):
        res[key] = out[key]
    for key in ("sampled_gt_classes", "sampled_gt_indices", "mask_indices", "mask_classes"):
        res[key] = out[key].astype(np.int32)
    res["mask_rois"], res["mask_targets"] = out["mask_rois"], out["mask_targets"]
    for key in [k for k in out if k.startswith("loss_")]:
        res[key] = np.float64(out[key])
    rows = class_rows(out["sampled_gt_classes"])
    res["class_rows"] = rows
    for key in ("class_logits", "text_embeddings"):
        g = out["grad_" + key]
        res[f"grad_{key}_rows"] = np.take_along_axis(g, rows[..., None], 1)
        res[f"grad_{key}_rownorm"] = np.linalg.norm(g.astype(np.float64), axis=-1).astype(
            np.float32
        )
    res["grad_mask_logits"] = out["grad_mask_logits"]  # zero on the filler slots: compresses
    res["grad_box_deltas"] = out["grad_box_deltas"]
    res["grad_distill_embeddings"] = out["grad_distill_embeddings"]
    bn = [n for n in BN_LAYERS if n in out["bn"]]
    res["bn_names"] = np.array(bn)
    res["bn_sizes"] = np.array([out["bn"][n][0].size for n in bn], np.int64)
    res["bn_count"] = np.array([out["bn"][n][2] for n in bn], np.int64)
    res["bn_mean"] = np.concatenate([out["bn"][n][0] for n in bn])
    res["bn_var"] = np.concatenate([out["bn"][n][1] for n in bn])
    res["bn_moving_mean_after"] = np.concatenate([after[n + "/moving_mean"] for n in bn])
    res["bn_moving_var_after"] = np.concatenate([after[n + "/moving_variance"] for n in bn])
    zeros = np.zeros(SKETCH_BUCKETS)
    g_norm, g_sk, u_norm, u_sk, full, rows = [], [], [], [], [], []
    maxdev = 0.0
    for v, n in enumerate(names):
        update = after[n].astype(np.float64) - weights[n]
        u_norm.append(np.linalg.norm(update))
        u_sk.append(count_sketch(update, v, seed) if u_norm[-1] else zeros)
        if n not in train:
            g_norm.append(0.0)
            g_sk.append(zeros)
            continue
        g = grads[n]
        g_norm.append(np.linalg.norm(g.astype(np.float64)))
        g_sk.append(count_sketch(g, v, seed))
        maxdev = max(maxdev, float(np.abs(after[n] - (weights[n] - lr * g)).max()))
        if g.ndim == 1 or n in PREDICTOR_KERNELS:
            full.append((n, g))
        if n in ROW_SAMPLES:
            rows.append((n, *_rows(g, ROW_SAMPLES[n])))
    res.update(
        grad_norm=np.array(g_norm),
        grad_sketch=np.array(g_sk, np.float32),
        update_norm=np.array(u_norm),
        update_sketch=np.array(u_sk, np.float32),
        full_names=np.array([f[0] for f in full]),
        full_grad=np.concatenate([f[1].ravel() for f in full]),
        rows_names=np.array([r[0] for r in rows]),
        rows_step=np.array([r[1] for r in rows], np.int64),
        rows_grad=np.concatenate([r[2].ravel() for r in rows]),
        classifier_unchanged=np.array(np.array_equal(after[FROZEN], weights[FROZEN])),
        update_rule_maxdev=np.float64(maxdev),
    )
    return res


def common_fixture(results, anns, batch, seed, args):
    """train_common.npz: the raw annotations and the parser's outputs."""
    labels = stack_labels(results)
    num_gt = (labels["gt_classes"] >= 0).sum(1)
    res = {
        "format_version": np.int64(FORMAT_VERSION),
        "seed": np.int64(seed),
        "image_size": np.int64(args.image_size),
        "tpu_commit": np.array(args.tpu_commit),
        "images_sum": batch.sum(axis=(1, 2, 3), dtype=np.float64),
        "image_info": labels["image_info"],
        "gt_boxes": labels["gt_boxes"],
        "gt_classes": labels["gt_classes"],
        "num_gt": num_gt.astype(np.int64),
        "gt_masks": labels["gt_masks"][:, : num_gt.max()],
        "roi_boxes": labels["roi_boxes"],
        "gt_visual_feat": labels["gt_visual_feat"],
        "anchors": np.concatenate(list(results[0]["labels"]["anchor_boxes"].values())),
        "anchor_level_sizes": np.array(
            [len(x) for x in results[0]["labels"]["anchor_boxes"].values()], np.int64
        ),
        "anchor_match": np.stack([r["match"] for r in results]).astype(np.int32),
        "anchor_perm": np.stack([r["perm"] for r in results]),
        "rpn_score_targets": np.stack(
            [
                np.concatenate([x.ravel() for x in r["labels"]["rpn_score_targets"].values()])
                for r in results
            ]
        ).astype(np.int32),
        "rpn_box_targets": np.stack(
            [
                np.concatenate([x.reshape(-1, 4) for x in r["labels"]["rpn_box_targets"].values()])
                for r in results
            ]
        ),
    }
    for i, (ann, r) in enumerate(zip(anns, results)):
        for key in ("boxes", "classes", "is_crowd", "masks", "roi_boxes"):
            res[f"raw_{key}_{i}"] = ann[key]
        pos, neg = r["orders"]
        res[f"anchor_shuffle_{i}_pos"], res[f"anchor_shuffle_{i}_neg"] = pos, neg
    return res, labels
