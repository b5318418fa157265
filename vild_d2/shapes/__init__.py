"""The shapes world, the embedded default (``make demo``, ``make ablation``; docs/SHAPES.md):
a synthetic open-vocabulary world (``world``), its tiny CLIP teacher (``teacher``), the cached
pipeline that runs the project's tools on it (``pipeline``) and what a model found (``picture``).
"""
