"""The official graph's reductions in float64, through wrappers (no official file is edited):
`tools/official_train_reference.py`'s `--exact-bn-moments`, `--exact-bn` and `--exact-layers`
(docs/OFFICIAL.md, "Training parity", changes 3 to 5). Runs in the TF venv, never in CI.
"""

__all__ = [
    "NnProxy",
    "TfProxy",
    "exact_batch_normalization",
    "exact_moments",
    "patch_bn_moments",
    "patch_layers_float64",
]


class TfProxy:
    """Stands in for a module's `tf`: every attribute is TF's, except `random_shuffle`."""

    def __init__(self, tf, random_shuffle):
        self._tf = tf
        self.random_shuffle = random_shuffle

    def __getattr__(self, name):
        return getattr(self._tf, name)


class NnProxy:
    """Stands in for `tf.nn`: every attribute is TF's, except `moments` (and, when given,
    `batch_normalization`)."""

    def __init__(self, nn, moments, batch_normalization=None):
        self._nn = nn
        self.moments = moments
        if batch_normalization is not None:
            self.batch_normalization = batch_normalization

    def __getattr__(self, name):
        return getattr(self._nn, name)


def exact_moments(tf):
    """`tf.nn.moments` (biased variance, stop_gradient on the mean) reduced in float64."""

    def moments(x, axes, shift=None, keepdims=False, name=None):
        x64 = tf.cast(x, tf.float64)
        mean = tf.reduce_mean(x64, axes, keepdims=True)
        var = tf.reduce_mean(tf.math.squared_difference(x64, tf.stop_gradient(mean)), axes, True)
        if not keepdims:
            mean, var = tf.squeeze(mean, axes), tf.squeeze(var, axes)
        return tf.cast(mean, x.dtype), tf.cast(var, x.dtype)

    return moments


def exact_batch_normalization(tf):
    """`tf.nn.batch_normalization` computed in float64 and cast back: its backward (the sums
    over the batch and positions that give beta's and gamma's gradients) is float64 too."""

    def batch_normalization(x, mean, variance, offset, scale, variance_epsilon, name=None):
        def f64(t):
            return None if t is None else tf.cast(t, tf.float64)

        y = tf.nn.batch_normalization(
            f64(x), f64(mean), f64(variance), f64(offset), f64(scale), variance_epsilon
        )
        return tf.cast(y, x.dtype)

    return batch_normalization


def patch_bn_moments(tf, normalization: bool = False):
    """Installs `exact_moments` as the `tf.nn.moments` seen by tf_keras's BatchNormalization
    (and with ``normalization`` `exact_batch_normalization` as its `tf.nn.batch_normalization`);
    returns a function that undoes it."""
    from tf_keras.src.layers.normalization import batch_normalization as keras_bn

    real, calls = keras_bn.tf, []
    moments, norm = exact_moments(real), exact_batch_normalization(real)
    proxy = TfProxy(real, None)
    del proxy.random_shuffle  # back to the module's own (tf.compat.v2 has none)
    proxy.nn = NnProxy(
        real.nn,
        lambda *a, **k: calls.append("moments") or moments(*a, **k),
        (lambda *a, **k: calls.append("norm") or norm(*a, **k)) if normalization else None,
    )
    keras_bn.tf = proxy

    def undo():
        keras_bn.tf = real
        missing = {"moments", *(["norm"] if normalization else [])} - set(calls)
        if missing:
            raise SystemExit(f"exact BN: the official BN never called tf.nn {sorted(missing)}")

    return undo


def patch_layers_float64(tf, spatial_transform_ops):
    """The official graph's other reductions in float64, each layer's result cast back to float32
    (`--exact-layers`, fixture mode "float64_layers"): tf_keras's convolutions
    (`Conv.convolution_op`), transposed convolutions, dense layers (`matmul`, `tensordot`) and
    every `bias_add` of those layers, and the official RoIAlign's gather and interpolation
    (`spatial_transform_ops.selective_crop_and_resize`, its features cast; the boxes and the
    level assignment stay float32; the mask targets' crops, which call it too, are float64
    as well). Their backward passes (the sums over positions, RoIs and
    channels that make the gradients) are then float64 too. Wrappers only: no official file is
    edited. Returns a function that undoes it."""
    from tf_keras.src.layers.convolutional import base_conv, conv2d_transpose
    from tf_keras.src.layers.core import dense

    calls = set()

    def in_float64(key, fn):
        """fn(x, w, ...) on x and w cast to float64, its result cast back to x's dtype."""

        def wrapped(x, w, *args, **kwargs):
            calls.add(key)
            out = fn(tf.cast(x, tf.float64), tf.cast(w, tf.float64), *args, **kwargs)
            return tf.cast(out, x.dtype)

        return wrapped

    real_tf, real_backend = base_conv.tf, conv2d_transpose.backend
    modules = (base_conv, conv2d_transpose, dense)
    tf_proxy = TfProxy(real_tf, None)
    del tf_proxy.random_shuffle
    tf_proxy.nn = NnProxy(real_tf.nn, real_tf.nn.moments)
    tf_proxy.nn.bias_add = in_float64("bias_add", real_tf.nn.bias_add)
    matmul = in_float64("dense", real_tf.matmul)
    tf_proxy.matmul = lambda a, b, **kwargs: matmul(a, b, **kwargs)  # rank-2 inputs
    tf_proxy.tensordot = in_float64("dense", real_tf.tensordot)  # rank 3 (the official heads)
    backend_proxy = TfProxy(real_backend, None)
    del backend_proxy.random_shuffle
    backend_proxy.conv2d_transpose = in_float64("conv2d_transpose", real_backend.conv2d_transpose)
    real_op = base_conv.Conv.convolution_op

    def convolution_op(self, inputs, kernel):
        return in_float64("convolution", lambda x, w: real_op(self, x, w))(inputs, kernel)

    real_crop = spatial_transform_ops.selective_crop_and_resize

    def selective_crop_and_resize(features, *args, **kwargs):
        calls.add("roi_align")
        out = real_crop(tf.cast(features, tf.float64), *args, **kwargs)
        return tf.cast(out, features.dtype)

    for m in modules:
        m.tf = tf_proxy
    conv2d_transpose.backend = backend_proxy
    base_conv.Conv.convolution_op = convolution_op
    spatial_transform_ops.selective_crop_and_resize = selective_crop_and_resize

    def undo(check: bool = True):
        for m in modules:
            m.tf = real_tf
        conv2d_transpose.backend = real_backend
        base_conv.Conv.convolution_op = real_op
        spatial_transform_ops.selective_crop_and_resize = real_crop
        wanted = {"bias_add", "dense", "conv2d_transpose", "convolution", "roi_align"}
        if check and wanted - calls:
            raise SystemExit(
                f"exact layers: the official graph never called {sorted(wanted - calls)}"
            )

    return undo
