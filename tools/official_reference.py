"""Run the official TensorFlow ViLD on fixed images with seeded random weights; save its outputs.

This is the only place TensorFlow is used. It runs in a SEPARATE venv (TensorFlow 2.21 CPU,
tf-keras, pyyaml, six, scikit-image), never in CI, and nothing in vild_d2 imports it. The official
code is not part of this repository: pass a checkout of tensorflow/tpu with `--tpu-repo` (the
folder that holds `models/`). It writes `tests/fixtures/official_vild/*.npz`, described in
`tests/fixtures/official_vild/FORMAT.md`, which the PyTorch parity test reads.

    TF_USE_LEGACY_KERAS=1 /work/tfref/venv/bin/python tools/official_reference.py \
        --tpu-repo /work/tfref/tpu --tpu-commit 7dc921f846c9e4071f3884b768a7ddf521272a49

With `--mode train` (and `TF_ENABLE_ONEDNN_OPTS=0`) it runs one official training step instead and
writes `train_*.npz` (see `tools/official_train_reference.py` and FORMAT.md, "Training fixture"):

    TF_USE_LEGACY_KERAS=1 TF_ENABLE_ONEDNN_OPTS=0 /work/tfref/venv/bin/python \
        tools/official_reference.py --mode train --exact-layers --global-step 500 \
        --tpu-repo /work/tfref/tpu --tpu-commit 7dc921f846c9e4071f3884b768a7ddf521272a49

The weights are `random_official_weights(official_variables(50, ensemble), seed)`, loaded from
`vild_d2/official/checkpoint/variables.py` and `tools/reference/random_weights.py` by file path
(they are numpy-only, so the TF venv does not need torch or detectron2).
"""

import argparse
import importlib.util
import os
import runpy
import sys
import tempfile
import types

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"vild": "vild_resnet.yaml", "vild_ensemble": "vild_ensemble_resnet.yaml"}
HEAD_ROIS = 32  # head outputs are saved for the first 32 RoIs (the top-scoring proposals)
MASK_DETS = 16  # masks are saved for the first 16 detections
N_CHANNELS = 8  # feature maps keep channels [::C // 8]


# The numpy-only modules the TF venv loads by path (it has no torch, so no vild_d2 package).
NUMPY_MODULES = {
    "variables": ("vild_d2", "official", "checkpoint", "variables.py"),
    "random_weights": ("tools", "reference", "random_weights.py"),
}


def _load_numpy_module(name):
    """Import one of :data:`NUMPY_MODULES` by path, without importing the torch package."""
    path = os.path.join(ROOT, *NUMPY_MODULES[name])
    spec = importlib.util.spec_from_file_location(f"_official_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lvis_rare_mask(categories_py):
    """(1204,) float32: 1 for background (index 0) and base classes, 0 for LVIS v1 rare ones.

    Index i >= 1 is LVIS v1 category id i (ids are 1..1203, contiguous), as the official
    `lvis_rare_masks.npy` expects.
    """
    cats = runpy.run_path(categories_py)["LVIS_CATEGORIES"]
    ids = sorted(c["id"] for c in cats)
    if ids != list(range(1, 1204)):
        raise ValueError(f"{categories_py}: expected LVIS v1 ids 1..1203")
    mask = np.ones(1204, np.float32)
    for c in cats:
        if c["frequency"] == "r":
            mask[c["id"]] = 0.0
    return mask


def fixed_images():
    """Two deterministic uint8 RGB images (scikit-image's bundled photos, subsampled exactly).

    Returns:
        list of (H, W, 3) uint8: astronaut (240, 200) and coffee (200, 300), both non-square,
        one upscaled and one downscaled by the official resize to 256.
    """
    from skimage import data

    return [
        np.ascontiguousarray(data.astronaut()[::2, ::2][10:250, 30:230]),
        np.ascontiguousarray(data.coffee()[::2, ::2]),
    ]


def install_shims(tf):
    """What the official code imports but TF 2.21 / this checkout lacks (see ENVIRONMENT.md)."""
    modes = types.SimpleNamespace(TRAIN="train", EVAL="eval", PREDICT="infer")
    tf.estimator = types.SimpleNamespace(
        ModeKeys=modes, tpu=types.SimpleNamespace(TPUEstimatorSpec=None)
    )
    builder = types.ModuleType("official.efficientnet.efficientnet_builder")
    package = types.ModuleType("official.efficientnet")
    package.efficientnet_builder = builder
    sys.modules.setdefault("official.efficientnet", package)
    sys.modules.setdefault("official.efficientnet.efficientnet_builder", builder)


def session_config(tf):
    """Graph optimiser off: the 1203 per-class NMS ops make Grappler take 15+ minutes.
    ``VILD_TF_INTRA_OP_THREADS=N`` in the environment sets TF's intra-op threads (default: one
    per core), which sets the float32 reduction order (tools/reference/compare_train_fixtures.py
    compares two such runs)."""

    config = tf.ConfigProto()
    config.intra_op_parallelism_threads = int(os.environ.get("VILD_TF_INTRA_OP_THREADS", "0"))
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    config.graph_options.optimizer_options.opt_level = tf.OptimizerOptions.L0
    return config


class Taps:
    """Records the tensors the official model passes between its stages (wrappers, no edits)."""

    def __init__(self):
        self.t = {}

    def wrap(self, obj, attr, key):
        fn = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.t.setdefault(key, out)
            self.t.setdefault(key + "_args", args)
            return out

        setattr(obj, attr, wrapped)


def official_params(tpu_models, config_name, image_size, paths, overrides=None):
    """The official config (yaml over the `vild` defaults) with the input size and file paths set.

    `overrides`: a further nested dict applied last (the train mode's augmentation switches).
    """
    from configs import factory as config_factory
    from hyperparameters import params_dict

    params = config_factory.config_generator("vild")
    yaml = os.path.join(
        tpu_models, "official/detection/projects/vild/configs", CONFIGS[config_name]
    )
    params_dict.override_params_dict(params, yaml, is_strict=True)
    params_dict.override_params_dict(
        params,
        {
            "frcnn_head": {"classifier_weight_path": paths["classifier"]},
            "postprocess": {"rare_mask_path": paths["rare_mask"]},
            "frcnn_class_loss": {"rare_mask_path": paths["rare_mask"]},
            "vild_parser": {"output_size": [image_size, image_size]},
        },
        is_strict=True,
    )
    if overrides:
        params_dict.override_params_dict(params, overrides, is_strict=True)
    params.validate()
    params.lock()
    return params


def build(tf, tpu_models, config_name, image_size, batch, paths):
    """Builds the official inference graph; returns (images placeholder, image_info, fetches)."""
    from dataloader import anchor, mode_keys
    from modeling import factory as model_factory
    from ops import spatial_transform_ops

    params = official_params(tpu_models, config_name, image_size, paths)

    images = tf.placeholder(tf.float32, [batch, image_size, image_size, 3], name="images")
    image_info = tf.placeholder(tf.float32, [batch, 4, 2], name="image_info")
    model = model_factory.model_generator(params)
    taps = Taps()
    for attr, key in [
        ("_backbone_fn", "backbone"),
        ("_fpn_fn", "fpn"),
        ("_rpn_head_fn", "rpn"),
        ("_generate_rois_fn", "rois"),
        ("_frcnn_head_fn", "head"),
    ]:
        taps.wrap(model, attr, key)
    taps.wrap(model._generate_detections_fn, "_generate_detections", "nms_inputs")
    crop = spatial_transform_ops.multilevel_crop_and_resize
    calls = []

    def crop_tap(features, boxes, output_size=7, **kw):
        out = crop(features, boxes, output_size=output_size, **kw)
        calls.append(out)
        return out

    spatial_transform_ops.multilevel_crop_and_resize = crop_tap
    try:
        outputs = model.build_outputs(images, {"image_info": image_info}, mode_keys.PREDICT)
    finally:
        spatial_transform_ops.multilevel_crop_and_resize = crop
    arch = params.architecture
    anchors = anchor.Anchor(
        arch.min_level,
        arch.max_level,
        params.anchor.num_scales,
        params.anchor.aspect_ratios,
        params.anchor.anchor_size,
        [image_size, image_size],
    ).multilevel_boxes

    graph = tf.get_default_graph()
    head_scope = "frcnn_layer_0/fast_rcnn_head/"
    t = taps.t
    fetch = {
        "roi_features": calls[0][:, :HEAD_ROIS, :, :, :: 256 // N_CHANNELS],
        "rois": t["rois"][0],
        "roi_scores": t["rois"][1],
        "class_logits": t["head"][0][:, :HEAD_ROIS],
        "box_deltas": t["head"][1],
        "projection": graph.get_tensor_by_name(head_scope + "project-to-clip/BiasAdd:0")[
            :, :HEAD_ROIS
        ],
        "decoded_boxes": t["nms_inputs_args"][0][:, :, 0, :],
        "class_scores": t["nms_inputs_args"][1][:, :HEAD_ROIS],
        "detection_boxes": outputs["detection_boxes"],
        "detection_classes": outputs["detection_classes"],
        "detection_scores": outputs["detection_scores"],
        "num_detections": outputs["num_detections"],
        "detection_masks": outputs["detection_masks"][:, :MASK_DETS],
    }
    if config_name == "vild_ensemble":
        fetch["image_projection"] = graph.get_tensor_by_name(
            head_scope + "distill-project-to-clip/BiasAdd:0"
        )[:, :HEAD_ROIS]
        fetch["image_class_logits"] = t["head"][3][:, :HEAD_ROIS]
    for level, x in t["backbone"].items():
        fetch[f"backbone_c{level}"] = x[..., :: x.shape[-1] // N_CHANNELS]
    for level, x in t["fpn"].items():
        fetch[f"fpn_p{level}"] = x[..., :: x.shape[-1] // N_CHANNELS]
        fetch[f"rpn_scores_p{level}"] = t["rpn"][0][level]
        fetch[f"rpn_deltas_p{level}"] = t["rpn"][1][level]
        fetch[f"anchors_p{level}"] = anchors[level]
    return images, image_info, fetch


def preprocess(tf, images, image_size, config):
    """The official eval/predict preprocessing (`vild_parser._parse_predict_data`), per image.

    Returns:
        (B, S, S, 3) float32 normalised, resized, zero-padded images; (B, 4, 2) image_info.
    """
    from utils import input_utils

    out, infos = [], []
    with tf.Graph().as_default():
        for image in images:
            x = input_utils.normalize_image(tf.constant(image))
            size = [image_size, image_size]
            x, info = input_utils.resize_and_crop_image(
                x, size, padded_size=input_utils.compute_padded_size(size, 2**6)
            )
            out.append(x)
            infos.append(info)
        with tf.Session(config=config) as sess:
            out, infos = sess.run([tf.stack(out), tf.stack(infos)])
    return out, infos


def load_weights(tf, sess, weights):
    """Assigns every graph variable its value; fails naming missing, extra or mis-shaped ones."""
    graph_vars = {v.op.name: v for v in tf.global_variables()}
    missing = sorted(set(weights) - set(graph_vars))
    extra = sorted(set(graph_vars) - set(weights))
    shapes = [
        f"{n}: graph {graph_vars[n].shape.as_list()} vs list {list(weights[n].shape)}"
        for n in weights
        if n in graph_vars and tuple(graph_vars[n].shape.as_list()) != weights[n].shape
    ]
    if missing or extra or shapes:
        raise SystemExit(
            "official graph and official_variables() disagree:\n"
            f"  in the list, not the graph: {missing}\n  in the graph, not the list: {extra}\n"
            f"  shape mismatches: {shapes}"
        )
    if list(graph_vars) != list(weights):
        print("note: graph creation order differs from official_variables() order")
    for name, var in graph_vars.items():
        var.load(weights[name], sess)


COMMON = ("backbone_", "fpn_", "rpn_", "anchors_", "rois", "roi_scores", "roi_features")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tpu-repo", required=True, help="folder holding tensorflow/tpu models/")
    parser.add_argument("--tpu-commit", default="unknown", help="recorded in the fixture")
    parser.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/official_vild"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--configs", default="vild,vild_ensemble")
    parser.add_argument(
        "--lvis-categories",
        default=os.path.join(
            ROOT,
            ".venv/lib/python3.11/site-packages/detectron2/data/datasets",
            "lvis_v1_categories.py",
        ),
        help="detectron2's lvis_v1_categories.py (for the rare mask)",
    )
    parser.add_argument("--save-checkpoint", default="", help="also save TF checkpoints here")
    parser.add_argument(
        "--mode",
        choices=("infer", "train"),
        default="infer",
        help="infer: the inference fixture; train: one official training step "
        "(tools/official_train_reference.py, writes train_*.npz)",
    )
    parser.add_argument(
        "--exact-bn-moments",
        action="store_true",
        help="train mode: reduce the official BN's tf.nn.moments in float64 (a wrapper; "
        "the training fixtures before --exact-layers, see official_train_reference.py)",
    )
    parser.add_argument(
        "--exact-bn",
        action="store_true",
        help="train mode: --exact-bn-moments, and the official BN's tf.nn.batch_normalization in "
        "float64 too (its backward's sums for beta and gamma; fixture bn_moments 'float64_bn')",
    )
    parser.add_argument(
        "--exact-layers",
        action="store_true",
        help="train mode: --exact-bn, and the convolutions, dense layers, bias adds and the "
        "RoIAlign in float64 too, each cast back to float32 (fixture bn_moments "
        "'float64_layers'; docs/OFFICIAL.md 'Change 4')",
    )
    parser.add_argument(
        "--global-step",
        type=int,
        default=0,
        help="train mode: the step at which the one SGD step is taken (its warm-up learning "
        "rate; the committed fixtures: 500, lr 0.1616, so that the update is not lost in the "
        "float32 spacing of the weights)",
    )
    args = parser.parse_args()

    tpu_models = os.path.join(os.path.abspath(args.tpu_repo), "models")
    sys.path[:0] = [os.path.join(tpu_models, "official/detection"), tpu_models]
    import tensorflow.compat.v1 as tf

    tf.disable_v2_behavior()
    install_shims(tf)
    variables_mod = _load_numpy_module("variables")
    random_mod = _load_numpy_module("random_weights")
    config = session_config(tf)

    images = fixed_images()
    batch, info = preprocess(tf, images, args.image_size, config)
    tmp = tempfile.mkdtemp(prefix="official_vild_")
    paths = {
        "classifier": os.path.join(tmp, "classifier.npy"),
        "rare_mask": os.path.join(tmp, "rare_mask.npy"),
    }
    rare_mask = lvis_rare_mask(args.lvis_categories)
    np.save(paths["classifier"], random_mod.random_classifier(args.seed))
    np.save(paths["rare_mask"], rare_mask)
    if args.mode == "train":
        import official_train_reference

        official_train_reference.run(args, tf, tpu_models, images, batch, info, paths, rare_mask)
        return

    results = {}
    for name in args.configs.split(","):
        variables = variables_mod.official_variables(50, ensemble=name == "vild_ensemble")
        weights = random_mod.random_official_weights(variables, args.seed)
        with tf.Graph().as_default():
            images_ph, info_ph, fetch = build(
                tf, tpu_models, name, args.image_size, len(images), paths
            )
            with tf.Session(config=config) as sess:
                load_weights(tf, sess, weights)
                out = sess.run(fetch, {images_ph: batch, info_ph: info})
                if args.save_checkpoint:
                    prefix = os.path.join(args.save_checkpoint, name, "model.ckpt")
                    tf.train.Saver().save(sess, prefix, write_meta_graph=False)
        out["weight_sums"] = np.array([weights[n].sum(dtype=np.float64) for n, _ in variables])
        results[name] = out
        print(name, {k: (v.shape, float(np.std(v))) for k, v in sorted(out.items())})
    save(args, images, batch, info, rare_mask, results)


def save(args, images, batch, info, rare_mask, results):
    """Writes common.npz (config-independent stages) and <config>.npz."""
    os.makedirs(args.out, exist_ok=True)
    names = list(results)
    first = results[names[0]]
    common = {k: v for k, v in first.items() if k.startswith(COMMON)}
    for other in names[1:]:
        for k, v in common.items():
            # The stages before the box head use the same variables, drawn first from the seed.
            np.testing.assert_allclose(results[other][k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    common.update(
        image_0=images[0],
        image_1=images[1],
        preprocessed=batch[:, ::2, ::2, :],
        image_info=info,
        rare_mask=rare_mask,
        seed=np.int64(args.seed),
        image_size=np.int64(args.image_size),
        tpu_commit=np.array(args.tpu_commit),
    )
    np.savez_compressed(os.path.join(args.out, "common.npz"), **common)
    for name, out in results.items():
        own = {k: v for k, v in out.items() if not k.startswith(COMMON)}
        np.savez_compressed(os.path.join(args.out, f"{name}.npz"), **own)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
