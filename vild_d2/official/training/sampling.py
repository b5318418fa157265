"""The official random choices, injectable: every ``tf.random_shuffle`` of the official training
path (utils/object_detection/minibatch_sampler.py ``subsample_indicator``, used by the RPN's
anchor sampler; balanced_positive_negative_sampler.py ``_static_subsample``, used by the RoI
sampler) is one call of a :class:`Shuffler`, in the official call order: per image, the
anchors' positives then negatives; then per image, the RoIs.

:class:`RecordedShuffles` replays recorded permutations (the parity test feeds the official
graph's); the samplers below are otherwise deterministic functions of them.
"""

from typing import Dict, List, Optional, Sequence

import torch

__all__ = [
    "Shuffler",
    "RecordedShuffles",
    "subsample_indicator",
    "balanced_subsample",
    "static_balanced_subsample",
]


class Shuffler:
    """``tf.random_shuffle(tf.range(n))``: ``shuffler(n)`` -> (n,) int64 permutation.

    ``record``: when a dict, the training path stores what it sampled there (name -> tensor
    list), for tests and debugging."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator
        self.record: Optional[Dict[str, List[torch.Tensor]]] = None

    def __call__(self, n: int, device=None) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator).to(device)

    def log(self, name: str, value: torch.Tensor) -> None:
        """Record a sampled result (detached)."""
        if self.record is not None:
            self.record.setdefault(name, []).append(value.detach().cpu())

    def keep(self, name: str, value: torch.Tensor) -> None:
        """Record a live tensor (a head output whose gradient a test reads)."""
        if self.record is not None:
            if value.requires_grad:
                value.retain_grad()
            self.record.setdefault(name, []).append(value)


class RecordedShuffles(Shuffler):
    """Replays ``permutations`` in order; a wrong length, a non-permutation or too few recorded
    calls is an error naming the call (a fixture from another run, or another sampling path)."""

    def __init__(self, permutations: Sequence, where: str = "recorded shuffles"):
        super().__init__()
        self.permutations = [torch.as_tensor(p, dtype=torch.int64) for p in permutations]
        self.where = where
        self.calls = 0

    def __call__(self, n: int, device=None) -> torch.Tensor:
        k = self.calls
        if k >= len(self.permutations):
            raise ValueError(
                f"{self.where}: call {k} asks for a permutation of {n}, but only "
                f"{len(self.permutations)} were recorded"
            )
        perm = self.permutations[k]
        if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
            raise ValueError(
                f"{self.where}: call {k} needs a permutation of {n}, the recorded "
                f"one has shape {tuple(perm.shape)}"
                + ("" if perm.shape != (n,) else " and is not a permutation")
            )
        self.calls += 1
        return perm.to(device)

    def check_used_up(self) -> None:
        if self.calls != len(self.permutations):
            raise ValueError(
                f"{self.where}: {len(self.permutations)} permutations recorded, "
                f"{self.calls} used"
            )


def subsample_indicator(indicator: torch.Tensor, num: int, shuffle: Shuffler) -> torch.Tensor:
    """(N,) bool -> (N,) bool with at most ``num`` of the True entries kept: the first ``num``
    of the True indices (ascending) after a shuffle of them."""
    idx = torch.nonzero(indicator).flatten()
    idx = idx[shuffle(len(idx), idx.device)]
    out = torch.zeros_like(indicator)
    out[idx[: max(0, min(num, len(idx)))]] = True
    return out


def balanced_subsample(
    indicator: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    positive_fraction: float,
    shuffle: Shuffler,
) -> torch.Tensor:
    """The non-static ``BalancedPositiveNegativeSampler.subsample`` (the RPN's): at most
    ``int(batch_size * positive_fraction)`` positives, then negatives up to ``batch_size``.
    (N,) bool candidates and labels -> (N,) bool sampled."""
    pos = subsample_indicator(labels & indicator, int(batch_size * positive_fraction), shuffle)
    neg = subsample_indicator(~labels & indicator, batch_size - int(pos.sum()), shuffle)
    return pos | neg


def static_balanced_subsample(
    indicator: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    positive_fraction: float,
    shuffle: Shuffler,
) -> torch.Tensor:
    """The static ``BalancedPositiveNegativeSampler._static_subsample`` (the RoI sampler's):
    always ``batch_size`` entries (non-candidates in index order fill a short list; a shortage
    of negatives points at permuted position 0, as the official index arithmetic does).
    (N,) bool -> (N,) bool."""
    n = indicator.numel()
    device = indicator.device
    shortfall = batch_size - int(indicator.sum())
    extra = torch.cumsum((~indicator).long(), 0) <= shortfall
    indicator = indicator | extra
    perm = shuffle(n, device)
    ind_p, lab_p = indicator[perm], labels[perm]
    position = torch.arange(1, n + 1, device=device)
    signed = torch.where(ind_p, position, torch.zeros_like(position))
    signed = torch.where(lab_p, signed, -signed)
    ordered = torch.sort(signed, descending=True).values
    num_pos = min(int(batch_size * positive_fraction), int((ordered > 0).sum()))
    num_neg = batch_size - num_pos
    rng = torch.arange(n, device=device)
    chosen = ordered[(rng < num_pos) | (rng >= n - num_neg)][:batch_size]
    values = torch.zeros(batch_size, dtype=torch.int64, device=device)
    values[: len(chosen)] = chosen
    idx = (values.abs() - 1).clamp(min=0)
    sampled_p = torch.zeros(n, dtype=torch.bool, device=device)
    sampled_p[idx] = True
    out = torch.zeros_like(sampled_p)
    out[perm] = sampled_p
    return out
