"""The official optimiser (modeling/base_model.py ``BaseModel.train``, modeling/learning_rates.py)
and how detectron2's ``build_optimizer`` reproduces it under the official configs.

* ``tf.train.MomentumOptimizer(momentum=0.9)``: accum = 0.9 accum + g; w -= lr accum (not
  Nesterov) = ``torch.optim.SGD(momentum=0.9, dampening=0)``; no gradient clipping
  (``gradient_clip_norm: 0``).
* L2: ``4e-5 * sum(tf.nn.l2_loss(v))`` = 4e-5 sum ||W||^2 / 2 over the trainable variables
  matching ``.*(kernel|weight):0$`` (conv/FC kernels and the background-class-predict kernel;
  no biases, no BN gamma/beta): its gradient 4e-5 W is SGD's ``weight_decay`` on those
  parameters only (SOLVER.WEIGHT_DECAY 4e-5, WEIGHT_DECAY_BIAS 0, WEIGHT_DECAY_NORM 0).
* ``frozen_variable_prefix: class-predict``: the text classifier is a buffer here, never a
  parameter, so it cannot change.
* step schedule with linear warm-up: lr = 0.0032 + step / 1000 (0.32 - 0.0032) before step 1000,
  then 0.32, x0.1 at 162k and 171k (``learning_rate_steps`` has a third entry, 175.5k, that
  ``zip`` with the two levels drops) = detectron2's ``WarmupMultiStepLR`` (linear, factor
  0.01, 1000 iterations, STEPS (162000, 171000)).
"""

from typing import Dict, Sequence

import torch
from torch import nn

from ...modeling.text_classifier import TextClassifier

__all__ = ["official_decay_parameters", "official_l2_loss", "official_learning_rate"]

_KERNEL_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def official_decay_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters the official L2 covers (its kernels), by name."""
    out = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, _KERNEL_MODULES) and module.weight.requires_grad:
            out[prefix + "weight"] = module.weight
        if isinstance(module, TextClassifier) and module.background.requires_grad:
            out[prefix + "background"] = module.background  # background-class-predict/kernel
    return out


def official_l2_loss(model: nn.Module, weight_decay: float) -> torch.Tensor:
    """``l2_weight_decay * sum(tf.nn.l2_loss(kernel))`` (the loss term; SGD's weight decay
    gives its gradient)."""
    params = list(official_decay_parameters(model).values())
    return weight_decay * sum((p.float() ** 2).sum() for p in params) / 2.0


def official_learning_rate(
    step: int,
    base_lr: float = 0.32,
    warmup_lr: float = 0.0032,
    warmup_steps: int = 1000,
    levels: Sequence[float] = (0.032, 0.0032),
    steps: Sequence[int] = (162000, 171000, 175500),
) -> float:
    """``step_learning_rate_with_linear_warmup`` at ``step`` (float32 as TF computes it)."""
    lr = warmup_lr + float(torch.tensor(step, dtype=torch.float32) / warmup_steps) * (
        base_lr - warmup_lr
    )
    lr = lr if step < warmup_steps else base_lr
    for level, start in zip(levels, steps):
        if step >= start:
            lr = level
    return lr
