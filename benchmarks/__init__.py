"""The benchmarks of ``tools/benchmark.py``: ViLD against stock detectron2 Mask R-CNN, side by
side in one process, and the scale-out and serving measures. Not part of the installed
``vild_d2`` package: run from the repository root (configs are relative paths).

One module per task, each a function of a :class:`~benchmarks.models.BenchmarkSetup` that
returns its sections of the JSON report (``docs/benchmarks/cpu_2core.json`` shows the layout):

* :mod:`.inference`: per-image inference of stock, ViLD and ViLD-ensemble.
* :mod:`.train`: a training step (batch 2), also stock with ViLD's RoI count.
* :mod:`.vocabulary`: building the text classifier and switching vocabularies.
* :mod:`.crops`: distillation crops, fast vs reference, and their CLIP agreement.

Scale-out and serving tasks, run only when named (``--task``):

* :mod:`.train_processes`: training iterations/s in 1 and 2 processes.
* :mod:`.precompute`: the CLIP-targets job end to end vs the CLIP forward alone.
* :mod:`.serve`: the web server under load vs direct predictor calls.
* :mod:`.deploy`: the exported model in ``vild_d2_runtime`` (no PyTorch) vs the PyTorch
  predictor.

What the tasks share is in :mod:`.common` (timing, inputs, worker processes) and
:mod:`.models` (the models made to do alike work, :class:`~benchmarks.models.BenchmarkSetup`).
The programs run in fresh interpreters are modules of their own: :mod:`.encode_names` and
:mod:`.train_worker`. Nothing is imported here, so that importing one task stays light.
"""
