"""Utilities that are not part of the model: :mod:`vild_d2.utils.benchmark` (the helpers of
``tools/benchmark.py``). Nothing is imported here, so ``import vild_d2`` stays light."""
