"""tools/interpolate_checkpoints.py (WiSE-FT, issue 32): theta = (1 - a) theta_start +
a theta_finetuned on hand-made state dicts with hand-worked values; a real ViLD checkpoint pair
whose result loads completely; and each bad input refused in one line with nothing written.
The tool runs in this process (its ``main``)."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from tiny_world import make_random_model  # tests/ helper
from vild_d2 import ViLDCheckpointer
from vild_d2.config import load_config
from vild_d2.text.vocabulary import FORMAT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "interpolate_checkpoints", ROOT / "tools/interpolate_checkpoints.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vocabulary(names, rows, clip="sha256:0123456789abcdef"):
    return {
        "format": FORMAT,
        "names": list(names),
        "embeddings": torch.tensor(rows, dtype=torch.float32),
        "novel": torch.zeros(len(names), dtype=torch.bool),
        "clip_model": clip,
    }


CAT, DOG, GEAR = [0.6, 0.8], [0.8, -0.6], [1.0, 0.0]


def _start():
    return {
        "model": {
            "w": torch.tensor([[0.0, 4.0], [8.0, -4.0]]),
            "b": torch.tensor([1.0]),
            "bn.num_batches_tracked": torch.tensor(3),
        },
        "vocabulary": _vocabulary(["cat", "dog"], [CAT, DOG]),
        "iteration": 1199,
    }


def _finetuned():
    return {
        "model": {
            "w": torch.tensor([[4.0, 0.0], [0.0, 4.0]]),
            "b": torch.tensor([3.0]),
            "bn.num_batches_tracked": torch.tensor(10),
        },
        # the fine-tune's own classes: another list, the same CLIP ("cat" embedded alike)
        "vocabulary": _vocabulary(["cat", "gear"], [CAT, GEAR]),
        "iteration": 149,
        "trainer": {"iteration": 149, "_trainer": {"optimizer": {"state": {}}}},
    }


def _run(tool, capsys, start, finetuned, alpha, output, *extra):
    code = tool.main(
        [
            "--start",
            str(start),
            "--finetuned",
            str(finetuned),
            "--alpha",
            str(alpha),
            "--output",
            str(output),
            *extra,
        ]
    )
    return code, capsys.readouterr()


def test_hand_worked_interpolation(tool, tmp_path, capsys):
    torch.save(_start(), tmp_path / "a.pth")
    torch.save(_finetuned(), tmp_path / "b.pth")
    code, io = _run(tool, capsys, tmp_path / "a.pth", tmp_path / "b.pth", 0.25, tmp_path / "c.pth")
    assert code == 0, io.err
    out = torch.load(tmp_path / "c.pth", weights_only=True)
    # 0.75 * start + 0.25 * fine-tuned, by hand:
    #   w: [[0.75*0 + 0.25*4, 0.75*4 + 0.25*0], [0.75*8 + 0.25*0, 0.75*-4 + 0.25*4]]
    assert torch.equal(out["model"]["w"], torch.tensor([[1.0, 3.0], [6.0, -2.0]]))
    assert torch.equal(out["model"]["b"], torch.tensor([1.5]))  # 0.75*1 + 0.25*3
    # an integer counter is not averaged: the fine-tuned model's, and so is its iteration
    assert out["model"]["bn.num_batches_tracked"].item() == 10
    assert out["iteration"] == 149
    assert out["vocabulary"]["names"] == ["cat", "gear"]  # the fine-tuned test vocabulary
    assert "trainer" not in out  # the optimizer state of other weights: left out
    assert out["interpolation"]["alpha"] == 0.25
    assert "2 float tensors interpolated, 1 integer/boolean" in io.out
    # the ends: alpha 0 is the start, alpha 1 the fine-tuned model, exactly
    for alpha, expected in ((0, _start()), (1, _finetuned())):
        path = tmp_path / f"end{alpha}.pth"
        code, io = _run(tool, capsys, tmp_path / "a.pth", tmp_path / "b.pth", alpha, path)
        assert code == 0, io.err
        got = torch.load(path, weights_only=True)["model"]
        for name in ("w", "b"):
            assert torch.equal(got[name], expected["model"][name]), (alpha, name)


def test_real_vild_checkpoints_interpolate_and_load(tool, tmp_path, capsys, tiny_clip_path):
    """Two ViLD checkpoints as training writes them: the result loads into the model with
    every parameter (as evaluation requires), and each parameter is the mean at alpha 0.5."""
    config, opts_a = make_random_model(tmp_path / "a", tiny_clip_path, seed=0)
    _, opts_b = make_random_model(tmp_path / "b", tiny_clip_path, seed=1)
    a, b = (opts[opts.index("MODEL.WEIGHTS") + 1] for opts in (opts_a, opts_b))
    code, io = _run(tool, capsys, a, b, 0.5, tmp_path / "mid.pth")
    assert code == 0, io.err
    model = build_model(load_config(config, opts_a))
    ViLDCheckpointer(model, complete=True).load(str(tmp_path / "mid.pth"))
    start = torch.load(a, weights_only=True)["model"]
    finetuned = torch.load(b, weights_only=True)["model"]
    name = "roi_heads.box_predictor.cls_score.projection.weight"
    expected = (start[name].double() + finetuned[name].double()) / 2
    assert torch.allclose(model.state_dict()[name].double(), expected, atol=1e-7)
    # another variant (ViLD-ensemble: an image-branch head) is another architecture
    _, opts_e = make_random_model(tmp_path / "e", tiny_clip_path, variant="vild_ensemble")
    e = opts_e[opts_e.index("MODEL.WEIGHTS") + 1]
    code, io = _run(tool, capsys, a, e, 0.5, tmp_path / "mixed.pth")
    assert code == 2 and "different architectures" in io.err
    assert "roi_heads.image_box_head." in io.err and "only in --finetuned" in io.err
    assert not (tmp_path / "mixed.pth").exists()


def _write(path, checkpoint):
    torch.save(checkpoint, path)
    return path


def test_bad_inputs_one_line_nothing_written(tool, tmp_path, capsys):
    a = _write(tmp_path / "a.pth", _start())
    b = _write(tmp_path / "b.pth", _finetuned())
    wider = _finetuned()
    wider["model"]["w"] = torch.zeros(2, 3)
    renamed = _finetuned()
    renamed["model"]["w2"] = renamed["model"].pop("w")
    other_clip = _finetuned()  # "cat" embedded by another CLIP
    other_clip["vocabulary"] = _vocabulary(["cat", "gear"], [DOG, GEAR], clip="ViT-B/32")
    disjoint = _finetuned()  # no shared name, another CLIP
    disjoint["vocabulary"] = _vocabulary(["gear"], [GEAR], clip="ViT-B/32")
    width = _finetuned()
    width["vocabulary"] = _vocabulary(["gear"], [[1.0, 0.0, 0.0]])
    nan = _finetuned()
    nan["model"]["b"] = torch.tensor([float("nan")])
    (tmp_path / "junk.pth").write_bytes(b.read_bytes()[:300])  # a truncated copy
    (tmp_path / "exists.pth").write_bytes(b"keep me")
    cases = {
        "alpha<0": (a, b, -0.1, "--alpha -0.1: must be a number in [0, 1]"),
        "alpha>1": (a, b, 1.5, "--alpha 1.5: must be a number in [0, 1]"),
        "alpha nan": (a, b, "nan", "--alpha nan: must be a number in [0, 1]"),
        "missing": (tmp_path / "none.pth", b, 0.5, f"--start {tmp_path / 'none.pth'}: no such"),
        "corrupt": (a, tmp_path / "junk.pth", 0.5, f"--finetuned {tmp_path / 'junk.pth'} is not a"),
        "shape": (a, _write(tmp_path / "s.pth", wider), 0.5, "w: (2, 2) in --start, (2, 3) in"),
        "keys": (a, _write(tmp_path / "k.pth", renamed), 0.5, "w: only in --start; w2: only in"),
        "clip": (a, _write(tmp_path / "v.pth", other_clip), 0.5, "share differently (1 of 1: cat)"),
        "clip names": (
            a,
            _write(tmp_path / "d.pth", disjoint),
            0.5,
            "(CLIP ViT-B/32): their class embeddings come from different CLIP models",
        ),
        "width": (a, _write(tmp_path / "x.pth", width), 0.5, "store 2-d and 3-d class embeddings"),
        "nan": (a, _write(tmp_path / "n.pth", nan), 0.5, "holds NaN or infinite values"),
    }
    for name, (start, finetuned, alpha, expected) in cases.items():
        output = tmp_path / "out" / "c.pth"
        code, io = _run(tool, capsys, start, finetuned, alpha, output)
        lines = io.err.splitlines()
        assert code == 2, (name, io.err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, io.err)
        assert expected in lines[0], (name, lines[0])
        assert not output.parent.exists(), name  # nothing written, not even the folder
    # an existing --output is kept without --overwrite
    code, io = _run(tool, capsys, a, b, 0.5, tmp_path / "exists.pth")
    assert code == 2 and "already exists" in io.err
    assert (tmp_path / "exists.pth").read_bytes() == b"keep me"
