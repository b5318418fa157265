"""What a user of the official weights gets (README "Official ViLD weights", docs/OFFICIAL.md):
the README's commands, read out of README.md, run as written and offline on a real TF
checkpoint of the parity test's seeded weights (written by tests/official/tf_bundle.py); the
official evaluation's mask pasting and box handling; the converter's one-line errors and novel
classes.
"""

import vild_d2  # noqa: F401  (first: compat bridges)

import importlib.util
import json
import logging
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from vild_d2.config import load_config
from reference.random_weights import random_official_weights
from vild_d2.official import OfficialViLDRCNN, official_variables
from vild_d2.official.checkpoint.convert import variable_problems
from vild_d2.official.checkpoint.convert_checkpoint import read_novel_classes
from vild_d2.official.masks import OfficialROIMasks, official_postprocess, paste_masks_official
from vild_d2.text import builtin_vocabulary
from tf_bundle import write_tf_checkpoint  # tests/ helper

REPO = Path(__file__).resolve().parents[2]
LVIS = builtin_vocabulary("lvis")
# Appended to the README demo's --opts (config overrides only): a 256 canvas, 100 proposals
# and 8 detections instead of 1024, 1000 and 300 (47 s -> a few on this CPU). Nothing else
# differs.
SMALL = [
    "MODEL.VILD.OFFICIAL.IMAGE_SIZE",
    "256",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "100",
    "TEST.DETECTIONS_PER_IMAGE",
    "8",
]


def readme_commands():
    """The ``python tools/...`` commands of the README's "Official ViLD weights" bash block,
    as argv lists (continuation lines joined, comments dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Official ViLD weights") :]
    block = section[
        section.index("```bash") + 7 : section.index("```", section.index("```bash") + 7)
    ]
    lines = [x.split(" #")[0] for x in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(x)[1:] for x in lines if x.strip().startswith("python tools/")]


def _main(name, argv) -> int:
    """``tools/<name>.py``'s main(argv) in this process (its logging setup undone after)."""
    spec = importlib.util.spec_from_file_location(
        f"vild_tool_{name}", REPO / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loggers = [logging.root] + [logging.getLogger(n) for n in ("vild_d2", "detectron2")]
    handlers = [x.handlers[:] for x in loggers]
    try:
        return module.main(argv)
    finally:  # (handlers on the capture stream of this test would outlive it)
        for x, h in zip(loggers, handlers):
            x.handlers[:] = h


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's folder: the official R50 ViLD-ensemble TF checkpoint (seeded weights, plus a
    training step counter), photo.jpg, and the repository's configs/ beside them."""
    root = tmp_path_factory.mktemp("user")
    tf_vars = random_official_weights(official_variables(50, ensemble=True), 0)
    tf_vars["global_step"] = np.int64(180000)
    write_tf_checkpoint(root / "model.ckpt-180000", tf_vars)
    (root / "configs").symlink_to(REPO / "configs")
    photo = cv2.imread(str(REPO / "docs" / "images" / "shapes_vild_ensemble_val.jpg"))
    if photo is None:  # any small picture will do
        photo = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "photo.jpg"), cv2.resize(photo, (128, 96)))
    return root


@pytest.fixture
def offline(user, monkeypatch):
    """In the user's folder, with no CLIP on disk and no network (a proxy that refuses), and
    a record of every CLIP load."""
    monkeypatch.chdir(user)
    monkeypatch.setenv("HOME", str(user / "home"))  # ~/.cache/clip: empty
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    import vild_d2.text.encoder as encoder

    loads, real = [], encoder.load_clip
    monkeypatch.setattr(encoder, "load_clip", lambda *a, **k: loads.append(a) or real(*a, **k))
    return loads


@pytest.mark.slow  # two builds of the 65M-parameter model, one conversion
def test_readme_commands_run_as_written_offline(user, offline, capsys):
    convert, demo = readme_commands()
    assert convert[0] == "tools/convert_official_checkpoint.py" and demo[0] == "tools/demo.py"
    convert = [x.replace("<PREFIX>", str(user / "model.ckpt-180000")) for x in convert[1:]]
    assert _main("convert_official_checkpoint", convert) == 0
    weights = user / convert[convert.index("--output") + 1]
    assert weights.is_file() and weights.with_name(weights.stem + "_vocabulary.pth").is_file()

    assert _main("demo", demo[1:] + SMALL) == 0, capsys.readouterr().err[-2000:]
    assert offline == []  # CLIP never loaded
    result = json.loads((user / "out" / "detections.json").read_text())
    assert result["vocabulary"] == LVIS.names and result["errors"] == []
    assert [im["file_name"] for im in result["images"]] == ["photo.jpg"]

    # Typed names the checkpoint holds need no CLIP either; the masks in the JSON are pasted
    # as the official evaluation pastes them (the model's own rescale_detections).
    args = [
        "--vocabulary",
        "custom",
        "--custom-vocabulary",
        "zebra,mug",
        "--overwrite",
        "--confidence-threshold",
        "0",
    ]
    assert _main("demo", demo[1:3] + args + demo[3:] + SMALL) == 0
    result = json.loads((user / "out" / "detections.json").read_text())
    (image,) = result["images"]
    assert result["vocabulary"] == ["zebra", "mug"] and len(image["detections"]) == 8
    assert all("segmentation" in d for d in image["detections"]) and offline == []

    # Any other name needs CLIP: offline, one line naming it.
    from vild_d2.official.vocabulary import official_text_encoder

    cfg = load_config(demo[2], demo[demo.index("--opts") + 1 :])
    encoder = official_text_encoder(cfg)
    assert torch.equal(
        encoder.encode(["zebra", "mug"]),
        encoder.stored.embeddings[[LVIS.names.index("zebra"), LVIS.names.index("mug")]],
    )
    with pytest.raises(ValueError) as err:
        encoder.encode(["zebra", "purple unicorn"])
    line = str(err.value)
    assert "\n" not in line and "'purple unicorn'" in line and "zebra" not in line
    assert line.startswith(
        "1 class names are not in checkpoint vild_ens_r50.pth ('purple unicorn'): encoding "
        "them needs CLIP ViT-B/32"
    )
    assert len(offline) == 1  # loaded for that name alone


def test_converter_summarises_another_models_checkpoint(user, tmp_path, capsys):
    """A valid TF checkpoint of another model (tests/fixtures/tf_checkpoint): one line, exit 2,
    nothing written."""
    prefix = REPO / "tests" / "fixtures" / "tf_checkpoint" / "model.ckpt"
    config = "configs/LVIS-OVD/official/vild_ensemble_R50_tf.yaml"
    out = tmp_path / "x.pth"
    argv = ["--checkpoint", str(prefix), "--config-file", str(REPO / config), "--output", str(out)]
    assert _main("convert_official_checkpoint", argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.search(
        r"\d+ variables found, 463 expected; 463 missing \(resnet50/conv2d/kernel", line
    )
    assert "... (459 more)" in line and "not an official ViLD checkpoint" in line
    assert len(line) < 1000 and list(tmp_path.iterdir()) == []


def test_variable_summary_names_the_checkpoint_kind():
    ensemble = {n: np.zeros(s, np.float32) for n, s in official_variables(50, ensemble=True)}
    line = variable_problems(ensemble, dict(official_variables(50)), 50, False)
    assert "38 unexpected (frcnn_layer_0/fast_rcnn_head/distill_conv_0/kernel" in line
    assert line.endswith(
        "it is an R50 ViLD-ensemble checkpoint: use the vild_ensemble_R50_tf.yaml config"
    )
    r152 = {n: np.zeros(s, np.float32) for n, s in official_variables(152)}
    line = variable_problems(r152, dict(official_variables(50)), 50, False)
    assert "\n" not in line and line.endswith(
        "its backbone is ResNet-152: use the config of that depth (MODEL.RESNETS.DEPTH)"
    )
    assert variable_problems(r152, dict(official_variables(152)), 152, False) == ""


def test_novel_classes_file(tmp_path):
    names = LVIS.names
    f = tmp_path / "novel.txt"
    f.write_text("# novel classes\n1, 3\nzebra  # a name\n\n1203\n")
    novel = read_novel_classes(str(f), names)
    expected = {0, 2, names.index("zebra"), 1202}
    assert set(torch.nonzero(novel).flatten().tolist()) == expected
    rare = np.ones(1204, np.int64)
    rare[[1, 5]] = 0  # background first: class ids 1 and 5
    np.save(tmp_path / "rare.npy", rare)
    assert torch.nonzero(
        read_novel_classes(str(tmp_path / "rare.npy"), names)
    ).flatten().tolist() == [0, 4]
    for text, message in (
        ("0\n", f"{f}, line 1: class id 0 is out of range 1..1203"),
        ("zebra\n1204\n", f"{f}, line 2: class id 1204 is out of range 1..1203"),
        (
            "purple unicorn\n",
            f"{f}, line 1: 'purple unicorn' is neither a class id 1..1203 nor a class name",
        ),
        ("# nothing\n", f"{f}: no class ids or names"),
    ):
        f.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_novel_classes(str(f), names)
    np.save(tmp_path / "bad.npy", np.ones(7))
    with pytest.raises(ValueError, match="must hold 1204 .* or 1203 values"):
        read_novel_classes(str(tmp_path / "bad.npy"), names)


@pytest.mark.slow  # a conversion
def test_converter_novel_classes_reach_the_model(user, tmp_path, capsys):
    from vild_d2.official.vocabulary import checkpoint_vocabulary

    config = str(REPO / "configs/LVIS-OVD/official/vild_ensemble_R50_tf.yaml")
    (tmp_path / "novel.txt").write_text("zebra\n7\n")
    base = ["--checkpoint", str(user / "model.ckpt-180000"), "--config-file", config]
    (tmp_path / "bad.txt").write_text("7\n99999\n")
    argv = [
        *base,
        "--output",
        str(tmp_path / "bad.pth"),
        "--novel-classes",
        str(tmp_path / "bad.txt"),
    ]
    assert _main("convert_official_checkpoint", argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'bad.txt'}, line 2: class id 99999 is out of range 1..1203 (the "
        "official class numbers)"
    )
    argv = [
        *base,
        "--output",
        str(tmp_path / "n.pth"),
        "--novel-classes",
        str(tmp_path / "novel.txt"),
    ]
    assert _main("convert_official_checkpoint", argv) == 0
    vocab = checkpoint_vocabulary(str(tmp_path / "n.pth"))
    assert torch.nonzero(vocab.novel).flatten().tolist() == sorted([6, LVIS.names.index("zebra")])

    # --opts that change a layer's width: one line, not torch's traceback.
    capsys.readouterr()
    argv = [
        *base,
        "--output",
        str(tmp_path / "w.pth"),
        "--opts",
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        "512",
    ]
    assert _main("convert_official_checkpoint", argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        "27 tensors of another shape, e.g. size mismatch for roi_heads.box_head.fcs.0.weight"
        in line
    )
    assert not (tmp_path / "w.pth").exists()


# --- the official evaluation's pasting and boxes ----------------------------------------------


def _reference_paste(mask, box, height, width):
    """utils/mask_utils.py: paste_instance_masks for one mask, written out independently: the
    box expansion in float32 (as numpy does it there), the bilinear resize (cv2's INTER_LINEAR:
    half-pixel centres, edges clamped) in float64 pixel by pixel."""
    m = mask.shape[0]
    x, y = np.float32(box[0]), np.float32(box[1])
    w, h = np.float32(box[2] - box[0]), np.float32(box[3] - box[1])
    scale = (m + 2.0) / m
    w_half, h_half = w * np.float32(0.5), h * np.float32(0.5)
    xc, yc = x + w_half, y + h_half
    w_half, h_half = w_half * np.float32(scale), h_half * np.float32(scale)
    x1, y1, x2, y2 = (
        int(np.float32(v)) for v in (xc - w_half, yc - h_half, xc + w_half, yc + h_half)
    )
    bw, bh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    padded = np.zeros((m + 2, m + 2))
    padded[1:-1, 1:-1] = mask
    out = np.zeros((height, width), bool)
    for row in range(bh):
        for col in range(bw):
            sy = min(max((row + 0.5) * (m + 2) / bh - 0.5, 0.0), m + 1.0)
            sx = min(max((col + 0.5) * (m + 2) / bw - 0.5, 0.0), m + 1.0)
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1_, x1_ = min(y0 + 1, m + 1), min(x0 + 1, m + 1)
            ly, lx = sy - y0, sx - x0
            v = (1 - ly) * ((1 - lx) * padded[y0, x0] + lx * padded[y0, x1_]) + ly * (
                (1 - lx) * padded[y1_, x0] + lx * padded[y1_, x1_]
            )
            if 0 <= y1 + row < height and 0 <= x1 + col < width:
                out[y1 + row, x1 + col] = v > 0.5
    return out


def test_official_paste_hand_worked():
    """A 2 x 2 mask of ones in the box (x, y, w, h) = (10, 20, 4, 2): widened x2 about its
    centre to x 8..16, y 19..23 (9 x 5 px); the padded 4 x 4 mask [0 1 1 0] resized to 9
    columns gives [0, .17, .61, 1, 1, 1, .61, .17, 0] and to 5 rows [0, .7, 1, .7, 0]; their
    products above 0.5: row 20 x 11..13, row 21 x 10..14, row 22 x 11..13."""
    out = paste_masks_official(
        torch.ones(1, 2, 2), torch.tensor([[10.0, 20.0, 14.0, 22.0]]), 30, 30
    )
    expected = np.zeros((30, 30), bool)
    expected[20, 11:14] = expected[21, 10:15] = expected[22, 11:14] = True
    assert np.array_equal(out[0].numpy(), expected)


def test_official_paste_matches_an_independent_reference():
    rng = np.random.default_rng(0)
    n, height, width = 24, 37, 53
    masks = rng.random((n, 28, 28)).astype(np.float32)
    x1 = rng.uniform(-15, 45, n)
    y1 = rng.uniform(-15, 30, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0.3, 40, n), y1 + rng.uniform(0.3, 30, n)], 1)
    boxes = boxes.astype(np.float32)
    ours = paste_masks_official(torch.from_numpy(masks), torch.from_numpy(boxes), height, width)
    for i in range(n):
        assert np.array_equal(
            ours[i].numpy(), _reference_paste(masks[i], boxes[i], height, width)
        ), i
    # The small-mask form (the demo, the server) pastes the same pixels.
    pasted = OfficialROIMasks(torch.from_numpy(masks))[3:4].to_bitmasks(
        torch.from_numpy(boxes[3:4]), height, width
    )
    assert torch.equal(pasted.tensor[0], ours[3])


def test_official_boxes_are_not_clipped_nor_dropped():
    """On a 40 x 60 (h x w) image scaled from a 20 x 30 one: a box past the right edge stays
    as it is, one wholly in the padding is kept; detectron2's choice clips and drops."""
    det = Instances((20, 30))
    det.pred_boxes = Boxes(torch.tensor([[25.0, 5.0, 40.0, 10.0], [31.0, 21.0, 35.0, 25.0]]))
    det.scores = torch.tensor([0.9, 0.8])
    det.pred_classes = torch.tensor([1, 2])
    det.pred_masks = torch.ones(2, 1, 28, 28)
    cfg = load_config(str(REPO / "configs/LVIS-OVD/official/vild_R50_tf.yaml"))
    official = cfg.MODEL.VILD.OFFICIAL
    model = SimpleNamespace(
        paste_masks=official.PASTE_MASKS, clip_boxes_to_image=official.CLIP_BOXES_TO_IMAGE
    )
    out = OfficialViLDRCNN.rescale_detections(model, det, 40, 60, paste=True)
    assert out.pred_boxes.tensor.tolist() == [[50.0, 10.0, 80.0, 20.0], [62.0, 42.0, 70.0, 50.0]]
    assert out.pred_masks.shape == (2, 40, 60) and not out.pred_masks[1].any()
    d2 = official_postprocess(det, 40, 60, paste="detectron2", clip_to_image=True)
    assert d2.pred_boxes.tensor.tolist() == [[50.0, 10.0, 60.0, 20.0]]
