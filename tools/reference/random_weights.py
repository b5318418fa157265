"""Seeded random weights for the official ViLD graph, reproducible on any machine.

The TF reference tool (`tools/official_reference.py`) loads these into the official graph and the
parity test rebuilds them from the same seed: only numpy's `Generator` (PCG64) is used, draws are
float64 and cast to float32, in the order of the variable list.

Scales keep activations O(1) through ResNet + FPN + RPN + heads without any data: kernels are
He-normal on their fan-in, BN statistics are mildly off-identity (so a wrong eps, mean or variance
shows up), and the last layers are scaled so that RPN scores, class logits, box deltas and mask
logits are spread rather than all equal.
"""

from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

__all__ = ["CLASSIFIER_KEY", "random_classifier", "random_official_weights"]

CLASSIFIER_KEY = "frcnn_layer_0/fast_rcnn_head/class-predict/kernel"

# Output std, relative to He-normal, of the layers that produce predictions (why: a sigmoid or a
# box decode of O(1) inputs saturates or throws boxes out of the image).
_HEAD_GAIN = {
    "rpn-class": 1.0,
    "rpn-box": 0.3,
    "box-predict": 1.0,
    "mask_fcn_logits": 1.0,
}
# FPN kernels (laterals, post-hoc, P6) are He/3: the backbone's residual sums reach std ~4 at C5,
# the FPN adds levels and has no ReLU, and the inference-mode BNs do not renormalise; at full He
# the RPN logits saturate the sigmoid (every top proposal scores exactly 1.0 in float32).
_FPN_GAIN = 1.0 / 3.0
# Dense layers fed by a ReLU in the box heads: each output unit's weights are centred over its
# inputs. Why: the ReLU'd features share a large positive mean, which otherwise dominates every
# RoI's embedding (measured: mean pairwise cosine 0.97 between RoIs, a few classes win
# everywhere); centred, the RoI-specific part drives the embedding and the class.
_CENTRED = ("fc6", "fc7", "project-to-clip")
_CENTRED += tuple(f"distill_{k}" for k in _CENTRED[:2]) + ("distill-project-to-clip",)
# Bias std of those layers; every other bias is small.
_HEAD_BIAS = {"rpn-class": 0.5, "rpn-box": 0.02, "box-predict": 0.02, "mask_fcn_logits": 0.5}


def random_classifier(seed: int, num_classes: int = 1203, dim: int = 512) -> np.ndarray:
    """The frozen text classifier used with `random_official_weights(..., seed)`.

    Drawn from its own stream, `np.random.default_rng([seed, 1])`, standard normal, NOT unit-norm
    columns (the official head divides by the column norms; this checks that both sides do).

    Returns:
        (dim, num_classes) float32, the layout of the official `classifier_weight_path` .npy and
        of `class-predict/kernel`.
    """
    rng = np.random.default_rng([seed, 1])
    return rng.standard_normal((dim, num_classes)).astype(np.float32)


def _layer_kind(name: str) -> str:
    """The layer's own name (`.../rpn-class/kernel` -> `rpn-class`), numbering stripped."""
    return name.rsplit("/", 2)[-2]


def _fan_in(name: str, shape: Tuple[int, ...]) -> int:
    if len(shape) == 2:  # dense (in, out)
        return shape[0]
    if "conv5-mask" in name:
        # Transposed 2x2/2 conv, kernel (kh, kw, out, in): each output pixel sees one tap.
        return shape[3]
    return int(np.prod(shape[:-1]))  # conv (kh, kw, in, out)


def _draw(rng: np.random.Generator, name: str, shape: Tuple[int, ...]) -> np.ndarray:
    leaf = name.rsplit("/", 1)[-1]
    kind = _layer_kind(name)
    if leaf == "kernel":
        if kind == "background-class-predict":
            return rng.standard_normal(shape)  # normalised by its norm in the head
        gain = _FPN_GAIN if name.startswith("fpn/") else _HEAD_GAIN.get(kind, 1.0)
        std = np.sqrt(2.0 / _fan_in(name, shape)) * gain
        kernel = rng.standard_normal(shape) * std
        if kind in _CENTRED:
            kernel -= kernel.mean(axis=0, keepdims=True)
        return kernel
    if leaf == "bias":
        return rng.standard_normal(shape) * _HEAD_BIAS.get(kind, 0.05)
    if leaf == "gamma":
        return rng.uniform(0.5, 1.0, shape)
    if leaf == "beta":
        return rng.standard_normal(shape) * 0.1
    if leaf == "moving_mean":
        return rng.standard_normal(shape) * 0.1
    if leaf == "moving_variance":
        return rng.uniform(0.5, 1.5, shape)
    raise ValueError(f"no rule to draw a random value for variable {name!r}")


def random_official_weights(
    variables: Iterable[Tuple[str, Sequence[int]]], seed: int
) -> Dict[str, np.ndarray]:
    """Random float32 values for each official variable, deterministic in `seed`.

    Args:
        variables: (name, shape) pairs, e.g. `official_variables(50, ensemble)`; the draw order
            is this order, from `np.random.default_rng(seed)`.
        seed: the seed.

    Returns:
        name -> float32 array of that shape. Kernels: He-normal on the fan-in; BN gamma U(0.5, 1),
        beta N(0, 0.1), moving_mean N(0, 0.1), moving_variance U(0.5, 1.5); biases N(0, 0.05);
        prediction layers rescaled (see `_HEAD_GAIN`). The classifier kernel comes from
        `random_classifier(seed, ...)` (own stream) and does not advance the main stream.
    """
    rng = np.random.default_rng(seed)
    out: Dict[str, np.ndarray] = {}
    for name, shape in variables:
        shape = tuple(int(d) for d in shape)
        if name.endswith("class-predict/kernel") and "background" not in name:
            value = random_classifier(seed, num_classes=shape[1], dim=shape[0])
        else:
            value = _draw(rng, name, shape)
        out[name] = np.asarray(value, dtype=np.float32).reshape(shape)
    return out
