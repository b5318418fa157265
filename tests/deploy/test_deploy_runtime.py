"""vild_d2_runtime: the exported detector and text encoder with numpy around them, in a
process without torch or detectron2, give the PyTorch predictor's detections; its pieces equal
the library's (tokens, prompts, embeddings, resize, mask paste, RLE); bad input is refused."""

import vild_d2  # noqa: F401  (first: compat bridges)

import json
import subprocess
import sys
import textwrap
import time

import clip
import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.layers import paste_masks_in_image
from skimage import data as skdata

from vild_d2 import TextEncoder as LibraryTextEncoder
from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.engine.detections import detections_to_json as library_json
from vild_d2.export import export_onnx, export_text_encoder_onnx
from vild_d2.text import builtin_vocabulary, fill_prompts, load_templates
from vild_d2_runtime import Detector, GraphKindError, TextEncoder, Tokenizer
from vild_d2_runtime import fill_prompts as runtime_fill_prompts
from vild_d2_runtime import detections_to_json
from vild_d2_runtime.image import image_size, paste_mask, paste_masks, resize_bilinear
from vild_d2_runtime.image import resized_shape, rle_encode

from tiny_world import make_random_model, save_random_clip  # tests/ helper

NAMES = ["red square", "flag", "blue circle", "cat"]  # two base (training) names, two novel
LVIS = builtin_vocabulary("lvis").names


def _bgr(image):
    return np.ascontiguousarray(image[:, :, ::-1])


# --- the contract ----------------------------------------------------------------------------
_CONTRACT_ALONE = textwrap.dedent(
    """
    import sys
    BLOCKED = {"onnxruntime", "torch", "detectron2", "vild_d2", "clip", "cv2"}
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError("blocked by the test: " + name)
    sys.meta_path.insert(0, Block())
    from vild_d2_runtime import contract, names
    assert contract.parse_names("Red_Star, cat") == ["Red_Star", "cat"]
    assert contract.fill_prompts("Red_Star", ["a {}."]) == ["This is a red star."]
    print("contract alone: ok")
    """
)


def test_one_contract_below_both_sides():
    """vild_d2 and the runtime use the contract's names themselves (no second copy), and the
    contract loads where onnxruntime, torch and vild_d2 cannot be imported."""
    import vild_d2.engine.detections
    import vild_d2.engine.predictor
    import vild_d2.export
    import vild_d2.text
    import vild_d2_runtime
    from vild_d2_runtime import contract

    for module, name in [
        (vild_d2.export, "VOCABULARY_INPUTS"),
        (vild_d2.export, "OUTPUT_FIELDS"),
        (vild_d2.engine.detections, "json_header"),
        (vild_d2.engine.predictor, "check_image"),
        (vild_d2.text, "parse_names"),
        (vild_d2.text, "fill_prompts"),
        (vild_d2.text, "process_name"),
        (vild_d2.text, "article"),
        (vild_d2_runtime, "detections_to_json"),
        (vild_d2_runtime, "check_vocabulary"),
    ]:
        assert getattr(module, name) is getattr(contract, name), (module.__name__, name)
    assert not hasattr(vild_d2.export, "run_onnx")  # one ONNX runner: vild_d2_runtime's
    proc = subprocess.run([sys.executable, "-c", _CONTRACT_ALONE], capture_output=True, text=True)
    assert proc.returncode == 0 and "contract alone: ok" in proc.stdout, proc.stderr[-2000:]


# --- the text side ---------------------------------------------------------------------------
def test_tokens_equal_clip_tokenize():
    templates = load_templates()
    prompts = [p for k, n in enumerate(LVIS) for p in fill_prompts(n, templates)[k % 60 :][:3]]
    prompts += [
        "Crème brûlée &amp; café",  # accents, an HTML entity
        "naïve façade — “quoted” ½",  # ftfy's territory
        "R2-D2's 3.5mm jack!!  tabs\tand\nlines",
        "",
        "word " * 100,  # longer than 77 tokens: cut, ending with the end token
    ]
    ours = Tokenizer()(prompts, 77)
    assert np.array_equal(ours, clip.tokenize(prompts, context_length=77, truncate=True).numpy())
    assert np.array_equal(Tokenizer()(prompts[:3], 16), clip.tokenize(prompts[:3], 16).numpy())


def test_prompts_equal_the_librarys():
    templates = load_templates()
    for name in LVIS + ["a/b.", "Apple_pie", "the thing", "  eel "]:
        assert runtime_fill_prompts(name, templates) == fill_prompts(name, templates)


@pytest.fixture(scope="module")
def text_encoder_onnx(tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp("text_encoder")
    library = LibraryTextEncoder(tiny_clip_path, cache_dir=str(root / "cache"))
    export_text_encoder_onnx(library, str(root / "text_encoder.onnx"))
    return {"path": root / "text_encoder.onnx", "library": library, "root": root}


@pytest.mark.slow
def test_exported_text_encoder_equals_the_librarys_lvis_vocabulary(text_encoder_onnx):
    ref = text_encoder_onnx["library"].encode(LVIS).double().numpy()  # PyTorch, the reference
    cache = text_encoder_onnx["root"] / "runtime_cache"
    encoder = TextEncoder(str(text_encoder_onnx["path"]), cache_dir=str(cache))
    got = encoder.encode(LVIS)
    assert got.shape == (1203, 32) and got.dtype == np.float32
    cosine = (got.astype(np.float64) * ref).sum(1) / np.linalg.norm(got, axis=1)
    print(f"LVIS (1203 names x 63 prompts): min cosine {cosine.min():.8f}")
    assert cosine.min() >= 0.99999
    # Names seen before: no graph run (memory), and a new process reads them from disk.
    start = time.perf_counter()
    again = encoder.encode(LVIS[::-1])
    print(f"1203 cached names: {1000 * (time.perf_counter() - start):.2f} ms")
    assert encoder.encoded_names == 1203 and np.array_equal(again, got[::-1])
    fresh = TextEncoder(str(text_encoder_onnx["path"]), cache_dir=str(cache))
    assert np.array_equal(fresh.encode(LVIS[:10] + ["zebra crossing"])[:10], got[:10])
    assert fresh.encoded_names == 1  # only the new name went through the graph


# --- image work ------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(512, 768), (100, 37), (64, 64), (640, 427), (3, 900)])
def test_resize_is_detectron2s_bit_for_bit(hw):
    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    for short, longest in ((64, 128), (128, 256), (800, 1333)):
        aug = T.ResizeShortestEdge([short, short], longest)
        transform = aug.get_transform(image)
        new_h, new_w = resized_shape(*hw, short, longest)
        assert (new_h, new_w) == (transform.new_h, transform.new_w)
        if min(new_h, new_w) < 1:
            continue
        assert np.array_equal(resize_bilinear(image, new_h, new_w), transform.apply_image(image))


def test_rle_equals_pycocotools():
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 53)) > p for p in (0.0, 0.5, 0.97, 1.0)]
    blob = np.zeros((300, 200), dtype=bool)
    blob[40:260, 30:170] = True
    bars = np.zeros((50, 40), dtype=bool)  # full-height columns side by side, edges, corners
    bars[:, 3:9] = bars[:, 20] = bars[0, 30] = bars[-1, 31] = bars[-1, -1] = True
    edges = [bars, bars.T.copy(), ~bars, np.ones((1, 1), dtype=bool), np.zeros((1, 1), bool)]
    for mask in masks + [blob] + edges:
        ref = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = rle_encode(mask)
        assert ours["size"] == list(ref["size"]) and ours["counts"] == ref["counts"].decode()


def test_paste_masks_equals_detectron2():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(20, 28, 28, generator=g)
    xy = torch.rand(20, 2, generator=g) * torch.tensor([300.0, 200.0]) - 10
    boxes = torch.cat([xy, xy + 5 + torch.rand(20, 2, generator=g) * 150], 1)
    ref = paste_masks_in_image(probs, boxes, (240, 320)).numpy()
    got = paste_masks(probs.numpy(), boxes.numpy(), (240, 320))
    assert (got != ref).sum() <= 1e-5 * ref.size  # float rounding at the 0.5 threshold only


def test_banded_resize_and_paste_equal_the_whole(monkeypatch):
    """The resize and the mask paste work in bands of rows (memory): with bands of a few rows
    they still give detectron2's results, and one mask at a time equals all at once."""
    import vild_d2_runtime.image as runtime_image

    monkeypatch.setattr(runtime_image, "_BAND", 500)
    image = np.random.default_rng(1).integers(0, 256, (61, 89, 3), dtype=np.uint8)
    for new_h, new_w in ((30, 44), (128, 187)):
        transform = T.ResizeTransform(61, 89, new_h, new_w)
        assert np.array_equal(resize_bilinear(image, new_h, new_w), transform.apply_image(image))
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(6, 28, 28, generator=g)
    boxes = torch.tensor([[-5.0, 3, 120, 90], [10, 10, 40.5, 20], [0, 0, 160, 120]] * 2)
    ref = paste_masks_in_image(probs, boxes, (120, 160)).numpy()
    got = paste_masks(probs.numpy(), boxes.numpy(), (120, 160))
    assert (got != ref).sum() <= 1e-5 * ref.size
    one = np.stack([paste_mask(m, b, (120, 160)) for m, b in zip(probs.numpy(), boxes.numpy())])
    assert np.array_equal(one, got)


def _png_claiming(path, width, height):
    """A small PNG whose header claims width x height (its data would not even decode)."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b""))
    return path


def test_image_size_is_read_from_the_header(tmp_path):
    from PIL import Image

    image = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    files = []
    for suffix in ("png", "jpg", "bmp", "tif", "webp"):
        files.append(tmp_path / f"cv2.{suffix}")
        cv2.imwrite(str(files[-1]), image)
    saved_by_pil = [
        ("progressive.jpg", {"progressive": True}),
        ("lossless.webp", {"lossless": True}),
        ("lzw.tif", {"compression": "tiff_lzw"}),
    ]
    for name, options in saved_by_pil:
        files.append(tmp_path / name)
        Image.fromarray(image).save(files[-1], **options)
    files.append(tmp_path / "alpha.webp")
    Image.fromarray(np.dstack([image, image[:, :, :1]])).save(files[-1])
    for path in files:
        assert image_size(str(path)) == Image.open(path).size == (53, 37), path.name
    assert image_size(str(_png_claiming(tmp_path / "huge.png", 20000, 20000))) == (20000, 20000)
    (tmp_path / "notes.txt").write_text("hello")
    assert image_size(str(tmp_path / "notes.txt")) is None


def test_masks_pasted_one_at_a_time_hold_one_mask(tmp_path):
    """detections_to_json with the graph's small masks: the RLEs of the masks pasted all at
    once, while the memory traced never holds more than a few full-size masks (all at once:
    16 of them)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    n, size = 16, (2000, 3000)
    xy = rng.uniform(0, 1500, (n, 2))
    dets = {
        "boxes": np.concatenate([xy, xy + rng.uniform(200, 1400, (n, 2))], 1).astype(np.float32),
        "scores": rng.uniform(0.5, 1, n).astype(np.float32),
        "classes": np.zeros(n, dtype=np.int64),
        "mask_probs": rng.uniform(0, 1, (n, 28, 28)).astype(np.float32),
    }
    tracemalloc.start()
    try:
        records = detections_to_json(dets, ["thing"], size, 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = paste_masks(dets["mask_probs"], dets["boxes"], size, 0.5)
    assert [r["segmentation"] for r in records] == [rle_encode(m) for m in whole]
    one_mask = size[0] * size[1]  # bytes of one bool mask
    print(f"peak {peak / one_mask:.1f} masks' worth")
    assert peak < 6 * one_mask  # all at once: over 16


def test_runtime_cli_bad_files_and_options_are_one_line_exit_2(tmp_path, capsys):
    """In-process main(): an empty, a garbage and a truncated .onnx; an --output that is a
    folder (checked before the model is opened); options out of range (NaN included)."""
    import onnx
    from onnx import TensorProto, helper

    from vild_d2_runtime.__main__ import main

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["out"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [3, None, None])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, [3, None, None])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [4096], [0.5] * 4096)],
    )
    whole = tmp_path / "whole.onnx"
    onnx.save(helper.make_model(graph), str(whole))
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "truncated.onnx").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    base = ["--names", "cat", "--input", str(image)]
    cases = [
        (["--model", str(tmp_path / "empty.onnx")], "empty.onnx: empty file (0 bytes)"),
        (["--model", str(tmp_path / "garbage.onnx")], "garbage.onnx: not a loadable ONNX model"),
        (["--model", str(tmp_path / "truncated.onnx")], "truncated.onnx: not a loadable ONNX"),
        (["--model", str(tmp_path)], "is a folder, not an ONNX file"),
        (["--model", "none.onnx", "--output", str(tmp_path)], f"--output {tmp_path} is a folder"),
        (["--model", "none.onnx", "--confidence-threshold", "nan"], "--confidence-threshold nan: "
         "must be in [0, 1]"),
        (["--model", "none.onnx", "--max-megapixels", "0"], "--max-megapixels 0: must be above 0"),
        (["--model", "none.onnx", "--max-megapixels", "nan"], "--max-megapixels nan: must be"),
    ]  # fmt: skip
    for args, message in cases:
        assert main([*args, *base]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_nan_in_the_name_cache_is_recomputed(text_encoder_onnx, tmp_path):
    path = str(text_encoder_onnx["path"])
    first = TextEncoder(path, cache_dir=str(tmp_path)).encode(["cat", "dog"])
    (cached,) = [f for f in tmp_path.rglob("*.npy") if np.allclose(np.load(f), first[0])]
    np.save(cached, np.full(first.shape[1], np.nan, np.float32))
    fresh = TextEncoder(path, cache_dir=str(tmp_path))
    again = fresh.encode(["cat", "dog"])
    assert np.isfinite(again).all() and np.allclose(again, first, atol=1e-6)
    assert fresh.encoded_names == 1  # "cat" recomputed, "dog" read
    assert np.allclose(np.load(cached), first[0], atol=1e-6)  # and the file repaired


# --- the detector ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_clip_path):
    """A tiny ViLD-ensemble exported by the tool (--vocabulary-input), and its predictor."""
    root = tmp_path_factory.mktemp("deployed")
    config_file, opts = make_random_model(root / "model", tiny_clip_path, variant="vild_ensemble")
    out = str(root / "out")
    cmd = [sys.executable, "tools/export_model.py", "--config-file", config_file,
           "--format", "onnx", "--vocabulary-input", "--output", out, "--opts", *opts]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "text encoder check on 3 names: min cosine" in proc.stdout
    predictor = ViLDPredictor(load_config(config_file, opts))
    return {"root": root, "out": root / "out", "predictor": predictor}


# Runs the runtime's CLI where importing torch, detectron2 or vild_d2 fails, and proves it.
_NO_TORCH = textwrap.dedent(
    """
    import runpy, sys
    BLOCKED = {"torch", "torchvision", "detectron2", "vild_d2", "clip"}
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError("blocked by the test: " + name)
    sys.meta_path.insert(0, Block())
    try:
        import torch
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("torch could be imported")
    sys.argv = ["vild_d2_runtime", *sys.argv[1:]]
    try:
        runpy.run_module("vild_d2_runtime", run_name="__main__", alter_sys=True)
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("BLOCKED MODULES LOADED:", loaded, file=sys.stderr)
    """
)


def _mask(seg):
    return mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


@pytest.mark.slow
def test_runtime_without_torch_gives_the_predictors_detections(deployed, tmp_path):
    images = {"coffee.jpg": skdata.coffee(), "chelsea.png": skdata.chelsea()}
    for name, rgb in images.items():
        cv2.imwrite(str(tmp_path / name), _bgr(rgb))
    huge = str(_png_claiming(tmp_path / "huge.png", 20000, 20000))  # 389 KB, 1.2 GB decoded
    out = tmp_path / "dets.json"
    args = ["--model", str(deployed["out"] / "model.onnx"), "--names", ", ".join(NAMES),
            "--input", str(tmp_path / "coffee.jpg"), huge, str(tmp_path / "chelsea.png"),
            "--output", str(out), "--confidence-threshold", "0"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # one input failed, the others done
    assert "BLOCKED MODULES LOADED: []" in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED")]
    why = "20000x20000 px (400.0 megapixels), above --max-megapixels 100: downscale it"
    assert len(failed) == 1 and failed[0].startswith(f"FAILED {huge}: {why}"), proc.stderr
    result = json.loads(out.read_text())
    assert result["vocabulary"] == NAMES and [e["input"] for e in result["errors"]] == [huge]
    assert len(result["images"]) == 2
    for record in result["images"]:
        bgr = cv2.imread(record["file_name"], cv2.IMREAD_COLOR)  # what the runtime read
        ref = library_json(deployed["predictor"](bgr, vocabulary=NAMES)["instances"], NAMES)
        got = record["detections"]
        assert len(got) == len(ref) > 0
        box = max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g["bbox"], r["bbox"]))
        score = max(abs(g["score"] - r["score"]) for g, r in zip(got, ref))
        print(f"{record['file_name']}: {len(got)} dets, box {box:.3f} px, score {score:.1e}")
        assert [g["category_id"] for g in got] == [r["category_id"] for r in ref]
        assert box <= 0.01 + 1e-9 and score <= 1e-4  # JSON boxes are rounded to 0.01 px
        differ = sum(
            int((_mask(g["segmentation"]) != _mask(r["segmentation"])).sum())
            for g, r in zip(got, ref)
        )
        assert differ <= 1e-5 * len(ref) * bgr.shape[0] * bgr.shape[1], differ


@pytest.mark.slow
def test_runtime_refuses_bad_input(deployed, tmp_path, monkeypatch, tiny_clip_path):
    model = deployed["out"] / "model.onnx"
    detector = Detector(str(model))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the graph ran")

    monkeypatch.setattr(detector.session, "run", must_not_run)
    image = detector.preprocess(_bgr(skdata.coffee()))
    emb, mask = detector.vocabulary(NAMES)
    assert mask.tolist() == [False, True, False, True]
    nan = emb.copy()
    nan[2, 5] = np.nan
    inf = emb.copy()
    inf[0, 0] = -np.inf
    wide = np.ones((4, 48), dtype=np.float32)
    for args, message in [
        ((wide, mask), "48-d but this model's region embeddings are 32-d"),
        ((emb[:0], mask[:0]), r"K = 0"),
        ((nan, mask), r"NaN or infinite values in rows \[2\]"),
        ((inf, mask), r"NaN or infinite values in rows \[0\]"),
        ((emb, mask[:3]), r"novel_mask: expected \(4,\) bool"),
        ((emb, None), "needs one"),
    ]:
        with pytest.raises(ValueError, match=message):
            detector.run(image, *args)
    with pytest.raises(ValueError, match="image: expected uint8"):
        detector.run(image.astype(np.float32), emb, mask)
    with pytest.raises(ValueError, match=r"H, W >= 1, got \(3, 0, 0\)"):
        detector.run(np.zeros((3, 0, 0), np.uint8), emb, mask)
    bgr = _bgr(skdata.coffee())
    for bad, message in [
        (bgr.astype(np.float32) / 255, "got float32"),
        (bgr[:, :, :1], "grayscale"),
        (np.dstack([bgr, bgr[:, :, :1]]), "4 channels"),
        (bgr[None], r"4 dimensions\); one image per call"),
        (bgr[:, :, 0], "grayscale"),
    ]:
        with pytest.raises(ValueError, match=message):
            detector(bad, NAMES)
    with pytest.raises(ValueError, match=r"K = 0|empty vocabulary"):
        detector(bgr, [])
    with pytest.raises(ValueError, match="duplicate class name"):
        detector(bgr, ["cat", "cat"])
    # vild_d2's rule (issue 27): names CLIP reads alike, and control characters, are refused.
    with pytest.raises(ValueError, match=r"'red star' \(item 1\) and 'red  star' \(item 2\)"):
        detector(bgr, ["red star", "red  star"])
    with pytest.raises(ValueError, match=r"'red\\x00star' has a control character \(U\+0000"):
        detector(bgr, ["cat", "red\x00star"])

    # Files of the wrong kind, told apart by their input names.
    predictor = deployed["predictor"]
    export_onnx(predictor.model, predictor.preprocess(bgr)["image"], str(tmp_path / "baked.onnx"))
    with pytest.raises(GraphKindError, match="baked vocabulary.*--vocabulary-input"):
        Detector(str(tmp_path / "baked.onnx"), str(deployed["out"] / "text_encoder.onnx"))
    with pytest.raises(GraphKindError, match="is a text encoder"):
        Detector(str(deployed["out"] / "text_encoder.onnx"))
    with pytest.raises(GraphKindError, match="is a detector with a vocabulary input"):
        TextEncoder(str(model))
    # A text encoder of another CLIP width: both widths named.
    wide_clip = save_random_clip(str(tmp_path / "wide_clip.pt"), embed_dim=64)
    path = tmp_path / "wide" / "text_encoder.onnx"
    export_text_encoder_onnx(LibraryTextEncoder(wide_clip, cache_dir=None), str(path))
    with pytest.raises(
        ValueError, match="64-d embeddings but the detector's region embeddings are 32-d"
    ):
        Detector(str(model), str(path))
