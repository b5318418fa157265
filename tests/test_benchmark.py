"""tools/benchmark.py --quick writes the JSON layout the README's table is made from."""

import json
import numbers
import subprocess
import sys

LAYOUT = {
    "inference_ms": ("stock", "vild", "vild_ensemble"),
    "train_step_ms": ("stock", "vild", "vild_ensemble"),
    "vocabulary_ms": ("cold_1203", "cached_switch"),
    "crops_per_s": ("reference", "fast"),
}


def test_quick_benchmark_writes_the_json_layout(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert isinstance(result["device"], str) and result["device"]
    for section, keys in LAYOUT.items():
        assert set(keys) <= set(result[section]), (section, result[section])
        for key in keys:
            value = result[section][key]
            assert isinstance(value, numbers.Real) and value > 0, (section, key, value)
    cosine = result["min_cosine_fast_vs_reference"]
    assert isinstance(cosine, numbers.Real) and 0.9 < cosine <= 1.0 + 1e-6
    # The same-RoI-count comparison really put the same number of RoIs through the box head.
    rois = result["setup"]["box_head_rois_per_train_step"]
    assert rois["stock_same_rois"] == rois["vild"] > rois["stock"]
