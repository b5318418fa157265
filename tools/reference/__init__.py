"""The official ViLD as a test reference, outside the installed package: seeded official weights
(:mod:`.random_weights`, numpy only, also loaded by path in the TensorFlow venv by
tools/official_reference.py) and the stage-by-stage inference comparison (:mod:`.parity`, used by
tests/ and tools/official_parity_ablation.py). Tools find it beside themselves; pytest through
pytest.ini's pythonpath.
"""
