"""MODEL.VILD.SELF_DISTILL (issue 32): a frozen copy of the starting model embeds the student's
sampled RoIs, and ``loss_self_distill`` keeps the student's region embeddings near its own. The
loss against a float64 hand computation, zero at the start, gradients to the student only, the
teacher outside the checkpoint, and each bad input as one clear error."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from vild_d2 import ViLDCheckpointer
from vild_d2.checkpoint import IncompatibleCheckpointError
from vild_d2.config import load_config
from vild_d2.modeling.self_distill import attach_self_distillation
from tiny_model import DIM, TEST_NAMES, TRAIN_NAMES, random_vocab, tiny_cfg, tiny_inputs
from tiny_world import TINY_OPTS, make_world  # tests/ helper

ROOT = Path(__file__).resolve().parents[2]
WEIGHT = 0.7


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    files = {}
    for key, names, seed in (("train", TRAIN_NAMES, 0), ("test", TEST_NAMES, 1)):
        for dim in (DIM, 8):  # 8: a starting model of another CLIP width
            files[key, dim] = str(root / f"{key}_{dim}.pth")
            random_vocab(names, seed, dim=dim).save(files[key, dim])
    return files


def _cfg(variant, vocab_files, start="", dim=DIM, weight=WEIGHT):
    files = {"train": vocab_files["train", dim], "test": vocab_files["test", dim]}
    sd = {"MODEL.VILD.SELF_DISTILL.WEIGHT": str(weight)}
    return tiny_cfg(variant, files, **sd, **{"MODEL.VILD.SELF_DISTILL.START_WEIGHTS": start})


def _start_and_student(variant, vocab_files, tmp_path):
    """A random student, saved as the starting model, with its teacher attached."""
    cfg = _cfg(variant, vocab_files, start=str(tmp_path / "start.pth"))
    torch.manual_seed(0)
    model = build_model(cfg)
    ViLDCheckpointer(model, str(tmp_path)).save("start")
    attach_self_distillation(model, cfg)
    return model.train()


@pytest.mark.parametrize("variant", ["text", "vild", "ensemble"])
def test_zero_at_the_start(variant, vocab_files, tmp_path):
    """Student = teacher's weights, same RoIs: the loss is 0 (the shapes heads have GN, no BN or
    dropout, so training and evaluation mode compute the same)."""
    model = _start_and_student(variant, vocab_files, tmp_path)
    torch.manual_seed(1)  # the RoI sampling
    with EventStorage():
        loss = model(tiny_inputs(num_distill=(5, 5)))["loss_self_distill"]
    assert loss.item() == 0.0


def test_loss_by_hand_gradients_and_teacher_outside_the_model(vocab_files, tmp_path):
    model = _start_and_student("text", vocab_files, tmp_path)
    heads = model.roi_heads
    teacher = heads.self_distill.teacher
    projection = heads.box_predictor.cls_score.projection
    w_start, b_start = projection.weight.detach().double(), projection.bias.detach().double()
    with torch.no_grad():  # the student moves away from the start in its projection only
        projection.weight.add_(0.3 * torch.randn(projection.weight.shape))
    seen = []  # the box head's output: the sampled RoIs' features (the text variant: only them)
    hook = heads.box_head.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    with EventStorage():
        loss = model(tiny_inputs(num_distill=(5, 5)))["loss_self_distill"]
    hook.remove()
    # float64, by hand: the box features are the teacher's too (the backbone and head are equal)
    x = seen[0].double()
    student = F.normalize(x @ projection.weight.detach().double().t() + b_start, dim=1)
    start = F.normalize(x @ w_start.t() + b_start, dim=1)
    expected = WEIGHT * (student - start).abs().sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    loss.backward()
    assert projection.weight.grad.abs().sum() > 0
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training  # model.train() did not reach it
    # Not in the state dict (the checkpoint), nor in parameters() (the optimizer, DDP).
    start_keys = torch.load(tmp_path / "start.pth", weights_only=True)["model"].keys()
    assert set(model.state_dict()) == set(start_keys)
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
    model.to(torch.float64)  # moves (and casts) with the model
    assert all(p.dtype == torch.float64 for p in teacher.parameters())


def test_starting_model_of_another_width_or_variant_names_the_file(vocab_files, tmp_path):
    for name, variant, dim in (("narrow", "text", 8), ("ensemble", "ensemble", DIM)):
        torch.manual_seed(0)
        ViLDCheckpointer(build_model(_cfg(variant, vocab_files, dim=dim)), str(tmp_path)).save(name)
    student_cfg = _cfg("text", vocab_files, start=str(tmp_path / "narrow.pth"))
    student = build_model(student_cfg)
    for name, tensor in (("narrow", "cls_score.projection.weight"), ("ensemble", "image_box_head")):
        cfg = _cfg("text", vocab_files, start=str(tmp_path / f"{name}.pth"))
        with pytest.raises(IncompatibleCheckpointError) as e:
            attach_self_distillation(student, cfg)
        message = str(e.value)
        assert message.startswith("MODEL.VILD.SELF_DISTILL.START_WEIGHTS: ") and tensor in message
        assert str(tmp_path / f"{name}.pth") in message
    assert student.roi_heads.self_distill is None


def _train_net():
    spec = importlib.util.spec_from_file_location("sd_train_net", ROOT / "tools/train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weight_without_a_starting_model_is_one_line(tmp_path, capsys):
    """At the config check, naming both keys; tools/train_net.py: exit 2, one line, nothing
    written; a START_WEIGHTS that does not exist alike."""
    with pytest.raises(ValueError) as e:
        load_config("configs/Shapes/vild.yaml", ["MODEL.VILD.SELF_DISTILL.WEIGHT", "0.5"])
    assert (
        "MODEL.VILD.SELF_DISTILL.WEIGHT = 0.5 needs MODEL.VILD.SELF_DISTILL.START_WEIGHTS"
        in str(e.value)
    )
    with pytest.raises(ValueError, match=r"SELF_DISTILL.WEIGHT = -1.0: must be a number >= 0"):
        load_config("configs/Shapes/vild.yaml", ["MODEL.VILD.SELF_DISTILL.WEIGHT", "-1"])
    tool, out = _train_net(), tmp_path / "out"
    common = ["--config-file", str(ROOT / "configs/Shapes/vild.yaml"), "OUTPUT_DIR", str(out)]
    missing = tmp_path / "nope.pth"
    cases = {
        "no start": ([], "needs MODEL.VILD.SELF_DISTILL.START_WEIGHTS"),
        "missing": (
            ["MODEL.VILD.SELF_DISTILL.START_WEIGHTS", str(missing)],
            f"MODEL.VILD.SELF_DISTILL.START_WEIGHTS {missing}: no such file",
        ),
    }
    for name, (opts, expected) in cases.items():
        assert tool.cli([*common, "MODEL.VILD.SELF_DISTILL.WEIGHT", "0.5", *opts]) == 2, name
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
        assert not out.exists(), name


def test_train_net_logs_the_loss_and_saves_no_teacher(tmp_path, tiny_clip_path, capsys):
    """tools/train_net.py, the usual way: a ViLD-text start, 2 iterations with the keys set."""
    world = make_world(tmp_path / "datasets", prefix="sdtrain")
    clip = ["MODEL.VILD.CLIP_MODEL", tiny_clip_path]
    clip += ["MODEL.VILD.EMBEDDING_CACHE_DIR", str(tmp_path / "cache")]
    config = "configs/Shapes/vild_text.yaml"
    cfg = load_config(config, [*TINY_OPTS, *clip, "DATASETS.TRAIN", f"('{world['train']}',)"])
    torch.manual_seed(0)
    ViLDCheckpointer(build_model(cfg), str(tmp_path)).save("start")
    start = str(tmp_path / "start.pth")
    out = tmp_path / "out"
    command = [sys.executable, "tools/train_net.py", "--config-file", config, *TINY_OPTS, *clip]
    command += ["DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2", "MODEL.WEIGHTS", start]
    command += ["MODEL.VILD.SELF_DISTILL.WEIGHT", "1.0", "MODEL.VILD.SELF_DISTILL.START_WEIGHTS"]
    command += [start, "OUTPUT_DIR", str(out)]
    env = {"DETECTRON2_DATASETS": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert all("loss_self_distill" in m for m in metrics) and len(metrics) >= 1
    saved = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert set(saved) == set(torch.load(start, weights_only=True)["model"])
    # A starting model of another variant: an error line naming the key and the file, exit 2.
    train = ["DATASETS.TRAIN", f"('{world['train']}',)"]
    other = load_config("configs/Shapes/vild_ensemble.yaml", [*TINY_OPTS, *clip, *train])
    ViLDCheckpointer(build_model(other), str(tmp_path)).save("other")
    argv = ["--config-file", config, *TINY_OPTS, *clip, *train, "DATASETS.TEST", "()"]
    argv += ["MODEL.WEIGHTS", start, "MODEL.VILD.SELF_DISTILL.WEIGHT", "1.0"]
    argv += ["MODEL.VILD.SELF_DISTILL.START_WEIGHTS", str(tmp_path / "other.pth")]
    capsys.readouterr()
    assert _train_net().cli([*argv, "OUTPUT_DIR", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    last = [x for x in err.splitlines() if x.strip()][-1]
    assert "Traceback" not in err, err[-2000:]
    assert last.startswith("error: MODEL.VILD.SELF_DISTILL.START_WEIGHTS") and "other.pth" in last
