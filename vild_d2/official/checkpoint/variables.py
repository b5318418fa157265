"""Variable names and shapes of the official (TensorFlow) ViLD checkpoints, in creation order.

The R50 lists in `assets/` were listed from the official inference graph built in TensorFlow
(tensorflow/tpu 7dc921f8, models/official/detection/projects/vild). Deeper ResNets are derived by
the rule the official `modeling/architecture/resnet.py` follows: its layers are unnamed, so
`tf.layers` numbers them in creation order inside the `resnet{depth}` scope:

- stem: `conv2d` (7x7, 3->64), `batch_normalization`;
- per bottleneck block: in the first block of each group (the one with a projection) the
  shortcut 1x1 conv and its BN come first, then conv 1x1 (->f), BN, conv 3x3 (f->f), BN,
  conv 1x1 (f->4f), BN;
- blocks per group: R50 [3, 4, 6, 3], R101 [3, 4, 23, 3], R152 [3, 8, 36, 3].

Everything after the backbone (FPN, RPN, heads) has explicit names and does not depend on depth.
Names carry no `:0` and no `_sim_clr` suffix (see docs/OFFICIAL.md).
"""

import os
from functools import lru_cache
from typing import List, Tuple

__all__ = ["BLOCKS_PER_GROUP", "official_variables", "resnet_variables"]

Variable = Tuple[str, Tuple[int, ...]]

BLOCKS_PER_GROUP = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")
_ASSETS = os.path.join(os.path.dirname(__file__), "assets")


@lru_cache(maxsize=None)
def _read_list(ensemble: bool) -> Tuple[Variable, ...]:
    name = (
        "vild_official_R50_ensemble_variables.txt"
        if ensemble
        else "vild_official_R50_variables.txt"
    )
    out = []
    with open(os.path.join(_ASSETS, name)) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            var, shape = line.split(" ", 1)
            dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
            out.append((var, dims))
    return tuple(out)


def resnet_variables(depth: int = 50) -> List[Variable]:
    """The official bottleneck ResNet's variables, in the order TF creates them.

    Returns:
        list of (name, shape); conv kernels are (kh, kw, in, out), BN vectors (C,).
    """
    if depth not in BLOCKS_PER_GROUP:
        raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_GROUP)}, got {depth}")
    scope = f"resnet{depth}"
    out: List[Variable] = []
    counter = [0]  # tf.layers numbers conv2d and batch_normalization with one shared index

    def conv_bn(k: int, cin: int, cout: int) -> None:
        suffix = f"_{counter[0]}" if counter[0] else ""
        counter[0] += 1
        out.append((f"{scope}/conv2d{suffix}/kernel", (k, k, cin, cout)))
        for v in _BN_VARS:
            out.append((f"{scope}/batch_normalization{suffix}/{v}", (cout,)))

    conv_bn(7, 3, 64)
    cin = 64
    for group, repeats in enumerate(BLOCKS_PER_GROUP[depth]):
        f = 64 * 2**group
        for b in range(repeats):
            if b == 0:  # projection shortcut is created before the residual branch
                conv_bn(1, cin, 4 * f)
            conv_bn(1, cin, f)
            conv_bn(3, f, f)
            conv_bn(1, f, 4 * f)
            cin = 4 * f
    return out


def official_variables(depth: int = 50, ensemble: bool = False) -> List[Variable]:
    """Names and shapes of the official ViLD checkpoint's variables, in creation order.

    Args:
        depth: ResNet depth, 50, 101 or 152.
        ensemble: ViLD-ensemble (adds the image branch `distill_*` box head and projection).

    Returns:
        list of (name, shape). R50: 425 variables (463 for the ensemble).
    """
    listed = _read_list(ensemble)
    head = [v for v in listed if not v[0].startswith("resnet50/")]
    return resnet_variables(depth) + head
