"""tools/benchmark.py and its modules (benchmarks/): --quick runs every task end to end and
writes the JSON layout of docs/benchmarks/cpu_2core.json; ratios are ratios of medians measured
in turns in the same run. Nothing here asserts a speed."""

import importlib.util
import json
import numbers
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import TASKS, round_robin

# Trains, evaluates or starts processes: minutes on a CPU (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "docs/benchmarks/cpu_2core.json").read_text())

# The measures of each task (section: keys), all positive numbers.
MEASURES = {
    "inference": {
        "inference_ms": ("stock", "vild", "vild_ensemble"),
        "detections_per_image_last": ("stock", "vild", "vild_ensemble"),
    },
    "train": {
        "train_step_ms": ("stock", "vild", "vild_ensemble"),
        "train_step_ms_same_rois": ("stock", "vild"),
    },
    "vocabulary": {"vocabulary_ms": ("cold_1203", "cached_switch")},
    "crops": {"crops_per_s": ("fast", "reference")},
}
# Each ratio of the report: (numerator, denominator), as (section, key) of the report.
RATIOS = {
    "inference_vild_vs_stock": (("inference_ms", "vild"), ("inference_ms", "stock")),
    "inference_ensemble_vs_stock": (("inference_ms", "vild_ensemble"), ("inference_ms", "stock")),
    "train_vild_vs_stock_same_rois": (
        ("train_step_ms", "vild"),
        ("train_step_ms_same_rois", "stock"),
    ),
    "train_vild_vs_stock": (("train_step_ms", "vild"), ("train_step_ms", "stock")),
    "train_ensemble_vs_stock": (("train_step_ms", "vild_ensemble"), ("train_step_ms", "stock")),
    "crops_fast_vs_reference": (("crops_per_s", "fast"), ("crops_per_s", "reference")),
}
# Sections the setup holds only when that task ran.
TASK_SETUP = {
    "train": ("train_batch", "sampled_rois_per_image", "box_head_rois_per_train_step"),
    "crops": ("crops",),
}


def check_measures(report: dict, task: str) -> None:
    for section, keys in MEASURES[task].items():
        for key in keys:
            value = report[section][key]
            assert isinstance(value, numbers.Real) and value > 0, (section, key, value)
    for name, ((num_s, num_k), (den_s, den_k)) in RATIOS.items():
        if num_s in report:  # a ratio of this task: of the medians the report holds
            expected = report[num_s][num_k] / report[den_s][den_k]
            assert report["ratios"][name] == pytest.approx(expected, rel=1e-12), name
    if task == "train":
        # The same-RoI-count comparison really put as many RoIs through stock's box head.
        rois = report["setup"]["box_head_rois_per_train_step"]
        assert rois["stock_same_rois"] == rois["vild"] == rois["vild_ensemble"] > rois["stock"]
    if task == "crops":
        cosine = report["min_cosine_fast_vs_reference"]
        assert isinstance(cosine, numbers.Real) and 0.9 < cosine <= 1.0 + 1e-6


def test_quick_benchmark_writes_the_reference_layout(tmp_path):
    """The README's command (all tasks) as a script: the layout of the reference JSON."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report) == list(REFERENCE)
    for section, value in REFERENCE.items():
        # vocabulary_extra: the quick run scales the cold build from 60 names and has no ViT.
        if isinstance(value, dict) and section != "vocabulary_extra":
            assert list(report[section]) == list(value), section
    assert {"cold_1203_clip", "cached_switch_between", "cached_switch_in_memory"} <= set(
        report["vocabulary_extra"]
    )
    scaling = report["vocabulary_extra"]["build_scaling_tiny_clip"]  # names/s, peak MiB per size
    assert list(scaling) == ["50", "200"]
    assert all(v["names_per_s"] > 0 and v["peak_mib"] > 0 for v in scaling.values())
    assert isinstance(report["device"], str) and report["device"]
    assert report["setup"]["quick"] is True and report["setup"]["wall_s"] > 0
    for task in TASKS:
        check_measures(report, task)


@pytest.fixture
def tool(monkeypatch):
    """tools/benchmark.py as a module, run from the repository root (configs are relative);
    torch's thread count restored after (--quick sets it to 1)."""
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools/benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task", TASKS)
def test_quick_task_writes_its_sections(tool, task, tmp_path):
    """--task runs one task: its measures and ratios, the shared setup, nothing of the others."""
    out = tmp_path / "bench.json"
    assert tool.main(["--quick", "--task", task, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    check_measures(report, task)
    for other in set(TASKS) - {task}:
        assert not set(MEASURES[other]) & set(report), (other, list(report))
        assert not set(TASK_SETUP.get(other, ())) & set(report["setup"]), other
    prefix = {"inference": "inference_", "train": "train_", "crops": "crops_"}.get(task)
    ratios = report.get("ratios", {})
    assert all(name.startswith(prefix) for name in ratios) if prefix else not ratios
    assert {"model", "image_short_side", "threads", "repeats", "torch"} <= set(report["setup"])
    # Only the tasks that need models build them (the parameter count comes from ViLD).
    assert ("parameters_vild" in report["setup"]) == (task != "crops")


def test_round_robin_takes_turns_and_reports_medians():
    """Each round runs every candidate once, in turn (after the warm-up round); the result is
    the median of each one's timed runs, measured on a clock that only the calls advance."""
    now = [0.0]
    calls = []
    durations = {"a": iter([9.0, 3.0, 1.0, 2.0]), "b": iter([9.0, 4.0, 8.0, 6.0])}

    def candidate(name):
        def fn():
            calls.append(name)
            now[0] += next(durations[name])

        return fn

    medians = round_robin(
        {"a": candidate("a"), "b": candidate("b")}, repeats=3, clock=lambda: now[0]
    )
    assert calls == ["a", "b"] * 4  # one warm-up round (its 9 s not counted), three timed
    assert medians == {"a": 2.0, "b": 6.0}
    assert medians["b"] / medians["a"] == 3.0
