"""tools/demo.py: on a real photo, a folder with a corrupt file, a video, and bad arguments;
its outputs never replace inputs or each other, one bad image does not stop a batch and results
are on disk after each image, huge images are drawn small."""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances
from skimage import data as skdata

from tiny_world import make_random_model  # tests/ helper

# (Almost) no detection drawn: a picture is its input, scaled. (1 is the top of the range.)
NEVER = ["--confidence-threshold", "1.0"]


def _load_demo():
    spec = importlib.util.spec_from_file_location("vild_demo_tool", "tools/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp("toy_demo")
    return make_random_model(root, tiny_clip_path)


@pytest.fixture(scope="module")
def real_photos(tmp_path_factory):
    """Two real photos and a corrupt file, in one folder."""
    photos = tmp_path_factory.mktemp("photos")
    cv2.imwrite(str(photos / "astronaut.png"), skdata.astronaut()[:, :, ::-1])
    cv2.imwrite(str(photos / "coffee.jpg"), skdata.coffee()[:, :, ::-1])
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return photos


@pytest.fixture(scope="module")
def demo():
    return _load_demo()


def _demo(config_file, opts, *args):
    cmd = [sys.executable, "tools/demo.py", "--config-file", config_file, *args, "--opts", *opts]
    return subprocess.run(cmd, capture_output=True, text=True)


# --- the tool on real photos, a video, bad arguments ----------------------------------------------
@pytest.mark.slow
def test_demo_on_a_real_photo_with_json(toy, real_photos, tmp_path):
    config_file, opts = toy
    photos = real_photos
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
def test_demo_on_a_folder_with_a_corrupt_file(toy, real_photos, tmp_path):
    config_file, opts = toy
    photos = real_photos
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
    config_file, opts = toy
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
def test_demo_bad_inputs_exit_2_with_a_clear_error(
    toy, real_photos, tmp_path, capsys, args, message
):
    config_file, opts = toy
    photos = real_photos
    demo = _load_demo()
    inputs = ["--input", str(photos / "astronaut.png")]
    if args == ["--input-folder-empty"]:
        (tmp_path / "empty").mkdir()
        inputs, args = ["--input", str(tmp_path / "empty")], []
    status = demo.main(["--config-file", config_file, *inputs, *args, "--opts", *opts])
    assert status == 2
    assert message in capsys.readouterr().err


# --- outputs, bad inputs, limits ------------------------------------------------------------------
def _image(path, colour, size=(64, 64)):
    """A solid BGR picture (with a darker square so the detector sees something)."""
    image = np.full((*size, 3), colour, np.uint8)
    image[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] //= 2
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def _main(demo, toy, *args):
    config_file, opts = toy
    return demo.main(["--config-file", config_file, *args, "--opts", *opts])


def _main_not_interrupted(demo, toy, *args):
    """_main, where a KeyboardInterrupt escaping main fails the test (not the whole session)."""
    try:
        return _main(demo, toy, *args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main: no summary printed")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- 1. outputs never replace inputs or each other ---------------------------------------------
def test_same_folder_for_input_and_output_is_refused(demo, toy, tmp_path, capsys):
    folder = tmp_path / "photos"
    _image(folder / "x.png", (0, 0, 255))
    _image(folder / "y.jpg", (255, 0, 0))
    before = _snapshot(folder)
    assert _main(demo, toy, "--input", str(folder), "--output", str(folder), "--json") == 2
    err = capsys.readouterr().err
    assert "would replace the input" in err and str(folder / "x.png") in err
    assert "--output" in err  # says what to change
    assert _snapshot(folder) == before  # same files, same bytes, no detections.json
    # The same folder spelt another way (trailing "/.", a relative path) is the same folder.
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert _main(demo, toy, "--input", "photos/x.png", "--output", f"{folder}/.") == 2
    finally:
        os.chdir(cwd)
    assert _snapshot(folder) == before


def test_single_file_as_input_and_output_is_refused(demo, toy, tmp_path, capsys):
    photo = _image(tmp_path / "x.png", (0, 255, 0))
    before = photo.read_bytes()
    for output in (photo, tmp_path / "sub" / ".." / "x.png"):
        assert _main(demo, toy, "--input", str(photo), "--output", str(output)) == 2
        assert "would replace the input" in capsys.readouterr().err
        assert photo.read_bytes() == before
    assert not (tmp_path / "sub").exists()


def test_inputs_sharing_a_name_get_distinct_outputs(demo, toy, tmp_path, capsys):
    # a/x.png and b/x.png share a name; c/x-1.png already has the name a rename would pick.
    colours = {"a/x.png": (0, 0, 200), "b/x.png": (0, 200, 0), "c/x-1.png": (200, 0, 0)}
    inputs = [_image(tmp_path / name, colour) for name, colour in colours.items()]
    before = [p.read_bytes() for p in inputs]
    out = tmp_path / "out"
    status = _main(demo, toy, "--input", *map(str, inputs), "--output", str(out), "--json", *NEVER)
    assert status == 0
    assert "3 processed, 0 failed" in capsys.readouterr().out
    # Names that are unique keep them (c/x-1.png -> x-1.png); the second x.png takes the next
    # free name, x-2.png; nothing replaced another picture or an input.
    names = sorted(p.name for p in out.iterdir())
    assert names == ["detections.json", "x-1.png", "x-2.png", "x.png"]
    expected = {"x.png": (0, 0, 200), "x-2.png": (0, 200, 0), "x-1.png": (200, 0, 0)}
    for name, colour in expected.items():
        drawn = cv2.imread(str(out / name))
        assert tuple(int(v) for v in np.median(drawn.reshape(-1, 3), axis=0)) == colour, name
    assert [p.read_bytes() for p in inputs] == before
    records = json.loads((out / "detections.json").read_text())["images"]
    assert [(r["file_name"], os.path.basename(r["output"])) for r in records] == [
        (str(inputs[0]), "x.png"),
        (str(inputs[1]), "x-2.png"),
        (str(inputs[2]), "x-1.png"),
    ]


def test_an_output_name_linked_to_an_input_is_not_written_through(demo, toy, tmp_path):
    a = _image(tmp_path / "a" / "x.png", (0, 0, 200))
    b = _image(tmp_path / "b" / "y.png", (0, 200, 0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "y.png").symlink_to(a)  # left over in the output folder: writing y.png would hit a
    before = a.read_bytes()
    assert _main(demo, toy, "--input", str(a), str(b), "--output", str(out), *NEVER) == 0
    assert a.read_bytes() == before
    assert os.path.islink(out / "y.png")  # untouched; b's picture went to y-1.png
    assert sorted(p.name for p in out.iterdir()) == ["x.png", "y-1.png", "y.png"]


# --- 3. one bad input does not stop a batch; results on disk after each image ------------------
def test_bad_images_are_reported_and_the_others_processed(toy, tmp_path):
    folder = tmp_path / "in"
    _image(folder / "a_good.png", (0, 0, 200))
    _image(folder / "b_wide.png", (0, 200, 0), size=(3, 4000))  # valid, too elongated to resize
    (folder / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _image(folder / "d_good.png", (200, 0, 0))
    out = tmp_path / "out"
    config_file, opts = toy
    cmd = [
        sys.executable,
        "tools/demo.py",
        "--config-file",
        config_file,
        "--input",
        str(folder),
        "--output",
        str(out),
        "--json",
        "--opts",
        *opts,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1 = some inputs failed
    assert "2 processed, 2 failed" in proc.stdout
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 2
    assert "b_wide.png" in failed[0] and "too elongated" in failed[0]
    assert "c_corrupt.png" in failed[1] and "cannot read image" in failed[1]
    assert sorted(p.name for p in out.iterdir()) == ["a_good.png", "d_good.png", "detections.json"]
    result = json.loads((out / "detections.json").read_text())
    assert [os.path.basename(r["file_name"]) for r in result["images"]] == [
        "a_good.png",
        "d_good.png",
    ]
    assert [os.path.basename(e["input"]) for e in result["errors"]] == [
        "b_wide.png",
        "c_corrupt.png",
    ]


def test_results_are_on_disk_after_each_image(demo, toy, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    for k in range(3):
        _image(folder / f"{k}.png", (50 * k, 100, 200))
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text('{"images": ["an older run"]}')
    calls = []

    class KilledOnThirdImage(demo.ViLDPredictor):
        def __call__(self, image, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # as if the process were killed while on 2.png
                raise KeyboardInterrupt
            return super().__call__(image, **kwargs)

    monkeypatch.setattr(demo, "ViLDPredictor", KilledOnThirdImage)
    # --overwrite: the older run's results may go. Interrupted: summary, exit 130.
    args = ["--input", str(folder), "--output", str(out), "--json", "--overwrite"]
    assert _main_not_interrupted(demo, toy, *args) == 130
    # detections.jsonl: the vocabulary, then one line per finished image; no detections.json.
    header, *records = map(json.loads, (out / "detections.jsonl").read_text().splitlines())
    assert header["vocabulary"] == ["red square", "blue circle", "green triangle"]
    assert [os.path.basename(r["file_name"]) for r in records] == ["0.png", "1.png"]
    assert all(r["detections"] for r in records)
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "detections.jsonl"]


def test_huge_images_are_drawn_with_the_longest_side_bounded(demo):
    h, w = 300, 2500  # drawn at 2000 x 240
    image = np.zeros((h, w, 3), np.uint8)
    instances = Instances((h, w))
    instances.pred_boxes = Boxes(torch.tensor([[1000.0, 100.0, 1500.0, 200.0]]))
    instances.scores = torch.tensor([0.9])
    instances.pred_classes = torch.tensor([0])
    masks = torch.zeros((1, h, w), dtype=torch.bool)
    masks[0, 100:200, 1000:1500] = True
    instances.pred_masks = masks

    class Predictor:
        metadata = Metadata(name="hardening_draw", thing_classes=["thing"])

    drawn = demo.draw(Predictor(), image, instances)
    assert drawn.shape == (240, 2000, 3)
    changed = np.nonzero(drawn.max(axis=2) > 0)  # the mask / box / label, drawn where scaled
    assert 790 <= changed[1].min() and changed[1].max() <= 1210
    assert instances.image_size == (h, w) and instances.pred_masks.shape == (1, h, w)  # untouched
    # Tiny images are still drawn larger, and the bound holds for elongated ones too.
    assert demo.draw(Predictor(), np.zeros((64, 64, 3), np.uint8), instances[:0]).shape[:2] == (
        256,
        256,
    )
    strip = demo.draw(Predictor(), np.zeros((8, 1500, 3), np.uint8), instances[:0])
    assert max(strip.shape) <= 2000


# --- issue 24: a run never replaces or deletes a file it did not create ------------------------
def _tree(root):
    """Every file under ``root``: relative path -> (bytes, inode), links as their target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            else:
                with open(path, "rb") as f:
                    out[rel] = (f.read(), os.stat(path).st_ino)
    return out


def _photos(tmp_path):
    """photos/{a,b}.png and photos/sub/{a,b}.png: the same names, other pictures; a hard link
    to photos/a.png elsewhere."""
    photos = tmp_path / "photos"
    _image(photos / "a.png", (0, 0, 200))
    _image(photos / "b.png", (0, 200, 0))
    _image(photos / "sub" / "a.png", (200, 0, 0))
    _image(photos / "sub" / "b.png", (200, 200, 0))
    os.link(photos / "a.png", tmp_path / "keep.png")
    return photos


@pytest.mark.parametrize(
    "inputs, output",
    [
        (["photos/sub"], "photos"),  # output above the input: photos/a.png would be replaced
        (["photos"], "photos/sub"),  # output below the input: photos/sub/a.png would be
        (["photos/sub/a.png"], "photos/b.png"),  # one input, an existing file as the output
    ],
)
def test_existing_files_are_never_replaced_without_overwrite(
    demo, toy, tmp_path, capsys, inputs, output
):
    _photos(tmp_path)
    before = _tree(tmp_path)
    args = ["--input", *(str(tmp_path / i) for i in inputs), "--output", str(tmp_path / output)]
    assert _main(demo, toy, *args, "--json", *NEVER) == 2
    err = capsys.readouterr().err
    assert "exist already" in err and "--overwrite" in err, err
    assert _tree(tmp_path) == before  # not one byte, not one inode changed; nothing added


def test_overwrite_replaces_them_atomically_never_an_input(demo, toy, tmp_path, capsys):
    photos = _photos(tmp_path)
    keep = (tmp_path / "keep.png").read_bytes()
    inputs = {p: p.read_bytes() for p in (photos / "sub").iterdir()}
    args = ["--input", str(photos / "sub"), "--output", str(photos), "--json", "--overwrite"]
    assert _main(demo, toy, *args, *NEVER) == 0
    # photos/a.png is now sub/a.png's picture; the hard link to the old one kept its content
    # (written to a new file, renamed over the name: the old inode untouched).
    assert (tmp_path / "keep.png").read_bytes() == keep
    drawn = cv2.imread(str(photos / "a.png"))
    assert tuple(int(v) for v in np.median(drawn.reshape(-1, 3), axis=0)) == (200, 0, 0)
    assert {p: p.read_bytes() for p in inputs} == inputs
    assert (photos / "detections.json").is_file() and not (photos / "detections.jsonl").exists()
    # An input is never replaced, --overwrite or not.
    assert _main(demo, toy, "--input", str(photos / "a.png"), "--output", str(photos)) == 2
    assert "would replace the input" in capsys.readouterr().err


def test_old_results_are_not_deleted(demo, toy, tmp_path, capsys):
    photo = _image(tmp_path / "in" / "x.png", (0, 0, 200))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("detections.json", "detections.jsonl"):
        (out / name).write_text("the user's own results")
        before = _tree(tmp_path)
        assert _main(demo, toy, "--input", str(photo), "--output", str(out), "--json") == 2
        assert name in capsys.readouterr().err
        assert _tree(tmp_path) == before
        (out / name).unlink()


@pytest.mark.parametrize(
    "output, n_inputs, picture, json_name",
    [
        ("out", 2, "out/x0.png", "out/detections.json"),
        ("out.v2", 2, "out.v2/x0.png", "out.v2/detections.json"),  # a folder with a suffix
        ("res.png", 2, "res.png/x0.png", "res.png/detections.json"),  # a folder named *.png
        ("pic.png", 1, "pic.png", "pic.json"),  # one input, a file name: JSON named after it
        ("a/b/pic.JPEG", 1, "a/b/pic.JPEG", "a/b/pic.json"),
        ("made.png/", 1, "made.png/x0.png", "made.png/detections.json"),  # existing folder
    ],
)
def test_every_file_lies_in_the_output_named(
    demo, toy, tmp_path, output, n_inputs, picture, json_name
):
    inputs = [_image(tmp_path / "in" / f"x{k}.png", (0, 50 * k, 200)) for k in range(n_inputs)]
    work = tmp_path / "work"
    work.mkdir()
    (work / "detections.json").write_text("the user's, beside the output")  # never touched
    if output.endswith("/"):
        (work / output).mkdir()
    before = _tree(tmp_path)
    args = ["--input", *map(str, inputs), "--output", str(work / output), "--json", *NEVER]
    assert _main(demo, toy, *args) == 0
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    pictures = [picture.replace("x0", f"x{k}") for k in range(n_inputs)]
    assert sorted(set(after) - set(before)) == sorted(f"work/{p}" for p in [*pictures, json_name])
    result = json.loads((work / json_name).read_text())
    assert [r["output"] for r in result["images"]][0] == str(work / picture)


# --- issue 24: bounded memory: a pixel limit read from the header -------------------------------
def _png_claiming(path, width, height):
    """A small PNG whose header claims width x height (its pixel data does not follow)."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))
    return path


def test_images_over_the_pixel_limit_are_refused_from_the_header(demo, toy, tmp_path, capsys):
    folder = tmp_path / "in"
    _image(folder / "a_good.png", (0, 0, 200))
    _png_claiming(folder / "b_huge.png", 60000, 60000)  # 10.8 GB once decoded
    _png_claiming(folder / "c_big.png", 20000, 20000)
    _image(folder / "d_good.png", (200, 0, 0))
    out = tmp_path / "out"
    assert _main(demo, toy, "--input", str(folder), "--output", str(out), "--json") == 1
    captured = capsys.readouterr()
    assert "2 processed, 2 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("FAILED")]
    assert (
        "b_huge.png: 60000x60000 px (3600.0 megapixels), above --max-megapixels 100" in (failed[0])
    )
    assert "c_big.png: 20000x20000 px (400.0 megapixels)" in failed[1]
    errors = json.loads((out / "detections.json").read_text())["errors"]
    assert all("OpenCV" not in e["error"] and "ssertion" not in e["error"] for e in errors)
    # The limit is a flag: 0.001 megapixels refuses the 64 x 64 pictures too.
    args = ["--input", str(folder / "a_good.png"), "--max-megapixels", "0.001"]
    assert _main(demo, toy, *args) == 1
    assert "64x64 px (0.0 megapixels), above --max-megapixels 0.001" in capsys.readouterr().err
    # Allowed by the flag, OpenCV's own limit refuses it: said in words, not its assertion.
    args = ["--input", str(folder / "b_huge.png"), "--max-megapixels", "5000"]
    assert _main(demo, toy, *args) == 1
    err = capsys.readouterr().err
    assert "b_huge.png: cannot decode the image: 60000x60000 px is over OpenCV's own limit" in err
    assert "ssertion" not in err


# --- issue 24: each bad file its own reason ----------------------------------------------------
def test_each_bad_file_gets_an_accurate_reason(demo, toy, tmp_path, capsys):
    folder = tmp_path / "in"
    _image(folder / "a_good.png", (0, 0, 200))
    (folder / "b_folder.png").mkdir()
    (folder / "c_empty.png").write_bytes(b"")
    os.symlink("d_loop.png", folder / "d_loop.png")
    os.symlink("nowhere.png", folder / "e_broken.png")
    (folder / "f_text.png").write_text("not a picture")
    args = [
        "--input",
        str(folder),
        str(tmp_path / "g_missing.png"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert _main(demo, toy, *args) == 1
    err = capsys.readouterr().err
    reasons = dict(
        line[len("FAILED ") :].split(": ", 1)
        for line in err.splitlines()
        if line.startswith("FAILED")
    )
    reasons = {os.path.basename(k): v for k, v in reasons.items()}
    assert reasons["b_folder.png"] == "a folder, not an image file"
    assert reasons["c_empty.png"] == "empty file (0 bytes)"
    assert reasons["d_loop.png"].startswith("symbolic link loop")
    assert reasons["e_broken.png"].startswith("broken symbolic link (to nowhere.png")
    assert reasons["f_text.png"].startswith("cannot read image: not a picture file")
    assert reasons["g_missing.png"] == "file not found"


def test_a_full_disk_is_named_and_the_summary_printed(demo, toy, tmp_path, capsys, monkeypatch):
    import errno

    import cli.demo_files as demo_files  # tools/cli

    def full(path, parts, exclusive=False, hint=""):
        raise OSError(errno.ENOSPC, f"cannot write {path}: No space left on device")

    monkeypatch.setattr(demo_files, "atomic_write", full)
    monkeypatch.setattr(demo, "atomic_write", full)
    folder = tmp_path / "in"
    for k in range(2):
        _image(folder / f"{k}.png", (0, 0, 200))
    out = tmp_path / "out"
    assert _main(demo, toy, "--input", str(folder), "--output", str(out), "--json") == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 3, captured.err  # two pictures, then the JSON
    assert all("No space left on device" in line for line in failed)
    assert failed[2].startswith(f"FAILED {out / 'detections.json'}: ")
    assert "0 processed, 3 failed" in captured.out  # returned: no exception escaped
    # What was done is in the .jsonl (its lines were written before the disk filled).
    lines = (out / "detections.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "No space left on device" in lines[1]


# --- issue 24: bad config or weights: one line, exit 2 ------------------------------------------
def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    # (In-process, so no "Traceback" check: detectron2's loggers, set up by an earlier test
    # on its own captured stream, report "--- Logging error ---" with one. main() returned.)
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def test_bad_weights_or_config_are_one_line_exit_2(demo, toy, tmp_path, capsys, tiny_clip_path):
    config_file, opts = toy
    _, text_opts = make_random_model(tmp_path / "text", tiny_clip_path, variant="vild_text")
    text_weights = text_opts[text_opts.index("MODEL.WEIGHTS") + 1]
    weights = opts[opts.index("MODEL.WEIGHTS") + 1]
    photo = str(_image(tmp_path / "x.png", (0, 0, 200)))
    truncated = tmp_path / "truncated.pth"
    data = open(weights, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text('_BASE_: "vild.yaml"\nMODEL:\n  WEIGHTS: [unclosed\n  DEVICE: cpu\n')
    cases = [
        (config_file, [*opts, "MODEL.WEIGHTS", str(truncated)], "truncated.pth"),
        (str(bad_yaml), opts, f"{bad_yaml}: not valid YAML at line"),
        # ViLD-text weights for the ensemble: its image head is not in them
        (
            "configs/Shapes/vild_ensemble.yaml",
            [*opts, "MODEL.WEIGHTS", text_weights],
            "roi_heads.image_box_head.fc1.weight: not in the checkpoint",
        ),
    ]
    for config, options, message in cases:
        args = ["--config-file", config, "--input", photo, "--opts", *options]
        assert demo.main(args) == 2
        assert message in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_memory_does_not_grow_with_image_size_times_detections(toy, tmp_path):
    """4000 x 4000 px: the demo's peak with 50 detections against its peak with 1, so what the
    machine adds to both (libraries, allocator) cancels: an absolute bound passed here (1.50 GB)
    and failed on CI (2.00 GB). Masks kept 28 x 28 and pasted one at a time: 1.46 -> 1.53 GB
    here; every mask pasted full-size (before, checked by undoing it in tools/demo.py): 1.49 ->
    2.57 GB (README, "Bad input")."""
    from skimage import data as skdata

    image = tmp_path / "big.png"
    cv2.imwrite(str(image), cv2.resize(skdata.astronaut()[:, :, ::-1], (4000, 4000)))
    config_file, opts = toy

    def peak_gb(detections):
        out = tmp_path / f"out{detections}"
        cmd = [sys.executable, "tools/demo.py", "--config-file", config_file]
        cmd += ["--input", str(image), "--confidence-threshold", "0", "--output", str(out)]
        cmd += ["--json", "--opts", *opts, "TEST.DETECTIONS_PER_IMAGE", str(detections)]
        cmd += ["MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.0"]
        log = tmp_path / f"log{detections}.txt"
        with open(log, "w") as f:  # a file, not a pipe: nothing blocks while we wait
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the session's
        assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
        (record,) = json.loads((out / "detections.json").read_text())["images"]
        assert len(record["detections"]) == detections
        return usage.ru_maxrss * 1024 / 1e9  # Linux: kB

    one, fifty = peak_gb(1), peak_gb(50)
    assert fifty - one < 0.3, (one, fifty)


@pytest.mark.slow
def test_a_file_size_limit_mid_batch_is_named_with_the_summary(toy, tmp_path):
    """`ulimit -f` (what a full disk or quota looks like to a writer): every picture that does
    not fit is FAILED with the reason, the JSON too, the summary printed, exit 1."""
    import resource

    folder = tmp_path / "in"
    for k in range(4):
        _image(folder / f"{k}.png", (0, 0, 200), size=(400, 400))
    out = tmp_path / "out"
    config_file, opts = toy
    cmd = [sys.executable, "tools/demo.py", "--config-file", config_file, "--input", str(folder)]
    cmd += ["--output", str(out), "--json", "--opts", *opts]

    def limit():  # 1 KB: the .jsonl's first lines fit; no picture, nor the whole JSON
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 5 and all("File too large" in line for line in failed), failed
    assert failed[4].startswith(f"FAILED {out / 'detections.json'}: ")
    assert "0 processed, 5 failed" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["detections.jsonl"]  # no half picture


def test_an_existing_video_output_is_not_replaced(demo, toy, tmp_path, capsys):
    video = tmp_path / "in.mp4"
    video.write_bytes(b"not read: refused before")
    out = tmp_path / "out"
    out.mkdir()
    (out / "in.mp4").write_bytes(b"the user's own video")
    before = _tree(tmp_path)
    assert _main(demo, toy, "--video-input", str(video), "--output", str(out)) == 2
    assert "exist already" in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_a_video_over_the_pixel_limit_is_refused(demo, toy, tmp_path, capsys):
    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 64))
    for _ in range(2):
        writer.write(np.zeros((64, 96, 3), np.uint8))
    writer.release()
    args = ["--video-input", str(video), "--output", str(tmp_path / "out"), "--json"]
    assert _main(demo, toy, *args, "--max-megapixels", "0.001") == 1
    assert "frames of 96x64 px (0.0 megapixels), above --max-megapixels 0.001" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.json"]


# --- issue 27: Ctrl-C, two runs into one folder, ranges -----------------------------------------
def test_ctrl_c_leaves_pictures_and_records_consistent(demo, toy, tmp_path, monkeypatch, capsys):
    """A real SIGINT arriving just as the second picture is written: that picture's record is
    written too, then the run stops with its summary (before: 2 pictures, 1 record, and a
    KeyboardInterrupt out of main)."""
    import signal

    folder = tmp_path / "in"
    for k in range(4):
        _image(folder / f"{k}.png", (50 * k, 100, 200))
    out = tmp_path / "out"
    written = []
    real_write = demo.write_picture

    def write_then_ctrl_c(path, bgr, overwrite):
        real_write(path, bgr, overwrite)
        written.append(path.name)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as the user's Ctrl-C, at the worst moment

    monkeypatch.setattr(demo, "write_picture", write_then_ctrl_c)
    args = ["--input", str(folder), "--output", str(out), "--json", *NEVER]
    # As in a terminal: a run started in the background (CI) inherits SIGINT ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _main_not_interrupted(demo, toy, *args) == 130
        handler_after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    summary = capsys.readouterr().out
    assert "2 processed, 0 failed; interrupted (Ctrl-C): 2 input(s) not processed" in summary
    header, *records = map(json.loads, (out / "detections.jsonl").read_text().splitlines())
    assert [os.path.basename(r["output"]) for r in records] == ["0.png", "1.png"]
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "detections.jsonl"]
    assert handler_after is signal.default_int_handler  # restored


def test_an_ignored_ctrl_c_stays_ignored():
    """A run started with SIGINT ignored (nohup, `cmd &`) is not made interruptible by the
    deferred-write window: the signal is still ignored inside it, and nothing is raised."""
    import signal

    from cli.demo_files import interrupts_deferred

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            inside = signal.getsignal(signal.SIGINT)
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert inside is signal.SIG_IGN and after is signal.SIG_IGN


def test_a_second_json_run_into_the_same_folder_is_one_line(
    demo, toy, tmp_path, monkeypatch, capsys
):
    """Two --json runs started together into one folder: both pass the start-up check; the
    one that comes second to create the .jsonl stops with one line, exit 2, writing nothing."""
    photo = _image(tmp_path / "x.png", (0, 0, 200))
    out = tmp_path / "out"

    class OtherRunStartsMeanwhile(demo.ViLDPredictor):
        def __init__(self, cfg):
            super().__init__(cfg)  # while this run loads its model, the other one starts
            out.mkdir(exist_ok=True)
            (out / "detections.jsonl").write_text('{"vocabulary": ["the other run"]}\n')

    monkeypatch.setattr(demo, "ViLDPredictor", OtherRunStartsMeanwhile)
    assert _main(demo, toy, "--input", str(photo), "--output", str(out), "--json") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "detections.jsonl appeared since this run started: another run is writing" in line
    assert sorted(p.name for p in out.iterdir()) == ["detections.jsonl"]  # nothing of ours
    assert "the other run" in (out / "detections.jsonl").read_text()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--confidence-threshold", "nan", "--confidence-threshold nan: must be a number in [0, 1]"),
        (
            "--confidence-threshold",
            "-0.1",
            "--confidence-threshold -0.1: must be a number in [0, 1]",
        ),
        ("--confidence-threshold", "1.5", "--confidence-threshold 1.5: must be a number in [0, 1]"),
        ("--confidence-threshold", "inf", "--confidence-threshold inf: must be a number in [0, 1]"),
        ("--max-megapixels", "nan", "--max-megapixels nan: must be a finite number > 0"),
        ("--max-megapixels", "0", "--max-megapixels 0: must be a finite number > 0"),
        ("--max-megapixels", "-5", "--max-megapixels -5: must be a finite number > 0"),
        ("--max-megapixels", "inf", "--max-megapixels inf: must be a finite number > 0"),
    ],
)
def test_ranges_of_the_demos_numbers(demo, toy, tmp_path, capsys, flag, value, message):
    photo = _image(tmp_path / "x.png", (0, 0, 200))
    out = tmp_path / "out"
    assert _main(demo, toy, "--input", str(photo), "--output", str(out), flag, value) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {message}"
    assert not out.exists()


def test_16_bit_images_are_read_as_value_div_257(tmp_path):
    """The tools read a 16-bit file as the deployment contract says (value // 257, worked out
    here in Python integers), not as OpenCV's 8-bit conversion (v / 256 rounded: 385 -> 2,
    40000 -> 156, where // 257 gives 1 and 155); an 8-bit file as cv2.imread reads it."""
    from cli.demo_files import read_image  # tools/cli

    values = [0, 256, 257, 385, 1000, 40000, 65534, 65535]
    grey = np.array([values] * 8, dtype=np.uint16)  # 8 x 8
    colour = np.stack([grey, grey[:, ::-1], np.full_like(grey, 40000)], axis=2)
    for name, image in (("grey16.png", grey), ("colour16.png", colour)):
        path = str(tmp_path / name)
        assert cv2.imwrite(path, image)
        got = read_image(path, max_megapixels=1)
        want = image[:, :, None].repeat(3, axis=2) if image.ndim == 2 else image
        expected = np.array([[[int(v) // 257 for v in px] for px in row] for row in want])
        assert got.dtype == np.uint8 and got.shape == (8, 8, 3)
        assert np.array_equal(got, expected), name
    eight = (np.arange(8 * 8 * 3, dtype=np.uint8) * 5).reshape(8, 8, 3)
    path = str(tmp_path / "eight.png")
    assert cv2.imwrite(path, eight)
    assert np.array_equal(read_image(path, max_megapixels=1), cv2.imread(path, cv2.IMREAD_COLOR))
