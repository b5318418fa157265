"""Export with the vocabulary baked in: exported boxes/scores equal the eager model's."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage import data as skdata

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.export import export_onnx, export_torchscript, outputs_to_instances

from tiny_world import make_random_model  # tests/ helper

NAMES = ["person", "flag", "helmet"]


def _bgr(image):
    return np.ascontiguousarray(image[:, :, ::-1])


@pytest.fixture(scope="module", params=["vild", "vild_ensemble"])
def predictor(request, tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp(f"toy_export_{request.param}")
    config_file, opts = make_random_model(root, tiny_clip_path, variant=request.param)
    predictor = ViLDPredictor(load_config(config_file, opts))
    predictor.set_vocabulary(NAMES)
    return predictor


def _eager(predictor, inputs):
    with torch.no_grad():
        return predictor.model([inputs])[0]["instances"]


def _assert_parity(got, ref, exact_masks=True):
    assert len(got) == len(ref) > 0
    torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.pred_classes, ref.pred_classes)
    if exact_masks:
        assert torch.equal(got.pred_masks, ref.pred_masks)
        return
    # ONNX Runtime's float arithmetic differs from torch's in the last bits (boxes ~1e-4 px),
    # which can flip a pasted pixel whose mask probability is at the 0.5 threshold: allow such
    # flips only on the reference masks' outlines, and only a few.
    ref_masks = ref.pred_masks.bool()
    differ = got.pred_masks.bool() != ref_masks
    padded = torch.nn.functional.pad(ref_masks.float()[:, None], (1, 1, 1, 1), mode="replicate")
    eroded = -torch.nn.functional.max_pool2d(-padded, 3, stride=1)[:, 0] > 0.5
    dilated = torch.nn.functional.max_pool2d(padded, 3, stride=1)[:, 0] > 0.5
    outline = dilated & ~eroded
    assert not (differ & ~outline).any(), "mask pixels differ away from the masks' outlines"
    assert differ.sum() <= 1e-5 * differ.numel(), f"{int(differ.sum())} mask pixels differ"


def test_torchscript_matches_eager_with_the_vocabulary_baked_in(predictor, tmp_path):
    traced_on = predictor.preprocess(_bgr(skdata.astronaut()))
    export_torchscript(predictor.model, traced_on["image"], str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))

    # Another image, of another size and aspect ratio, than the one traced on.
    inputs = predictor.preprocess(_bgr(skdata.coffee()))
    size = (inputs["height"], inputs["width"])
    with torch.no_grad():
        got = outputs_to_instances(loaded(inputs["image"]), size)
    ref = _eager(predictor, inputs)
    _assert_parity(got, ref)

    # The vocabulary is a constant of the export: switching the eager model does not change it.
    predictor.set_vocabulary(["rocket", "space suit"])
    switched = _eager(predictor, inputs)
    assert len(switched) != len(ref) or not torch.allclose(switched.scores, ref.scores)
    with torch.no_grad():
        _assert_parity(outputs_to_instances(loaded(inputs["image"]), size), ref)
    predictor.set_vocabulary(NAMES)


def test_onnx_matches_eager(predictor, tmp_path):
    import onnxruntime as ort  # pinned in requirements.lock

    traced_on = predictor.preprocess(_bgr(skdata.astronaut()))
    export_onnx(predictor.model, traced_on["image"], str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    inputs = predictor.preprocess(_bgr(skdata.coffee()))
    outputs = session.run(None, {"image": inputs["image"].numpy()})
    got = outputs_to_instances([torch.from_numpy(o) for o in outputs], (400, 600))
    _assert_parity(got, _eager(predictor, inputs), exact_masks=False)


def test_onnx_without_the_onnx_package_says_what_to_install(predictor, tmp_path, monkeypatch):
    # onnx is pinned, so hide it the way a missing package looks to the import system.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    image = predictor.preprocess(_bgr(skdata.astronaut()))["image"]
    with pytest.raises(RuntimeError, match="pip install onnx"):
        export_onnx(predictor.model, image, str(tmp_path / "model.onnx"))


@pytest.mark.slow
def test_export_tool(tmp_path, tiny_clip_path):
    config_file, opts = make_random_model(tmp_path / "toy", tiny_clip_path)
    proc = subprocess.run(
        [
            sys.executable,
            "tools/export_model.py",
            "--config-file",
            config_file,
            "--vocabulary",
            "custom",
            "--custom-vocabulary",
            "cat,dog",
            "--format",
            "torchscript",
            "--output",
            str(tmp_path / "out"),
            "--opts",
            *opts,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "model.ts").is_file()
    assert json.loads((tmp_path / "out" / "vocabulary.json").read_text())["names"] == ["cat", "dog"]
    assert "check on the sample image" in proc.stdout
