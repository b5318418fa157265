"""vild_d2_runtime's semantics, the same as vild_d2's (issue 30): a typed name's novelty is its
name as CLIP reads it, on both sides; masks are pasted one at a time (memory bounded with
detections, in the API and the CLI); grayscale, 16-bit and tiny images get one behaviour in
the API and the CLI."""

import vild_d2  # noqa: F401  (first: compat bridges)

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.export import deploy_metadata, export_onnx, export_text_encoder_onnx
from vild_d2.text import novel_mask
from vild_d2_runtime import Detector, detections_to_json
from vild_d2_runtime.__main__ import main as runtime_main
from vild_d2_runtime.image import paste_masks

from tiny_world import TINY_OPTS, make_random_model  # tests/ helper

BASE = "blue circle"  # a training name of tiny_world's models


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_clip_path):
    """A tiny random ViLD-ensemble (TEST.DETECTIONS_PER_IMAGE 50), its predictor, and its
    vocabulary-input ONNX export with the text encoder beside it (in-process: no tool start)."""
    root = tmp_path_factory.mktemp("semantics")
    config_file, opts = make_random_model(root / "model", tiny_clip_path, variant="vild_ensemble")
    predictor = ViLDPredictor(load_config(config_file, opts))
    image = predictor.preprocess(np.zeros((64, 80, 3), np.uint8))["image"]
    out = root / "out"
    export_onnx(
        predictor.model,
        image,
        str(out / "model.onnx"),
        vocabulary_input=True,
        metadata=deploy_metadata(predictor),
    )
    export_text_encoder_onnx(predictor.model.text_encoder, str(out / "text_encoder.onnx"))
    return {"predictor": predictor, "model": str(out / "model.onnx"), "root": root}


def _photo(h, w, seed=0):
    """A smooth random BGR picture (compresses well: big PNGs are written fast)."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


# --- novelty ----------------------------------------------------------------------------------
def test_a_typed_names_novelty_is_its_name_as_clip_reads_it(exported):
    """Typed "BLUE CIRCLE" and " blue  circle " have the embedding of the training name "blue
    circle": base, on both sides, with its scores (ViLD-ensemble scores novel names another
    way: the test first checks that the rule matters on this image)."""
    predictor, detector = exported["predictor"], Detector(exported["model"])
    bgr = _photo(96, 128)
    typed = [BASE, BASE.upper(), f" {BASE.replace(' ', '  ')} "]

    def both(names, novel=None):
        vocab = predictor.resolve_vocabulary(names)
        if novel is not None:
            vocab = dataclasses.replace(vocab, novel=novel_mask(vocab.names, novel))
        ours = predictor(bgr, vocabulary=vocab)["instances"]
        theirs = detector(bgr, names, novel, paste_masks=False)
        return ours.scores.numpy(), theirs["scores"], predictor.novel_mask(vocab)

    base_torch, base_runtime, mask = both([BASE, "cat"])
    assert mask.tolist() == [False, True]
    as_novel, _, _ = both([BASE, "cat"], novel=[BASE, "cat"])
    assert not np.allclose(np.sort(as_novel), np.sort(base_torch), atol=1e-3)  # it matters
    for name in typed[1:]:
        scores_torch, scores_runtime, mask = both([name, "cat"])
        assert mask.tolist() == [False, True], name
        assert detector.vocabulary([name, "cat"])[1].tolist() == [False, True], name
        np.testing.assert_allclose(scores_torch, base_torch, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(scores_runtime, base_runtime, atol=1e-6, err_msg=name)


# --- masks and memory -------------------------------------------------------------------------
def test_api_masks_are_pasted_when_read(exported):
    """Detector(...)(image, names) at threshold 0 (50 detections): the masks are pasted when
    read, one at a time; encoding them all never holds more than a few full-size masks (all at
    once: 50), and they equal the masks pasted all at once."""
    detector = Detector(exported["model"])
    size = (1000, 1500)
    bgr = _photo(*size)
    tracemalloc.start()
    try:
        dets = detector(bgr, [BASE, "cat"])
        records = detections_to_json(dets, [BASE, "cat"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_mask = size[0] * size[1]
    print(f"{len(records)} detections; traced peak {peak / one_mask:.1f} masks' worth")
    assert len(records) == 50 and peak < 6 * one_mask
    masks = dets["masks"]
    probs = detector(bgr, [BASE, "cat"], paste_masks=False)["mask_probs"]
    whole = paste_masks(probs, dets["boxes"], size, detector.meta["mask_threshold"])
    assert masks.shape == whole.shape == (50, *size) and len(masks) == 50
    assert np.array_equal(np.asarray(masks), whole)
    assert np.array_equal(masks[3], whole[3]) and np.array_equal(masks[-1], whole[-1])
    keep = dets["scores"] > np.median(dets["scores"])
    assert np.array_equal(np.stack(list(masks[keep])), whole[keep])
    with pytest.raises(IndexError):
        masks[50]


# The runtime's CLI in a child process that prints its own peak RSS (kB) last: VmHWM, the
# high-water mark of this process's memory (getrusage's ru_maxrss would count the parent's,
# which it keeps across fork and exec).
_PEAK = textwrap.dedent(
    """
    import re, runpy, sys
    sys.argv = ["vild_d2_runtime", *sys.argv[1:]]
    try:
        runpy.run_module("vild_d2_runtime", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert not e.code, e.code
    with open("/proc/self/status") as f:
        print("PEAK_KB", re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cli_peak_memory_does_not_grow_with_detections(exported, tmp_path):
    """The CLI on one 3000 x 3000 image with 50 detections (threshold 0) and with 1 (a
    threshold between the two best scores): the peak RSS grows by less than 3 full-size masks
    (50 masks at once would be 450 MB more)."""
    size = (3000, 3000)
    bgr = _photo(*size, seed=1)
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), bgr)
    names = [BASE, "cat"]
    scores = np.sort(Detector(exported["model"])(bgr, names, paste_masks=False)["scores"])
    assert len(scores) == 50 and scores[-1] > scores[-2]
    peaks = {}
    for count, threshold in ((50, 0.0), (1, float(scores[-1] + scores[-2]) / 2)):
        out = tmp_path / f"{count}.json"
        args = ["--model", exported["model"], "--names", ", ".join(names), "--input", str(path),
                "--output", str(out), "--confidence-threshold", repr(threshold)]  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len(json.loads(out.read_text())["images"][0]["detections"]) == count
        peaks[count] = int(proc.stdout.split("PEAK_KB")[-1]) * 1024
    one_mask = size[0] * size[1]
    print(f"peak RSS: 50 detections {peaks[50] / 2**20:.0f} MiB, 1: {peaks[1] / 2**20:.0f} MiB")
    assert peaks[50] - peaks[1] < 3 * one_mask


# --- grayscale, 16-bit and tiny images: one behaviour ----------------------------------------
def test_grayscale_16bit_and_tiny_images_alike_in_api_and_cli(exported, tmp_path, capsys):
    """The API refuses a grayscale or uint16 array and says how to convert it; the CLI reads
    such files converted that way, so the CLI on the file gives the API's detections on the
    converted array. An image under 8 px on a side is refused by both, with one message."""
    detector = Detector(exported["model"])
    names = [BASE, "cat"]
    bgr = _photo(90, 120, seed=2)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    # 16-bit: values spread over the full range (v * 257 + noise), so that v // 257 and
    # OpenCV's own reading (the high byte: v >> 8) differ.
    noise = np.random.default_rng(3).integers(0, 257, bgr.shape)
    wide = (bgr.astype(np.int64) * 257 + noise).clip(0, 65535).astype(np.uint16)
    files = {"gray.png": gray, "wide.png": wide, "gray_wide.tif": wide[:, :, 0]}
    for name, array in files.items():
        cv2.imwrite(str(tmp_path / name), array)
    cv2.imwrite(str(tmp_path / "dot.png"), bgr[:1, :1])
    cv2.imwrite(str(tmp_path / "strip.png"), bgr[:5, :])
    # The API: refused, with the conversion to use; the expected detections, from it.
    with pytest.raises(ValueError, match=r"grayscale.*cv2.COLOR_GRAY2BGR"):
        detector(gray, names)
    with pytest.raises(ValueError, match=r"uint16.*img // 257.*img.max\(\)"):
        detector(wide, names)
    converted = {
        "gray.png": cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR),
        "wide.png": (wide // 257).astype(np.uint8),
        "gray_wide.tif": cv2.cvtColor((wide[:, :, 0] // 257).astype(np.uint8), cv2.COLOR_GRAY2BGR),
    }
    tiny = "too small or too elongated for the detector: each side needs at least 8 px"
    for array in (bgr[:1, :1], bgr[:5, :]):
        with pytest.raises(ValueError, match=tiny):
            detector(np.ascontiguousarray(array), names)
    # The CLI: every file in one call.
    out = tmp_path / "dets.json"
    inputs = [str(tmp_path / n) for n in [*files, "dot.png", "strip.png"]]
    args = ["--model", exported["model"], "--names", ", ".join(names), "--input", *inputs,
            "--output", str(out), "--confidence-threshold", "0"]  # fmt: skip
    assert runtime_main(args) == 1  # the tiny ones failed, the others done
    result = json.loads(out.read_text())
    assert [e["input"] for e in result["errors"]] == inputs[-2:]
    assert all(tiny in e["error"] for e in result["errors"]), result["errors"]
    assert "image of 1x1 (HxW) px" in result["errors"][0]["error"]
    for record in result["images"]:
        name = record["file_name"].rsplit("/", 1)[-1]
        want = detections_to_json(detector(converted[name], names), names)
        assert len(want) == 50 and record["detections"] == want, name
    capsys.readouterr()


# --- exporting from any folder ----------------------------------------------------------------
def test_a_configs_relative_paths_work_from_any_folder(exported, tiny_clip_path, monkeypatch):
    """A config's relative CLIP_MODEL, EMBEDDING_CACHE_DIR and TRAIN_VOCABULARY, written from
    the repository's root as configs/Shapes/* write them, are found from another folder (the
    export tool, the demo: every tool loads configs so); paths typed as overrides stay the
    current folder's, and names that are no path stay names."""
    repo = exported["root"] / "repo"  # a checkout: configs/ and output/ side by side
    (repo / "configs").mkdir(parents=True)
    (repo / "output" / "teacher").mkdir(parents=True)
    shutil.copy(tiny_clip_path, repo / "output" / "teacher" / "clip.pt")
    shutil.copy(exported["root"] / "model" / "train_vocabulary.pth", repo / "output")
    (repo / "output" / "cache").mkdir()
    base = Path(__file__).resolve().parents[2] / "configs" / "Shapes" / "vild_ensemble.yaml"
    config = repo / "configs" / "mine.yaml"
    config.write_text(
        f'_BASE_: "{base}"\nMODEL:\n  VILD:\n    CLIP_MODEL: "output/teacher/clip.pt"\n'
        '    EMBEDDING_CACHE_DIR: "output/cache"\n'
        '    TRAIN_VOCABULARY: "output/train_vocabulary.pth"\n'
        '    TEST_VOCABULARY: "shapes_val"\n'
    )
    elsewhere = exported["root"] / "elsewhere"
    (elsewhere / "here").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    opts = [*TINY_OPTS, "DATASETS.TRAIN", "()", "MODEL.VILD.DISTILL.STORES", "()",
            "MODEL.VILD.PROMPT_TEMPLATES", "here", "OUTPUT_DIR", "out"]  # fmt: skip
    cfg = load_config(str(config), opts)
    vild = cfg.MODEL.VILD
    assert vild.CLIP_MODEL == str(repo / "output" / "teacher" / "clip.pt")
    assert vild.EMBEDDING_CACHE_DIR == str(repo / "output" / "cache")
    assert vild.TRAIN_VOCABULARY == str(repo / "output" / "train_vocabulary.pth")
    assert vild.TEST_VOCABULARY == "shapes_val"  # a dataset's name, not a path
    assert (vild.PROMPT_TEMPLATES, cfg.OUTPUT_DIR) == ("here", "out")  # typed: the cwd's
    cfg = load_config(str(config), [*opts[:-4]])  # the model's CLIP encodes a name from here
    assert ViLDPredictor(cfg).resolve_vocabulary(["cat"]).dim == 32
    assert any((repo / "output" / "cache").rglob("*")) and sorted(elsewhere.iterdir()) == [
        elsewhere / "here"
    ]
