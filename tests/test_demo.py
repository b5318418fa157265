"""tools/demo.py on a real photo, a folder with a corrupt file, a video, and bad arguments."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import json
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from skimage import data as skdata

from tiny_world import make_random_model  # tests/ helper


def _load_demo():
    spec = importlib.util.spec_from_file_location("vild_demo_tool", "tools/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp("toy_demo")
    config_file, opts = make_random_model(root, tiny_clip_path)
    photos = root / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "astronaut.png"), skdata.astronaut()[:, :, ::-1])
    cv2.imwrite(str(photos / "coffee.jpg"), skdata.coffee()[:, :, ::-1])
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root, config_file, opts, photos


def _demo(config_file, opts, *args):
    cmd = [sys.executable, "tools/demo.py", "--config-file", config_file, *args, "--opts", *opts]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.slow
def test_demo_on_a_real_photo_with_json(toy, tmp_path):
    root, config_file, opts, photos = toy
    proc = _demo(
        config_file,
        opts,
        "--input",
        str(photos / "astronaut.png"),
        "--vocabulary",
        "custom",
        "--custom-vocabulary",
        "person, flag,helmet",
        "--confidence-threshold",
        "0.2",
        "--output",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = cv2.imread(str(tmp_path / "astronaut.png"))
    assert drawn is not None and drawn.shape == (512, 512, 3)  # the photo's size (scale 1)
    result = json.loads((tmp_path / "detections.json").read_text())
    assert result["vocabulary"] == ["person", "flag", "helmet"]
    assert result["bbox_mode"] == "XYWH_ABS" and result["errors"] == []
    (image,) = result["images"]
    assert (image["height"], image["width"]) == (512, 512)
    assert image["detections"], "the random toy model scores its boxes high: expected some"
    for det in image["detections"]:
        assert det["score"] >= 0.2
        assert det["category_name"] == result["vocabulary"][det["category_id"]]
        x, y, w, h = det["bbox"]
        assert 0 <= x <= x + w <= 512 and 0 <= y <= y + h <= 512
        rle = dict(det["segmentation"], counts=det["segmentation"]["counts"].encode())
        mask = mask_util.decode(rle)
        assert mask.shape == (512, 512)
        ys, xs = np.nonzero(mask)
        if len(xs):  # a pasted mask lies inside its box
            assert xs.min() >= x - 1 and xs.max() <= x + w + 1
            assert ys.min() >= y - 1 and ys.max() <= y + h + 1


@pytest.mark.slow
def test_demo_on_a_folder_with_a_corrupt_file(toy, tmp_path):
    root, config_file, opts, photos = toy
    proc = _demo(
        config_file,
        opts,
        "--input",
        str(photos),
        "--vocabulary",
        "voc",
        "--confidence-threshold",
        "0.0",
        "--output",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1 = some inputs failed
    assert "FAILED" in proc.stderr and "broken.jpg" in proc.stderr
    assert "2 processed, 1 failed" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "astronaut.png",
        "coffee.jpg",
        "detections.json",
    ]
    assert cv2.imread(str(tmp_path / "coffee.jpg")).shape == skdata.coffee().shape
    result = json.loads((tmp_path / "detections.json").read_text())
    assert len(result["vocabulary"]) == 20 and "airplane" in result["vocabulary"]
    assert [e["input"].endswith("broken.jpg") for e in result["errors"]] == [True]


@pytest.mark.slow
def test_demo_on_a_video(toy, tmp_path):
    root, config_file, opts, photos = toy
    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 64))
    frame = cv2.resize(skdata.coffee()[:, :, ::-1], (96, 64))
    for k in range(3):
        writer.write(np.ascontiguousarray(np.roll(frame, 8 * k, axis=1)))
    writer.release()
    demo = _load_demo()
    status = demo.main(
        [
            "--config-file",
            config_file,
            "--video-input",
            str(video),
            "--output",
            str(tmp_path / "out"),
            "--json",
            "--confidence-threshold",
            "0.0",
            "--opts",
            *opts,
        ]
    )
    assert status == 0
    result = cv2.VideoCapture(str(tmp_path / "out" / "in.mp4"))
    frames = 0
    while result.read()[0]:
        frames += 1
    assert frames == 3
    records = json.loads((tmp_path / "out" / "detections.json").read_text())["images"]
    assert [r["frame"] for r in records] == [0, 1, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vocabulary", "lvis_v2"], "built-in vocabulary"),
        (["--vocabulary", "custom", "--custom-vocabulary", " ,"], "empty vocabulary"),
        (["--input-folder-empty"], "no images"),
    ],
)
def test_demo_bad_inputs_exit_2_with_a_clear_error(toy, tmp_path, capsys, args, message):
    root, config_file, opts, photos = toy
    demo = _load_demo()
    inputs = ["--input", str(photos / "astronaut.png")]
    if args == ["--input-folder-empty"]:
        (tmp_path / "empty").mkdir()
        inputs, args = ["--input", str(tmp_path / "empty")], []
    status = demo.main(["--config-file", config_file, *inputs, *args, "--opts", *opts])
    assert status == 2
    assert message in capsys.readouterr().err
