"""``tools/benchmark.py --task deploy --quick``: the runtime and the PyTorch predictor timed side
by side, and the runtime's vocabulary-change costs, in the report."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_deploy_task_reports_both_sides(tmp_path):
    out = tmp_path / "deploy.json"
    cmd = [sys.executable, "tools/benchmark.py", "--out", str(out), "--quick", "--task", "deploy"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    shapes = report["deploy_ms_per_image"]["shapes_r18_fpn"]
    assert shapes["pytorch"] > 0 and shapes["onnxruntime"] > 0
    alike = report["deploy_extra"]["alike_last_image"]["shapes_r18_fpn"]
    assert alike["detections_runtime"] == alike["detections_pytorch"] > 0
    assert alike["same_classes"] and alike["max_box_diff_px"] <= 1e-2
    vocab = report["deploy_vocabulary_ms"]
    assert vocab["new_1203_names_runtime"] > vocab["known_1203_names_new_list_runtime"] > 0
    assert "deploy_runtime_vs_pytorch_shapes_r18_fpn" in report["ratios"]


def test_the_trained_grid_vocabularies():
    """K = 6, 56, 1203: the world's names first, then LVIS names, none twice."""
    from benchmarks.deploy import grid_vocabularies

    world = ["red circle", "blue star", "bench", "green cross"]  # "bench" is an LVIS name too
    vocabularies = grid_vocabularies(world)
    assert sorted(vocabularies) == [6, 56, 1203]
    for k, names in vocabularies.items():
        assert len(names) == k == len(set(names)), k
        assert names[:4] == world
    assert vocabularies[6][4:] == ["aerosol_can", "air_conditioner"]  # LVIS v1: the first two
