"""The official-architecture model (configs/LVIS-OVD/official) converted from official weights
(tools/convert_official_checkpoint.py, on the parity test's seeded random weights) through the
project's tools: evaluation (train_net --eval-only), demo with a typed vocabulary, the serving
API, TorchScript export; and fine-tuning on the tiny shapes world, in 1 and 2 processes, with
finite losses. At 128 px with few proposals: the official R50 is 49M parameters."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import json
import math
import subprocess
import sys
from unittest import mock

import httpx
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from vild_d2 import ViLDCheckpointer, ViLDPredictor
from vild_d2.config import load_config
from reference.random_weights import random_official_weights
from vild_d2.official import official_variables
from vild_d2.official.checkpoint import convert_checkpoint
from vild_d2.serve import DetectionService, ServerThread, build_app
from tiny_world import save_random_clip, tool_world  # tests/ helper

pytestmark = pytest.mark.slow  # tools in subprocesses, a 49M-parameter model

CONFIGS = {
    "vild": "configs/LVIS-OVD/official/vild_R50_tf.yaml",
    "ensemble": "configs/LVIS-OVD/official/vild_ensemble_R50_tf.yaml",
}
# The official model at test size: 128 px canvas, few proposals and RoIs, 2 steps.
SMALL = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.VILD.OFFICIAL.IMAGE_SIZE",
    "128",
    "MODEL.VILD.OFFICIAL.NORM",
    "BN",
    "MODEL.VILD.LSJ.IMAGE_SIZE",
    "128",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "48",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "48",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "32",
    "MODEL.VILD.DISTILL.MAX_BOXES",
    "16",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
    "TEST.DETECTIONS_PER_IMAGE",
    "20",
    "DATALOADER.NUM_WORKERS",
    "0",
    "DATALOADER.SAMPLER_TRAIN",
    "TrainingSampler",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.BASE_LR",
    "0.001",
    "SOLVER.WARMUP_ITERS",
    "10",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.CHECKPOINT_PERIOD",
    "1000",
    "TEST.EVAL_PERIOD",
    "0",
    "DATASETS.TRAIN",
    "('shapes_train_base',)",
    "DATASETS.TEST",
    "('shapes_val',)",
]


def _converter():
    spec = importlib.util.spec_from_file_location(
        "vild_convert_tool", "tools/convert_official_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _convert(tool, variant, out, tf_vars):
    # (the real reader on a real TF checkpoint: tests/official/test_official_user_path.py)
    with mock.patch.object(convert_checkpoint, "read_tf_checkpoint", lambda prefix: dict(tf_vars)):
        return tool.main(
            [
                "--checkpoint",
                "fake/model.ckpt",
                "--config-file",
                CONFIGS[variant],
                "--output",
                str(out),
            ]
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 512-d tiny CLIP (the official width), the tiny world with its stores, and both
    variants converted from the seeded official weights."""
    root = tmp_path_factory.mktemp("official")
    clip = save_random_clip(str(root / "clip512.pt"), embed_dim=512)
    world = tool_world(root / "datasets", clip, "toff", threads=2)
    tool, weights = _converter(), {}
    for variant in CONFIGS:
        tf_vars = random_official_weights(official_variables(50, variant == "ensemble"), 0)
        tf_vars.update({"global_step": np.int64(5), "fpn/l2/kernel/Momentum": np.zeros(1)})
        assert _convert(tool, variant, root / f"{variant}.pth", tf_vars) == 0
        weights[variant] = root / f"{variant}.pth"
    common = [
        *SMALL,
        "MODEL.VILD.CLIP_MODEL",
        clip,
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(root / "cache"),
        "MODEL.VILD.DISTILL.STORES",
        f"('{world['stores']['targets']}',)",
    ]
    return {"root": root, "world": world, "weights": weights, "common": common, "tool": tool}


def _inference_opts(env, variant):
    vocab = env["root"] / f"{variant}_vocabulary.pth"
    return [
        *env["common"],
        "MODEL.WEIGHTS",
        str(env["weights"][variant]),
        "MODEL.VILD.TRAIN_VOCABULARY",
        str(vocab),
        "MODEL.VILD.TEST_VOCABULARY",
        str(vocab),
        "DATASETS.TRAIN",
        "()",
        # The predictor resizes with the mapper (a no-op size 0 has no new_h for it).
        "INPUT.MIN_SIZE_TEST",
        "128",
        "INPUT.MAX_SIZE_TEST",
        "128",
    ]


def _run(env, *args, ok=True):
    proc = subprocess.run(
        [sys.executable, *args], env=env["world"]["env"], capture_output=True, text=True
    )
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_converted_checkpoint_and_vocabulary(env):
    state = torch.load(env["weights"]["ensemble"], weights_only=False)
    assert state["official"]["ensemble"] and len(state["vocabulary"]["names"]) == 1203
    vocab = torch.load(env["root"] / "ensemble_vocabulary.pth", weights_only=False)
    assert int(vocab["novel"].sum()) == 337  # LVIS v1 rare classes
    cfg = load_config(CONFIGS["ensemble"], _inference_opts(env, "ensemble"))
    model = build_model(cfg)
    ViLDCheckpointer(model, complete=True).load(str(env["weights"]["ensemble"]))
    assert model.vocabulary.names[:2] == ["aerosol_can", "air_conditioner"]


def test_converter_writes_nothing_on_failure(env, tmp_path, capsys):
    tf_vars = random_official_weights(official_variables(50), 0)
    del tf_vars["fpn/p6/kernel"]
    assert _convert(env["tool"], "vild", tmp_path / "bad.pth", tf_vars) == 2
    assert "1 missing (fpn/p6/kernel)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_eval_only(env, tmp_path):
    log = _run(
        env,
        "tools/train_net.py",
        "--config-file",
        CONFIGS["ensemble"],
        "--eval-only",
        *_inference_opts(env, "ensemble"),
        "MODEL.VILD.TEST_VOCABULARY",
        "",
        "INPUT.MIN_SIZE_TEST",
        "0",
        "OUTPUT_DIR",
        str(tmp_path),
    )
    assert "copypaste: Task: segm" in log


def test_demo_with_a_typed_vocabulary(env, tmp_path):
    image = sorted((env["world"]["world"]["root"] / "images" / "val").glob("*.png"))[0]
    _run(
        env,
        "tools/demo.py",
        "--config-file",
        CONFIGS["vild"],
        "--input",
        str(image),
        "--vocabulary",
        "custom",
        "--custom-vocabulary",
        "red star,blue cross",
        "--output",
        str(tmp_path),
        "--json",
        "--confidence-threshold",
        "0",
        "--opts",
        *_inference_opts(env, "vild"),
    )
    result = json.loads((tmp_path / "detections.json").read_text())
    assert result["vocabulary"] == ["red star", "blue cross"] and result["errors"] == []
    (found,) = result["images"]
    assert found["detections"] and all(d["category_id"] in (0, 1) for d in found["detections"])


def test_serving_api(env):
    cfg = load_config(CONFIGS["ensemble"], _inference_opts(env, "ensemble"))
    service = DetectionService(ViLDPredictor(cfg))
    image = sorted((env["world"]["world"]["root"] / "images" / "val").glob("*.png"))[0]
    with ServerThread(build_app(service, page=False)) as server:
        files = [("image", (image.name, image.read_bytes(), "image/png"))]
        answer = httpx.post(
            f"{server.url}/api/detect",
            files=files,
            timeout=120,
            data={"vocabulary": "red star,blue cross", "threshold": "0"},
        )
    assert answer.status_code == 200, answer.text
    names = {d["category_name"] for im in answer.json()["images"] for d in im["detections"]}
    assert names and names <= {"red star", "blue cross"}


def test_torchscript_export(env, tmp_path):
    log = _run(
        env,
        "tools/export_model.py",
        "--config-file",
        CONFIGS["vild"],
        "--vocabulary",
        "custom",
        "--custom-vocabulary",
        "cat,dog",
        "--format",
        "torchscript",
        "--output",
        str(tmp_path),
        "--opts",
        *_inference_opts(env, "vild"),
    )
    assert (tmp_path / "model.ts").is_file() and "check on the sample image" in log


def _losses(out_dir):
    records = [json.loads(x) for x in (out_dir / "metrics.json").read_text().splitlines()]
    return [r for r in records if "total_loss" in r]


def test_fine_tunes_on_shapes_with_finite_losses(env, tmp_path):
    variant = "ensemble"  # (ViLD trains in the 2-process test below)
    _run(
        env,
        "tools/train_net.py",
        "--config-file",
        CONFIGS[variant],
        *env["common"],
        "MODEL.WEIGHTS",
        str(env["weights"][variant]),
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(tmp_path),
    )
    records = _losses(tmp_path)
    assert records and all(
        math.isfinite(v)
        for r in records
        for k, v in r.items()
        if k.startswith("loss") or k == "total_loss"
    )
    assert "loss_distill" in records[-1]
    assert (tmp_path / "model_final.pth").is_file()


def test_two_processes_train(env, tmp_path):
    """ViLD (the fine-tuning test above is ViLD-ensemble's) data-parallel in 2 processes."""
    _run(
        env,
        "tools/train_net.py",
        "--num-gpus",
        "2",
        "--config-file",
        CONFIGS["vild"],
        *env["common"],
        "DATASETS.TEST",
        "()",
        "MODEL.WEIGHTS",
        str(env["weights"]["vild"]),
        "OUTPUT_DIR",
        str(tmp_path),
    )
    records = _losses(tmp_path)
    assert records and all(math.isfinite(r["total_loss"]) for r in records)
    assert "loss_distill" in records[-1] and (tmp_path / "model_final.pth").is_file()
