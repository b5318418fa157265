"""tools/train_net.py on a machine without a GPU or internet (issue 32): a config that asks for
CUDA, weights it cannot download or find, and more processes than cores are each one line
naming what to change, exit 2, and nothing written, before any dataset is loaded. The tool
runs in this process (its ``cli``), as far as those checks."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import socket
from pathlib import Path

import pytest
import torch

from own_data import write_coco_dataset  # demo/ (pytest.ini pythonpath)

ROOT = Path(__file__).resolve().parents[2]


def _train_net():
    spec = importlib.util.spec_from_file_location("machine_train_net", ROOT / "tools/train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _closed_port() -> int:
    """A local port nobody listens on: a download from it fails at once, online or not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("machine") / "mine"
    return write_coco_dataset(root, name="mine", num_train=8, num_val=2, image_size=64)


def test_device_weights_and_processes_are_one_line(dataset_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "iopath"))  # iopath's download cache
    tool = _train_net()
    out = tmp_path / "out"
    common = [
        "--config-file",
        str(ROOT / "configs/Shapes/rpn.yaml"),
        "--dataset-file",
        str(dataset_file),
        "DATASETS.TRAIN",
        "('mine_train_base',)",
        "OUTPUT_DIR",
        str(out),
    ]
    url = f"http://127.0.0.1:{_closed_port()}/ImageNetPretrained/R-50.pkl"
    cases = {
        # the COCO / LVIS recipes' device, on a machine without CUDA
        "cuda": (["MODEL.DEVICE", "cuda"], ["MODEL.DEVICE is 'cuda'", "MODEL.DEVICE cpu"]),
        # the recipes' ImageNet weights, offline
        "url": (
            ["MODEL.WEIGHTS", url],
            [f"MODEL.WEIGHTS {url} could not be downloaded", "MODEL.WEIGHTS /path/to/R-50.pkl"],
        ),
        "missing": (
            ["MODEL.WEIGHTS", str(tmp_path / "nope.pth")],
            [f"MODEL.WEIGHTS {tmp_path / 'nope.pth'}: no such file"],
        ),
        # more CPU processes than cores (the docs' `--num-gpus 8` on a small machine)
        "processes": (["--num-gpus", "999"], ["--num-gpus 999 on a machine without CUDA"]),
    }
    if torch.cuda.is_available():  # a GPU machine: CUDA is there, and 999 GPUs are not
        cases.pop("cuda")
        cases["processes"] = (["--num-gpus", "999"], ["--num-gpus 999 but this machine has"])
    for name, (opts, expected) in cases.items():
        assert tool.cli([*common, *opts]) == 2, name
        err = capsys.readouterr().err
        # (iopath's download progress bar, "R-50.pkl: 0.00B [00:00, ?B/s]", may come first)
        lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip()]
        lines = [x for x in lines if not x.rstrip().endswith("B/s]")]
        assert "Traceback" not in err, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err[-2000:])
        for text in expected:
            assert text in lines[0], (name, lines[0])
        assert not out.exists(), name  # nothing written: no config.yaml, no log.txt
