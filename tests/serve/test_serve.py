"""tools/serve.py's API (vild_d2.serve) on a real server on 127.0.0.1: the same detections as
ViLDPredictor, concurrent requests with different vocabularies, the vocabulary cache, bad
input. One server (the API, no page) for the module."""

import vild_d2  # noqa: F401  (first: compat bridges)

import io
import threading
import time

import cv2
import httpx
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.serve import DetectionService, ServerThread, build_app
from vild_d2.text import load_templates

from benchmarks.serve import run_load  # the load benchmark (not installed)
from tiny_world import (  # tests/ helper
    TINY_SPEC,
    TRAIN_NAMES,
    counting_text_encodes,
    make_random_model,
    make_world,
)

NAMES_A = ["red square", "purple star", "orange heart"]  # "red square" is a base class
NAMES_B = ["blue circle", "yellow cross", "green heart"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp("toy_serve")
    config_file, opts = make_random_model(root, tiny_clip_path)
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    world = make_world(root / "datasets", prefix="serve_shapes", spec=TINY_SPEC)
    images = sorted((world["root"] / "images" / "val").glob("*.png"))
    return config_file, opts, images


@pytest.fixture(scope="module")
def server(toy):
    config_file, opts, images = toy
    predictor = ViLDPredictor(load_config(config_file, opts))
    service = DetectionService(predictor, samples={p.name: str(p) for p in images})
    with ServerThread(build_app(service, page=False)) as running:
        running.service = service
        yield running


@pytest.fixture(scope="module")
def reference(toy):
    """A second predictor with the same weights, called directly: the expected answers."""
    config_file, opts, _ = toy
    return ViLDPredictor(load_config(config_file, opts))


def post(url, files=None, timeout=60, **data):
    files = files if files is not None else []
    return httpx.post(f"{url}/api/detect", files=files, data=data, timeout=timeout)


def image_file(path):
    return ("image", (path.name, path.read_bytes(), "image/png"))


def expected_detections(predictor, path, names, threshold):
    """(name, score, XYWH box, mask) per detection of ``predictor`` called directly."""
    predictor.set_vocabulary(names)
    instances = predictor(cv2.imread(str(path)))["instances"]
    instances = instances[instances.scores >= threshold]
    out = []
    for box, score, cls, mask in zip(
        instances.pred_boxes.tensor.tolist(),
        instances.scores.tolist(),
        instances.pred_classes.tolist(),
        instances.pred_masks.numpy(),
    ):
        x0, y0, x1, y1 = box
        out.append((names[cls], score, [x0, y0, x1 - x0, y1 - y0], mask))
    return out


def check_same(answer_image, expected):
    dets = answer_image["detections"]
    assert len(dets) == len(expected) > 0
    for det, (name, score, box, mask) in zip(dets, expected):
        assert det["category_name"] == name
        assert det["score"] == pytest.approx(score, abs=1e-5)
        assert det["bbox"] == pytest.approx(box, abs=0.01)
        rle = dict(det["segmentation"], counts=det["segmentation"]["counts"].encode())
        assert np.array_equal(mask_util.decode(rle), mask.astype(np.uint8))


def test_api_answers_what_the_predictor_finds(server, reference, toy):
    _, _, images = toy
    r = post(
        server.url,
        [image_file(images[0]), image_file(images[1])],
        vocabulary=", ".join(NAMES_A),
        threshold="0.3",
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["vocabulary"] == NAMES_A and answer["errors"] == []
    assert answer["bbox_mode"] == "XYWH_ABS"
    # Novel = not among the training names (tests/tiny_world.py TRAIN_NAMES).
    assert answer["novel_classes"] == [n for n in NAMES_A if n not in TRAIN_NAMES]
    assert [im["file_name"] for im in answer["images"]] == [images[0].name, images[1].name]
    for image, path in zip(answer["images"], images[:2]):
        h, w = cv2.imread(str(path)).shape[:2]
        assert (image["height"], image["width"]) == (h, w)
        check_same(image, expected_detections(reference, path, NAMES_A, 0.3))
    assert answer["time_ms"]["total"] > 0
    # A built-in vocabulary: the model's own (the checkpoint's training names here).
    r = post(server.url, [image_file(images[0])], builtin="model", threshold="0.3")
    assert r.status_code == 200, r.text
    assert r.json()["vocabulary"] == TRAIN_NAMES
    check_same(r.json()["images"][0], expected_detections(reference, images[0], TRAIN_NAMES, 0.3))


def test_concurrent_requests_each_get_their_own_vocabulary(server, reference, toy):
    _, _, images = toy
    image = images[2]
    expected = {
        tuple(names): expected_detections(reference, image, names, 0.2)
        for names in (NAMES_A, NAMES_B)
    }
    # Scores differ between the vocabularies: a forward run with the other vocabulary's
    # embeddings would show even where the names come out right.
    scores = [[d[1] for d in e] for e in expected.values()]
    assert scores[0] != scores[1]
    threads, per_thread = 6, 4
    barrier = threading.Barrier(threads)
    answers, failures = [], []

    def client(k):
        with httpx.Client(timeout=120) as http:
            barrier.wait()  # all at once
            for i in range(per_thread):
                names = NAMES_A if (k + i) % 2 == 0 else NAMES_B  # interleaved
                r = http.post(
                    f"{server.url}/api/detect",
                    files=[image_file(image)],
                    data={"vocabulary": ",".join(names), "threshold": "0.2"},
                )
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    answers.append((names, r.json()))

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []
    assert len(answers) == threads * per_thread
    for names, answer in answers:
        assert answer["vocabulary"] == names
        assert {d["category_name"] for d in answer["images"][0]["detections"]} <= set(names)
        check_same(answer["images"][0], expected[tuple(names)])


def test_same_words_are_not_encoded_twice(server, toy):
    _, _, images = toy
    clip_model = server.service.predictor.model.text_encoder.model  # the real (tiny) CLIP
    with counting_text_encodes(clip_model) as calls:
        names = "grey kite, white boat"  # never encoded before in this module
        assert post(server.url, [image_file(images[0])], vocabulary=names).status_code == 200
        assert sum(calls) == 2 * len(load_templates())  # cold: every prompt once
        calls.clear()
        for _ in range(2):
            r = post(server.url, [image_file(images[1])], vocabulary=names)
            assert r.status_code == 200 and r.json()["vocabulary"] == ["grey kite", "white boat"]
        assert calls == []  # from the predictor's memory
        server.service.predictor._vocabularies.clear()
        assert post(server.url, [image_file(images[1])], vocabulary=names).status_code == 200
        assert calls == []  # from the disk cache


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_input_gets_4xx_with_a_message_and_the_server_goes_on(server, toy):
    _, _, images = toy
    good = images[0].read_bytes()
    names = ", ".join(NAMES_A)
    huge = _png(np.zeros((7072, 7072), np.uint8))  # 50 megapixels, a few kB as PNG
    cases = [
        ([("image", ("empty.png", b"", "image/png"))], {"vocabulary": names}, 400, "empty file"),
        (
            [("image", ("notes.txt", b"hello, world\n" * 50, "text/plain"))],
            {"vocabulary": names},
            415,
            "not an image",
        ),
        (
            [("image", ("cut.png", good[: len(good) // 2], "image/png"))],
            {"vocabulary": names},
            400,
            "corrupt or truncated",
        ),
        ([("image", ("huge.png", huge, "image/png"))], {"vocabulary": names}, 413, "megapixels"),
        ([], {"vocabulary": names}, 400, "no image"),
        ([image_file(images[0])], {}, 400, "empty vocabulary"),
        ([image_file(images[0])], {"vocabulary": " , "}, 400, "empty vocabulary"),
        (
            [image_file(images[0])],
            {"vocabulary": "red star,,blue cross"},
            400,
            "empty class name (item 2 of 3)",
        ),
        ([image_file(images[0])], {"vocabulary": "red star, red star"}, 400, "duplicate"),
        (
            [image_file(images[0])],
            {"vocabulary": ",".join(f"thing {i}" for i in range(10000))},
            413,
            "10000 class names, above this server's limit of 2000",
        ),
        ([image_file(images[0])], {"builtin": "lvis_typo"}, 400, "unknown vocabulary"),
        ([image_file(images[0])], {"vocabulary": names, "threshold": "high"}, 400, "threshold"),
        ([image_file(images[0])], {"vocabulary": names, "threshold": "1.5"}, 400, "threshold"),
    ]
    for files, data, status, message in cases:
        start = time.perf_counter()
        r = post(server.url, files, **data)
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["error"], r.json()
        assert time.perf_counter() - start < 10, message  # refused, not worked on
    r = post(server.url, [image_file(images[0])], vocabulary=names)
    assert r.status_code == 200 and r.json()["images"][0]["detections"]


def _png_claiming(width, height):
    """A small PNG whose header claims width x height (no pixel data follows)."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


def test_a_request_over_the_total_pixel_limit_gets_413(server, toy):
    """Each image within the per-image limit (25 megapixels), together over the per-request
    total (100): refused from the headers, before any pixel is decoded."""
    _, _, images = toy
    big = _png_claiming(5000, 5000)  # 25.0 megapixels each; the data would not even decode
    files = [image_file(images[0])] + [
        ("image", (f"big{k}.png", big, "image/png")) for k in range(4)
    ]
    start = time.perf_counter()
    r = post(server.url, files, vocabulary=", ".join(NAMES_A))
    assert r.status_code == 413, r.text
    assert r.json()["error"].startswith(
        "5 images of 100.0 megapixels in all, above this server's 100 megapixels per request"
    )
    assert time.perf_counter() - start < 10
    assert server.service.info()["limits"]["max_request_megapixels"] == 100.0
    r = post(server.url, [image_file(images[0])], vocabulary=", ".join(NAMES_A))
    assert r.status_code == 200  # the server goes on


def test_load_benchmark_has_no_errors_nor_mixed_vocabularies(server, toy):
    _, _, images = toy
    report = run_load(
        server.url,
        server.service.predictor,
        [images[0].read_bytes()],
        [NAMES_A, NAMES_B],
        clients=3,
        seconds=2.0,
    )
    assert report["server"]["requests"] > 0 and report["direct"]["requests"] > 0
    assert report["server"]["errors"] == 0 and report["server"]["mixed_up"] == 0
    for side in ("server", "direct"):
        assert 0 < report[side]["p50_ms"] <= report[side]["p95_ms"]


def test_serve_tool_bad_config_or_weights_is_one_line_exit_2(toy, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vild_serve_tool", "tools/serve.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config_file, opts, _ = toy
    weights = opts[opts.index("MODEL.WEIGHTS") + 1]
    truncated = tmp_path / "truncated.pth"
    data = open(weights, "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    bad_yaml = tmp_path / "serve.yaml"
    bad_yaml.write_text('_BASE_: "vild.yaml"\nMODEL:\n  DEVICE: "cpu\n  WEIGHTS: x\n')
    for config, options, message in [
        (config_file, [*opts, "MODEL.WEIGHTS", str(truncated)], "truncated.pth"),
        (str(bad_yaml), opts, f"{bad_yaml}: not valid YAML at line"),
    ]:
        assert tool.main(["--config-file", config, "--no-page", "--opts", *options]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], err  # main() returned: no exception


def test_page_pictures_draw_the_small_masks(server, toy):
    """The page's pictures from a request whose masks are kept 28 x 28 (pasted one at a time
    while drawing): every pixel of detectron2's full-size masks is drawn over."""
    from vild_d2.engine.detections import draw_detections

    _, _, images = toy
    service = server.service
    found = service.detect([(images[0].name, images[0].read_bytes())], ", ".join(NAMES_A), "", 0.0)
    (name, bgr, instances) = found.images[0]
    assert len(instances) > 0 and type(instances.pred_masks).__name__ == "ROIMasks"
    ((picture, caption),) = found.pictures()
    assert caption == images[0].name
    meta = type(service.predictor.metadata)(name="t", thing_classes=list(found.vocabulary.names))
    plain = draw_detections(bgr, instances[:0], meta)[:, :, ::-1]  # the image, drawn larger
    assert picture.shape == plain.shape
    full = service.predictor(bgr, vocabulary=found.vocabulary)["instances"]
    union = full[full.scores >= 0.0].pred_masks.any(dim=0).numpy().astype(np.uint8)
    union = cv2.resize(union, picture.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    covered = (picture != plain).any(axis=2)[union].mean()
    full_picture = draw_detections(bgr, full[full.scores >= 0.0].to("cpu"), meta)[:, :, ::-1]
    full_covered = (full_picture != plain).any(axis=2)[union].mean()  # polygons, not pixels
    assert union.sum() > 0 and covered > full_covered - 0.03, (covered, full_covered)
