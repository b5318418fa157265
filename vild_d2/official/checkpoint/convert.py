"""Official (TensorFlow) ViLD checkpoint variables -> the state dict of
:class:`OfficialViLDRCNN` (configs/LVIS-OVD/official/*).

Layouts: conv kernels (kh, kw, in, out) -> (out, in, kh, kw); dense kernels (in, out) ->
(out, in), fc6's input rows permuted from the official (H, W, C) flattening to PyTorch's
(C, H, W); transposed conv kernels (kh, kw, out, in) -> (in, out, kh, kw); batch norm gamma,
beta, moving_mean, moving_variance -> weight, bias, running_mean, running_var. The frozen text
classifier ``class-predict/kernel`` (D, K) is no parameter here: it becomes the model's
vocabulary (:func:`official_vocabulary`).
"""

import re
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

from ...text import Vocabulary, builtin_vocabulary
from .variables import BLOCKS_PER_GROUP, official_variables

__all__ = ["convert_official_weights", "official_key_map", "official_vocabulary",
           "normalize_official_name", "CLASSIFIER_VARIABLE"]  # fmt: skip

CLASSIFIER_VARIABLE = "frcnn_layer_0/fast_rcnn_head/class-predict/kernel"
_HEAD = "frcnn_layer_0/fast_rcnn_head"
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
       "moving_variance": "running_var"}  # fmt: skip


def normalize_official_name(name: str) -> str:
    """Drop a trailing ``:0`` and the ``_sim_clr`` suffix of a name component (the R152
    checkpoints' SimCLR-pretrained backbone scope)."""
    name = re.sub(r":\d+$", "", name)
    return re.sub(r"_sim_clr(?=/|$)", "", name)


def _bn(tf: str, pt: str) -> Iterator[Tuple[str, str, str]]:
    for tf_leaf, pt_leaf in _BN.items():
        yield f"{tf}/{tf_leaf}", f"{pt}.{pt_leaf}", "vector"


def _resnet(depth: int) -> Iterator[Tuple[str, str, str]]:
    """The ResNet's (official name, state-dict key, layout), in TF's creation order."""
    scope, counter = f"resnet{depth}", [0]

    def conv_bn(module: str):
        suffix = f"_{counter[0]}" if counter[0] else ""
        counter[0] += 1
        yield f"{scope}/conv2d{suffix}/kernel", f"{module}.weight", "conv"
        yield from _bn(f"{scope}/batch_normalization{suffix}", f"{module}.norm")

    base = "backbone.bottom_up"
    yield from conv_bn(f"{base}.stem.conv1")
    for stage, repeats in enumerate(BLOCKS_PER_GROUP[depth]):
        for b in range(repeats):
            block = f"{base}.res{stage + 2}.{b}"
            if b == 0:  # TF creates the projection shortcut first
                yield from conv_bn(f"{block}.shortcut")
            for i in (1, 2, 3):
                yield from conv_bn(f"{block}.conv{i}")


def _box_head(tf_prefix: str, bn_offset: int, pt: str) -> Iterator[Tuple[str, str, str]]:
    for i in range(4):
        bn = bn_offset + i
        yield f"{_HEAD}/{tf_prefix}conv_{i}/kernel", f"{pt}.convs.{i}.weight", "conv"
        yield f"{_HEAD}/{tf_prefix}conv_{i}/bias", f"{pt}.convs.{i}.bias", "vector"
        yield from _bn(f"{_HEAD}/batch_normalization" + (f"_{bn}" if bn else ""),
                       f"{pt}.conv_norms.{i}")  # fmt: skip
    for i, fc in enumerate(("fc6", "fc7")):
        layout = "fc6" if fc == "fc6" else "dense"
        yield f"{_HEAD}/{tf_prefix}{fc}/kernel", f"{pt}.fcs.{i}.weight", layout
        yield f"{_HEAD}/{tf_prefix}{fc}/bias", f"{pt}.fcs.{i}.bias", "vector"
        yield from _bn(f"{_HEAD}/batch_normalization_{bn_offset + 4 + i}", f"{pt}.fc_norms.{i}")


def official_key_map(depth: int = 50, ensemble: bool = False) -> List[Tuple[str, str, str]]:
    """(official variable name, state-dict key, layout) for every converted variable; layouts:
    "conv", "deconv", "dense", "fc6", "vector", "background"."""
    out = list(_resnet(depth))
    for i, level in enumerate(range(2, 6)):
        for tf_name, pt in ((f"l{level}", "lateral_convs"), (f"post_hoc_d{level}", "output_convs")):
            out += [(f"fpn/{tf_name}/kernel", f"backbone.{pt}.{i}.weight", "conv"),
                    (f"fpn/{tf_name}/bias", f"backbone.{pt}.{i}.bias", "vector")]  # fmt: skip
    out += [("fpn/p6/kernel", "backbone.p6_conv.weight", "conv"),
            ("fpn/p6/bias", "backbone.p6_conv.bias", "vector")]  # fmt: skip
    for i, level in enumerate(range(2, 7)):
        out += _bn(f"fpn/p{level}-bn", f"backbone.norms.{i}")
    rpn = "proposal_generator.rpn_head"
    for i, tf_name in enumerate(("rpn", "rpn-1")):
        out += [(f"rpn_head/{tf_name}/kernel", f"{rpn}.convs.{i}.weight", "conv"),
                (f"rpn_head/{tf_name}/bias", f"{rpn}.convs.{i}.bias", "vector")]  # fmt: skip
    for tf_name, pt in (("rpn-class", "objectness_logits"), ("rpn-box", "anchor_deltas")):
        out += [(f"rpn_head/{tf_name}/kernel", f"{rpn}.{pt}.weight", "conv"),
                (f"rpn_head/{tf_name}/bias", f"{rpn}.{pt}.bias", "vector")]  # fmt: skip
    for k, level in enumerate(range(2, 7)):
        for i in range(2):
            out += _bn(f"rpn_head/rpn-l{level}-bn" + (f"-{i}" if i else ""), f"{rpn}.norms.{k}.{i}")
    out += _box_head("", 0, "roi_heads.box_head")
    predictor = "roi_heads.box_predictor"
    out += [
        (f"{_HEAD}/project-to-clip/kernel", f"{predictor}.cls_score.projection.weight", "dense"),
        (f"{_HEAD}/project-to-clip/bias", f"{predictor}.cls_score.projection.bias", "vector"),
        (f"{_HEAD}/background-class-predict/kernel", f"{predictor}.cls_score.background",
         "background"),
        (f"{_HEAD}/box-predict/kernel", f"{predictor}.bbox_pred.weight", "dense"),
        (f"{_HEAD}/box-predict/bias", f"{predictor}.bbox_pred.bias", "vector"),
    ]  # fmt: skip
    if ensemble:
        out += _box_head("distill_", 6, "roi_heads.image_box_head")
        out += [
            (f"{_HEAD}/distill-project-to-clip/kernel", "roi_heads.image_projection.weight",
             "dense"),
            (f"{_HEAD}/distill-project-to-clip/bias", "roi_heads.image_projection.bias", "vector"),
        ]  # fmt: skip
    mask = "roi_heads.mask_head"
    for i in range(4):
        out += [(f"mask_head/mask-conv-l{i}/kernel", f"{mask}.convs.{i}.weight", "conv"),
                (f"mask_head/mask-conv-l{i}/bias", f"{mask}.convs.{i}.bias", "vector")]  # fmt: skip
        out += _bn("mask_head/batch_normalization" + (f"_{i}" if i else ""),
                   f"{mask}.conv_norms.{i}")  # fmt: skip
    out += [("mask_head/conv5-mask/kernel", f"{mask}.deconv.weight", "deconv"),
            ("mask_head/conv5-mask/bias", f"{mask}.deconv.bias", "vector")]  # fmt: skip
    out += _bn("mask_head/batch_normalization_4", f"{mask}.deconv_norm")
    out += [("mask_head/mask_fcn_logits/kernel", f"{mask}.predictor.weight", "conv"),
            ("mask_head/mask_fcn_logits/bias", f"{mask}.predictor.bias", "vector")]  # fmt: skip
    return out


def _convert(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
        return value.transpose(3, 2, 0, 1)
    if layout == "deconv":  # (kh, kw, out, in) -> ConvTranspose2d's (in, out, kh, kw)
        return value.transpose(3, 2, 0, 1)
    if layout == "dense":  # (in, out) -> (out, in)
        return value.T
    if layout == "fc6":  # rows flattened (H, W, C) officially, (C, H, W) in PyTorch
        out_dim = value.shape[1]
        side, channels = 7, value.shape[0] // 49
        if side * side * channels != value.shape[0]:
            raise ValueError(f"fc6 kernel {value.shape} is not (7 * 7 * C, D)")
        return (
            value.reshape(side, side, channels, out_dim).transpose(3, 2, 0, 1).reshape(out_dim, -1)
        )
    if layout == "background":  # (D, 1) -> (D,)
        return value[:, 0]
    return value


def _examples(items: List[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (
        f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    )


def variable_problems(
    values: Dict[str, np.ndarray], expected: Dict[str, tuple], depth: int, ensemble: bool
) -> str:
    """ "" if ``values`` (normalised names) has exactly the ``expected`` names and shapes, else
    ONE line: the counts of missing, unexpected and mis-shaped variables, a few of each, and
    what the checkpoint looks like instead (the other ViLD variant, another depth, another
    model) when that can be told."""
    missing = [n for n in expected if n not in values]
    unexpected = [n for n in values if n not in expected]
    shapes = [
        f"{n} {list(values[n].shape)} (expected {list(s)})"
        for n, s in expected.items()
        if n in values and tuple(values[n].shape) != tuple(s)
    ]
    if not (missing or unexpected or shapes):
        return ""
    kind = f"R{depth}" + (" ViLD-ensemble" if ensemble else " ViLD")
    parts = [f"{len(values)} variables found, {len(expected)} expected"]
    if missing:
        parts.append(f"{len(missing)} missing ({_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({_examples(shapes, 2)})")
    other = dict(official_variables(depth, not ensemble))
    depths = {int(m.group(1)) for n in values for m in [re.match(r"resnet(\d+)/", n)] if m}
    if set(values) == set(other):
        hint = (
            f"it is an R{depth} {'ViLD' if ensemble else 'ViLD-ensemble'} checkpoint: use "
            f"the {'vild' if ensemble else 'vild_ensemble'}_R{depth}_tf.yaml config"
        )
    elif depths and depth not in depths:
        hint = (
            f"its backbone is ResNet-{'/'.join(map(str, sorted(depths)))}: use the config of "
            "that depth (MODEL.RESNETS.DEPTH)"
        )
    elif len(set(values) & set(expected)) < len(expected) // 2:
        hint = "it is not an official ViLD checkpoint (fewer than half of the names match)"
    else:
        hint = ""
    return (
        f"the checkpoint's variables do not match the official {kind}: "
        + "; ".join(parts)
        + (f"; {hint}" if hint else "")
    )


def convert_official_weights(
    tf_vars: Dict[str, np.ndarray], depth: int = 50, ensemble: bool = False
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """
    Args:
        tf_vars: official variable name -> array (names may carry ``:0`` or ``_sim_clr``).
        depth: ResNet depth (50, 101, 152).
        ensemble: a ViLD-ensemble checkpoint (``distill_*`` image branch).
    Returns:
        (state_dict, vocabulary info): the model's float32 tensors, and ``{"classifier":
        (K, D)}``, the frozen text classifier's class embeddings (rows = classes).
    Raises:
        ValueError: one line (:func:`variable_problems`) if the variables are not the official
            model's.
    """
    values = {}
    for name, value in tf_vars.items():
        key = normalize_official_name(name)
        if key in values:
            raise ValueError(f"two variables normalise to {key!r} (one is {name!r})")
        values[key] = np.asarray(value)
    expected = dict(official_variables(depth, ensemble))
    problems = variable_problems(values, expected, depth, ensemble)
    if problems:
        raise ValueError(problems)
    mapping = official_key_map(depth, ensemble)
    mapped = {n for n, _, _ in mapping} | {CLASSIFIER_VARIABLE}
    assert mapped == set(expected), sorted(mapped ^ set(expected))  # the map is complete
    state = {
        key: torch.from_numpy(np.ascontiguousarray(_convert(values[name], layout), np.float32))
        for name, key, layout in mapping
    }
    classifier = torch.from_numpy(np.ascontiguousarray(values[CLASSIFIER_VARIABLE].T, np.float32))
    return state, {"classifier": classifier}


def official_vocabulary(classifier: torch.Tensor, names: str = "lvis",
                        clip_model: str = "ViT-B/32") -> Vocabulary:  # fmt: skip
    """The official classifier (K, D) as a :class:`Vocabulary` of the built-in ``names``
    (LVIS v1: its 1203 classes in id order, the rare ones novel, as the official rare mask)."""
    builtin = builtin_vocabulary(names)
    if len(builtin.names) != len(classifier):
        raise ValueError(f"the classifier has {len(classifier)} classes, the {names!r} "
                         f"vocabulary {len(builtin.names)}")  # fmt: skip
    novel = None
    if builtin.novel is not None:
        novel = torch.tensor([n in set(builtin.novel) for n in builtin.names])
    return Vocabulary(builtin.names, classifier, novel, clip_model,
                      source=f"official ViLD classifier ({names})")  # fmt: skip
