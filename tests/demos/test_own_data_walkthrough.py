"""docs/OWN_DATA.md's walk-through, run as its commands (the project's tools, in subprocesses) on
a COCO-format dataset this test writes: register (a dataset YAML, no Python) -> base and full
vocabularies -> base-only RPN -> proposals -> CLIP targets -> ViLD and ViLD-text (the latter
fine-tuned from a checkpoint of another vocabulary) -> evaluation with novel / base figures ->
demo and serve. Tiny sizes: a random tiny CLIP, configs/Shapes/* shrunk by TINY_OPTS, 4
iterations; what is checked is that every command works on the user's data, not accuracy."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from own_data import CATEGORIES, NOVEL, write_coco_dataset  # demo/ (pytest.ini pythonpath)
from tiny_world import TINY_OPTS, make_random_model, save_random_clip  # tests/ helper

REPO = Path(__file__).resolve().parents[2]
BASE = [n for n in CATEGORIES.values() if n not in NOVEL]
ITERS = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "2"]


def _leaf(path: Path, base: str, **keys) -> str:
    """A leaf config (what the walk-through has the user write): _BASE_ + a few keys."""
    lines = [f'_BASE_: "{REPO / base}"', "MODEL:", "  VILD:"]
    lines += [f"    {k}: {v}" for k, v in keys.pop("vild").items()]
    lines += [f"{k}: {v}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own_data")
    dataset_file = write_coco_dataset(
        tmp / "data" / "toy", name="toy", num_train=8, num_val=3, image_size=64
    )
    clip = save_random_clip(str(tmp / "clip.pt"))
    env = dict(os.environ, VILD_D2_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    vild = {
        "DATASET_FILES": f"('{dataset_file}',)",
        "CLIP_MODEL": f'"{clip}"',
        # The Shapes configs cache text embeddings in the checkout's output/: keep them here.
        "EMBEDDING_CACHE_DIR": f'"{tmp / "cache"}"',
    }
    datasets = {"DATASETS": "\n  TRAIN: ('toy_train_base',)\n  TEST: ('toy_val',)"}
    stores = {"DISTILL": f"\n      STORES: ('{tmp / 'stores' / 'targets'}',)"}
    configs = {
        "rpn": _leaf(
            tmp / "rpn.yaml",
            "configs/Shapes/rpn.yaml",
            vild=vild,
            DATASETS="\n  TRAIN: ('toy_train_base',)",
            OUTPUT_DIR=tmp / "rpn",
        ),
        "vild": _leaf(
            tmp / "vild.yaml",
            "configs/Shapes/vild.yaml",
            vild={**vild, **stores},
            **datasets,
            OUTPUT_DIR=tmp / "vild",
        ),
        "text": _leaf(
            tmp / "vild_text.yaml",
            "configs/Shapes/vild_text.yaml",
            vild=vild,
            **datasets,
            OUTPUT_DIR=tmp / "vild_text",
        ),
    }

    def run(*args, check=True):
        result = subprocess.run(
            [sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True
        )
        if check:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    return {"tmp": tmp, "file": dataset_file, "clip": clip, "configs": configs, "run": run}


@pytest.mark.slow
def test_walkthrough_commands(walk):
    tmp, run, configs, clip = walk["tmp"], walk["run"], walk["configs"], walk["clip"]
    # 1. Vocabularies: the base classes (training) and every class (test, novel marked).
    for dataset, out in (("toy_train_base", "base.pth"), ("toy_val", "all.pth")):
        result = run(
            "tools/build_text_classifier.py",
            "--clip",
            clip,
            "--dataset-file",
            walk["file"],
            "--dataset",
            dataset,
            "--output",
            tmp / out,
        )
    assert "K=8 D=32 novel=2" in result.stdout

    # 2. The base-only RPN, 3. its proposals, 4. their CLIP targets.
    run("tools/train_net.py", "--config-file", configs["rpn"], *TINY_OPTS, *ITERS)
    rpn = tmp / "rpn" / "model_final.pth"
    run(
        "tools/precompute_proposals.py",
        "--config-file",
        configs["rpn"],
        "--dataset",
        "toy_train_base",
        "--output",
        tmp / "stores" / "proposals",
        "--num-proposals",
        "40",
        "MODEL.WEIGHTS",
        rpn,
        *TINY_OPTS,
    )
    run(
        "tools/precompute_clip_embeddings.py",
        "--dataset-file",
        walk["file"],
        "--proposals",
        tmp / "stores" / "proposals",
        "--dataset",
        "toy_train_base",
        "--clip",
        clip,
        "--output",
        tmp / "stores" / "targets",
        "--max-proposals",
        "40",
    )
    assert (tmp / "stores" / "targets" / "header.json").is_file()

    # 5. ViLD, evaluated on toy_val at the end of training: AP50 and AP, novel / base / all.
    run("tools/train_net.py", "--config-file", configs["vild"], *TINY_OPTS, *ITERS)
    results = json.loads((tmp / "vild" / "inference" / "toy_val" / "results.json").read_text())
    for key in ("AP50-novel", "AP50-base", "AP50-all", "AP-novel", "AP-base", "AP-all"):
        assert key in results["bbox"], key
    assert "segm" in results  # the writer's polygons: masks are scored too

    # 6. ViLD-text fine-tuned from a checkpoint of another vocabulary (3 other classes): the
    # text classifier's rows are not weights, so every weight loads and the classes change.
    _, other_opts = make_random_model(tmp / "other", clip)
    other = other_opts[other_opts.index("MODEL.WEIGHTS") + 1]
    run(
        "tools/train_net.py",
        "--config-file",
        configs["text"],
        *TINY_OPTS,
        *ITERS,
        "MODEL.WEIGHTS",
        other,
    )
    assert (tmp / "vild_text" / "inference" / "toy_val" / "results.json").is_file()

    # 7. Evaluation of a trained model alone.
    weights = tmp / "vild" / "model_final.pth"
    run(
        "tools/train_net.py",
        "--config-file",
        configs["vild"],
        "--eval-only",
        *TINY_OPTS,
        "MODEL.WEIGHTS",
        weights,
        "OUTPUT_DIR",
        tmp / "eval",
    )
    again = json.loads((tmp / "eval" / "inference" / "toy_val" / "results.json").read_text())
    assert again["bbox"]["AP50-novel"] == pytest.approx(results["bbox"]["AP50-novel"], nan_ok=True)

    # 8. The demo on a val picture, with the dataset's classes as the vocabulary.
    picture = next((walk["file"].parent / "images" / "val").iterdir())
    run(
        "tools/demo.py",
        "--config-file",
        configs["vild"],
        "--input",
        picture,
        "--vocabulary",
        "toy_val",
        "--output",
        tmp / "demo",
        "--json",
        "--confidence-threshold",
        "0",
        "--opts",
        "MODEL.WEIGHTS",
        weights,
        *TINY_OPTS,
    )
    detections = json.loads((tmp / "demo" / "detections.json").read_text())
    assert detections["vocabulary"] == BASE + list(NOVEL)

    # 9. The server's API, asked for the two novel classes by name.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "tools/serve.py",
            "--config-file",
            configs["vild"],
            "--no-page",
            "--port",
            str(port),
            "--opts",
            "MODEL.WEIGHTS",
            str(weights),
            *TINY_OPTS,
        ],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", VILD_D2_CACHE=str(tmp / "cache")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                httpx.get(f"{url}/api/info", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(0.5)
        with open(picture, "rb") as f:
            answer = httpx.post(
                f"{url}/api/detect",
                files={"image": (picture.name, f.read(), "image/png")},
                data={"vocabulary": ", ".join(NOVEL), "threshold": "0"},
                timeout=120,
            )
        assert answer.status_code == 200, answer.text
        assert answer.json()["vocabulary"] == list(NOVEL)
    finally:
        server.terminate()
        server.wait(timeout=30)
