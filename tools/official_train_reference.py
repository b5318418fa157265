"""One step of the official ViLD training graph on a fixed batch; saves the training fixture.

Called by `tools/official_reference.py --mode train` (the entry point; same TF venv, never CI):

    TF_USE_LEGACY_KERAS=1 TF_ENABLE_ONEDNN_OPTS=0 /work/tfref/venv/bin/python \\
        tools/official_reference.py --mode train --exact-layers --global-step 500 \\
        --tpu-repo /work/tfref/tpu \\
        --tpu-commit 7dc921f846c9e4071f3884b768a7ddf521272a49

Labels come from the official `vild_parser.Parser._parse_train_data` (one graph per image, outputs
stacked as the input reader does), the step from the official `BaseModel.train` (loss, L2 term,
frozen classifier, momentum optimiser, BN updates). Flip and scale jitter are switched off in the
config; the two `tf.random_shuffle` calls (anchor and RoI sampling) are pinned by replacing the
`tf` of their two modules with a proxy (no official file is edited), and the permutations are
recorded. Writes `train_common.npz`, `train_vild.npz`, `train_vild_ensemble.npz`, described in
`tests/fixtures/official_vild/FORMAT.md` ("Training fixture").

`--exact-layers` (the mode the committed fixtures use, `bn_moments` = "float64_layers";
docs/OFFICIAL.md, changes 4 and 5) adds to `--exact-bn-moments` the BN's normalisation and the
convolutions, dense layers, bias adds and RoIAlign in float64 (`patch_layers_float64`).
`--exact-bn-moments` alone (the fixtures before; recorded as `bn_moments` = "float64",
"tf" without it): the official BN's `tf.nn.moments` (called by tf_keras's BatchNormalization,
the base class of `nn_ops.BatchNormalization`) is replaced, through a proxy for that module's
`tf`, by the same biased moments reduced in float64 and cast back to float32. Its two float32
`reduce_mean`s are off by up to 4.8e-5 (relative, batch variance of the first BN) from the exact
value, and the BN backward amplifies that into the gradients; everything else is unchanged.
"""

import os
import tempfile
import time

import numpy as np

import official_train_fixture as fx
from official_exact_reductions import TfProxy, patch_bn_moments, patch_layers_float64

NUM_CANDIDATES = 1300  # 1000 proposals + 300 gt slots


def _params(ref, tf, tpu_models, config_name, image_size, paths, model_dir):
    overrides = {
        "use_tpu": False,
        "model_dir": model_dir,
        "train": {"transpose_input": False},
        "vild_parser": {"aug_rand_hflip": False, "aug_scale_min": 1.0, "aug_scale_max": 1.0},
    }
    return ref.official_params(tpu_models, config_name, image_size, paths, overrides)


def parse(tf, params, images, anns, seed, config):
    """Runs the official train parser per image, the anchor shuffle pinned; numpy outputs."""
    from dataloader import anchor, mode_keys
    from dataloader import factory as data_factory
    from utils.object_detection import minibatch_sampler

    parser = data_factory.parser_generator(params, mode_keys.TRAIN)
    state = {}

    def shuffle(value, seed=None, name=None):  # ids sorted by their rank in anchor_perm
        order = tf.argsort(tf.gather(state["rank"], tf.reshape(value, [-1])), stable=True)
        state["orders"].append(order)
        return tf.gather(value, order)

    def get_rpn_samples(self, match_results):
        state["match"] = match_results
        return get_samples(self, match_results)

    get_samples = anchor.RpnAnchorLabeler._get_rpn_samples
    real_tf = minibatch_sampler.tf
    minibatch_sampler.tf = TfProxy(real_tf, shuffle)
    anchor.RpnAnchorLabeler._get_rpn_samples = get_rpn_samples
    results = []
    try:
        for i, (image, ann) in enumerate(zip(images, anns)):
            with tf.Graph().as_default():
                data = {
                    "image": tf.constant(image),
                    "groundtruth_classes": tf.constant(ann["classes"]),
                    "groundtruth_boxes": tf.constant(ann["boxes"]),
                    "groundtruth_is_crowd": tf.constant(ann["is_crowd"]),
                    "groundtruth_instance_masks": tf.constant(ann["masks"].astype(np.float32)),
                    "roi_boxes": tf.constant(ann["roi_boxes"]),
                    "groundtruth_visual_features": tf.constant(ann["roi_features"]),
                }
                size = params.vild_parser.output_size
                num_anchors = sum(3 * (size[0] // 2**lv) * (size[1] // 2**lv) for lv in range(2, 7))
                perm = np.random.default_rng([seed, 2, i]).permutation(num_anchors)
                state.update(rank=tf.constant(np.argsort(perm)), orders=[])
                image_out, labels = parser._parse_train_data(data)
                fetch = {"image": image_out, "labels": labels, "match": state["match"]}
                fetch["orders"] = list(state["orders"])
                with tf.Session(config=config) as sess:
                    out = sess.run(fetch)
                out["perm"] = perm.astype(np.int32)
                results.append(out)
    finally:
        minibatch_sampler.tf = real_tf
        anchor.RpnAnchorLabeler._get_rpn_samples = get_samples
    return results


class _Spec:
    """Stand-in for `TPUEstimatorSpec` (gone from TF 2.21): keeps what `BaseModel.train` returns."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def as_estimator_spec(self):
        return self


def build_train(tf, params, images, labels, roi_perm):
    """Builds `ViLDModel.train()` on constant inputs; returns (spec, recorded tensors)."""
    from modeling import base_model
    from modeling import factory as model_factory
    from modeling.architecture import nn_ops
    from projects.vild.modeling import vild_head
    from utils.object_detection import balanced_positive_negative_sampler as bpns

    rec = {"summaries": {}, "bn": {}, "roi_calls": [], "dense_inputs": {}}
    calls = iter(range(len(roi_perm)))

    def roi_shuffle(value, seed=None, name=None):
        assert value.shape.as_list() == [NUM_CANDIDATES], value.shape
        return tf.constant(roi_perm[next(calls)])

    def subsample(self, indicator, batch_size, labels, scope=None):
        out = real_subsample(self, indicator, batch_size, labels, scope)
        rec["roi_calls"].append((indicator, labels, out))
        return out

    def moments(self, inputs, reduction_axes, keep_dims, mask=None):
        mean, var = real_moments(self, inputs, reduction_axes, keep_dims=keep_dims, mask=mask)
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.int64)
        rec["bn"][self.gamma.name.rsplit("/", 1)[0]] = (
            tf.reshape(mean, [-1]),
            tf.reshape(var, [-1]),
            count,
        )
        return mean, var

    class _Layers:  # vild_head's tf.layers, recording the class-predict input (the embeddings)
        def __getattr__(self, name):
            return getattr(tf.layers, name)

        @staticmethod
        def dense(inputs, *args, **kwargs):
            rec["dense_inputs"].setdefault(kwargs.get("name"), inputs)
            return tf.layers.dense(inputs, *args, **kwargs)

    head_tf = TfProxy(tf, tf.random_shuffle)
    head_tf.layers = _Layers()
    saved = (
        bpns.tf,
        bpns.BalancedPositiveNegativeSampler.subsample,
        nn_ops.BatchNormalization._moments,
    )
    saved += (vild_head.tf, base_model.benchmark_utils.compute_model_statistics)
    real_subsample, real_moments = saved[1], saved[2]
    bpns.tf = TfProxy(tf, roi_shuffle)
    bpns.BalancedPositiveNegativeSampler.subsample = subsample
    nn_ops.BatchNormalization._moments = moments
    vild_head.tf = head_tf
    # Only logs parameter counts and FLOPs (and needs the profiler): skipped.
    base_model.benchmark_utils.compute_model_statistics = lambda **kw: (None, None)
    base_model.tf_estimator.tpu.TPUEstimatorSpec = _Spec
    for fn in ("filter_trainable_variables", "filter_regularization_variables"):
        saved += (getattr(base_model, fn),)
        _tap(rec, base_model, fn, fn)
    try:
        model = model_factory.model_generator(params)
        tap = lambda obj, attr, key: _tap(rec, obj, attr, key)  # noqa: E731
        tap(model, "_build_outputs", "outputs")
        tap(model, "_generate_rois_fn", "proposals")
        tap(model, "_sample_rois_fn", "sampled")
        tap(model, "_sample_masks_fn", "masks")
        for fn in ("_rpn_score_loss_fn", "_rpn_box_loss_fn", "_frcnn_class_loss_fn"):
            tap(model, fn, fn)
        for fn in ("_frcnn_box_loss_fn", "_mask_loss_fn"):
            tap(model, fn, fn)
        real_summary = model.add_scalar_summary
        model.add_scalar_summary = lambda name, t: (
            rec["summaries"].setdefault(name, t),
            real_summary(name, t),
        )
        real_optimizer = model._optimizer_fn

        def optimizer_fn(learning_rate):
            opt = real_optimizer(learning_rate)
            real_compute = opt.compute_gradients

            def compute_gradients(*args, **kwargs):
                rec["grads_and_vars"] = real_compute(*args, **kwargs)
                return rec["grads_and_vars"]

            opt.compute_gradients = compute_gradients
            rec["optimizer"] = opt
            return opt

        model._optimizer_fn = optimizer_fn
        tf.train.get_or_create_global_step()
        spec = model.train(tf.constant(images), _constants(tf, labels))
    finally:
        bpns.tf, bpns.BalancedPositiveNegativeSampler.subsample = saved[0], saved[1]
        nn_ops.BatchNormalization._moments, vild_head.tf = saved[2], saved[3]
        base_model.benchmark_utils.compute_model_statistics = saved[4]
        base_model.filter_trainable_variables = saved[5]
        base_model.filter_regularization_variables = saved[6]
    return spec, rec


def _tap(rec, obj, attr, key):
    fn = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        rec.setdefault(key, out)
        rec.setdefault(key + "_args", args)
        return out

    setattr(obj, attr, wrapped)


def _constants(tf, labels):
    return {
        k: ({lv: tf.constant(x) for lv, x in v.items()} if isinstance(v, dict) else tf.constant(v))
        for k, v in labels.items()
    }


def train_fetches(tf, spec, rec):
    """Everything recorded before the step (one `sess.run`, no train op)."""
    out = rec["outputs"]
    text = rec["dense_inputs"]["class-predict"]
    heads = [out["class_outputs"], out["box_outputs"], out["mask_outputs"]]
    heads += [out["distill_feat_outputs"], text]
    g_cls, g_box, g_mask, g_distill, g_text = tf.gradients(spec.loss, heads)
    indicators = tf.stack([c[2] for c in rec["roi_calls"]])
    mask_classes_in = rec["masks_args"][2]
    summaries = rec["summaries"]
    fetch = {
        "proposals": rec["proposals"][0],
        "roi_candidates": tf.stack([c[0] for c in rec["roi_calls"]]),
        "roi_positive": tf.stack([c[1] for c in rec["roi_calls"]]),
        "roi_sampled_indicator": indicators,
        # The same top_k as assign_and_sample_proposals / sample_and_crop_foreground_masks.
        "sampled_indices": tf.nn.top_k(tf.cast(indicators, tf.int32), k=512, sorted=True)[1],
        "mask_indices": tf.nn.top_k(tf.cast(mask_classes_in > 0, tf.int32), k=128)[1],
        "sampled_rois": rec["sampled"][0],
        "sampled_gt_boxes": rec["sampled"][1],
        "sampled_gt_classes": rec["sampled"][2],
        "sampled_gt_indices": rec["sampled"][3],
        "box_targets": out["box_targets"],
        "mask_rois": rec["masks"][0],
        "mask_classes": rec["masks"][1],
        "mask_targets": rec["masks"][2],
        "loss_rpn_score": rec["_rpn_score_loss_fn"],
        "loss_rpn_box": rec["_rpn_box_loss_fn"],
        "loss_class": rec["_frcnn_class_loss_fn"],
        "loss_box": rec["_frcnn_box_loss_fn"],
        "loss_mask": rec["_mask_loss_fn"],
        "loss_distill": summaries["feat_distill_loss"],
        "loss_model": summaries["model_loss"],
        "loss_l2": summaries["l2_regularization_loss"],
        "loss_total": spec.loss,
        "learning_rate": summaries["learning_rate"],
        "grad_class_logits": g_cls,
        "grad_box_deltas": g_box,
        "grad_mask_logits": g_mask,
        "grad_distill_embeddings": g_distill,
        "grad_text_embeddings": g_text,
        "bn": {k: v for k, v in rec["bn"].items() if k in fx.BN_LAYERS},
        "grads": {v.op.name: g for g, v in rec["grads_and_vars"] if g is not None},
    }
    return fetch


def load_official(tf, sess, weights):
    """Initialises every variable, then assigns the official ones their seeded values."""
    graph_vars = {v.op.name: v for v in tf.global_variables()}
    extra = [n for n in graph_vars if n not in weights]
    extra = [n for n in extra if n != "global_step" and not n.endswith("/Momentum")]
    missing = sorted(set(weights) - set(graph_vars))
    shapes = [
        n
        for n in weights
        if n in graph_vars and tuple(graph_vars[n].shape.as_list()) != weights[n].shape
    ]
    if missing or extra or shapes:
        raise SystemExit(f"train graph vs official_variables(): {missing} {extra} {shapes}")
    sess.run(tf.global_variables_initializer())
    for name, value in weights.items():
        graph_vars[name].load(value, sess)
    return graph_vars


def run_config(
    tf,
    ref,
    tpu_models,
    name,
    images,
    labels,
    paths,
    roi_perm,
    seed,
    variables,
    exact_bn,
    global_step=0,
):
    """Builds and runs one config, its one step taken at ``global_step`` (the warm-up's
    learning rate there; the momentum slots start at 0 whatever the step); returns its fixture
    dict."""
    random_mod = ref._load_numpy_module("random_weights")
    weights = random_mod.random_official_weights(variables, seed)
    config = ref.session_config(tf)
    with tf.Graph().as_default():
        params = _params(ref, tf, tpu_models, name, images.shape[1], paths, tempfile.mkdtemp())
        t0 = time.time()
        undo = (
            patch_bn_moments(tf, exact_bn in ("float64_bn", "float64_layers"))
            if exact_bn
            else (lambda: None)
        )
        undo_layers = lambda check=True: None  # noqa: E731
        if exact_bn == "float64_layers":
            from ops import spatial_transform_ops  # as the official modules import it

            undo_layers = patch_layers_float64(tf, spatial_transform_ops)
        try:
            spec, rec = build_train(tf, params, images, labels, roi_perm)
        except BaseException:
            undo_layers(check=False)  # restore, and let the build's own error through
            raise
        finally:
            undo()
        undo_layers()
        fetch = train_fetches(tf, spec, rec)
        print(f"{name}: graph built in {time.time() - t0:.0f} s", flush=True)
        with tf.Session(config=config) as sess:
            graph_vars = load_official(tf, sess, weights)
            tf.train.get_global_step().load(global_step, sess)
            t0 = time.time()
            out = sess.run(fetch)
            print(f"{name}: forward/backward in {time.time() - t0:.0f} s", flush=True)
            _, loss_again = sess.run([spec.train_op, spec.loss])
            after = sess.run({n: graph_vars[n] for n, _ in variables})
            step = sess.run(tf.train.get_global_step())
    if loss_again != out["loss_total"] or step != global_step + 1:
        raise SystemExit(
            f"{name}: rerun differs ({loss_again} vs {out['loss_total']}) or step {step}"
        )
    out["train_names"] = [v.op.name for _, v in rec["grads_and_vars"]]
    out["decay_names"] = [v.op.name for v in rec["filter_regularization_variables"]]
    out["trainable_names"] = [v.op.name for v in rec["filter_trainable_variables_args"][0]]
    res = fx.summarise(name, out, weights, after, variables, seed)
    res["bn_moments"] = np.array(exact_bn or "tf")
    res["global_step"] = np.int64(global_step)
    return res


def run(args, tf, tpu_models, images, batch, info, paths, rare_mask):
    """Entry point from tools/official_reference.py --mode train."""
    import official_reference as ref

    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
        raise SystemExit("set TF_ENABLE_ONEDNN_OPTS=0 (oneDNN changes the proposal ranking)")
    variables_mod = ref._load_numpy_module("variables")
    seed = args.seed
    anns = fx.annotations(images, rare_mask, seed)
    config = ref.session_config(tf)
    with tf.Graph().as_default():
        params = _params(ref, tf, tpu_models, "vild", args.image_size, paths, tempfile.mkdtemp())
    results = parse(tf, params, images, anns, seed, config)
    parsed = np.stack([r["image"] for r in results])
    if not np.array_equal(parsed, batch):
        raise SystemExit("the train parser's images differ from the inference preprocessing")
    common, labels = fx.common_fixture(results, anns, batch, seed, args)
    roi_perm = np.stack(
        [np.random.default_rng([seed, 3, i]).permutation(NUM_CANDIDATES) for i in range(2)]
    )
    files = {"train_common.npz": common}
    for name in args.configs.split(","):
        t0 = time.time()
        variables = variables_mod.official_variables(50, ensemble=name == "vild_ensemble")
        res = run_config(
            tf,
            ref,
            tpu_models,
            name,
            batch,
            labels,
            paths,
            roi_perm.astype(np.int32),
            seed,
            variables,
            "float64_layers"
            if args.exact_layers
            else "float64_bn"
            if args.exact_bn
            else "float64"
            if args.exact_bn_moments
            else "",
            args.global_step,
        )
        res["roi_perm"] = roi_perm.astype(np.int32)
        files[f"train_{name}.npz"] = res
        losses = {k[5:]: round(float(v), 6) for k, v in res.items() if k.startswith("loss_")}
        print(f"{name}: {time.time() - t0:.0f} s, losses {losses}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    for fname, content in files.items():
        np.savez_compressed(os.path.join(args.out, fname), **content)
        print(f"wrote {fname}: {os.path.getsize(os.path.join(args.out, fname)) / 1e6:.2f} MB")
