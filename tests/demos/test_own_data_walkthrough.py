"""docs/OWN_DATA.md's walk-through, run as the page writes it: its ```bash blocks and its leaf
configs (```yaml blocks naming a ``my_data/`` file with a ``_BASE_``) are read from the page and
run as they are, by bash, in the work folder the page creates, with ``$HOME`` a temporary folder
that holds a stand-in checkout (``$VILD_D2``: the project's tools/ and configs/, and the two
files ``make demo`` would have written: a random tiny CLIP as its teacher, a random-init
ViLD-ensemble as its model). The data: a COCO-format dataset this test writes where the page
puts the user's (``my_data/``: non-contiguous category ids, two novel classes).

What the test adds to the page's commands, to run at tiny sizes (a random tiny CLIP, 64-pixel
pictures), each appended to the command so that the page's own flags stay in force otherwise:
``TINY_OPTS`` and a 4-iteration schedule to each ``tools/train_net.py`` line, 40 proposals to the
two precompute tools, a zero threshold to the demo, a free port to the server; the alpha loop
runs one alpha. What is checked is that every command works on the user's data, offline on a
CPU, without writing into the checkout, not accuracy."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from own_data import CATEGORIES, NOVEL, write_coco_dataset  # demo/ (pytest.ini pythonpath)
from tiny_world import TINY_OPTS, make_random_model, save_random_clip  # tests/ helper

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "OWN_DATA.md"
BASE = [n for n in CATEGORIES.values() if n not in NOVEL]
ITERS = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "2"]
# Appended to each command line of the page that runs the tool named (what the page leaves to
# its full-size recipe, shrunk).
APPENDED = {
    "tools/train_net.py": [*TINY_OPTS, *ITERS],
    "tools/precompute_proposals.py": ["--num-proposals", "40", *TINY_OPTS],
    "tools/precompute_clip_embeddings.py": ["--max-proposals", "40"],
    "tools/demo.py": ["--confidence-threshold", "0", *TINY_OPTS],
}
ALPHAS = "for a in 0 0.2 0.4 0.6 0.8 1; do"  # the page's alpha loop (one alpha here)


def walkthrough(text: str):
    """(leaf configs {my_data/...: text}, bash blocks [lines]) of the page's walk-through (the
    sections before "What your json may hold"); continued lines joined, comments removed."""
    text = text.split("## What your json may hold")[0]
    leaves, blocks = {}, []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        first = body.splitlines()[0]
        if lang == "yaml" and "_BASE_:" in body:
            leaves[first.split(":")[0].lstrip("# ").strip()] = body
        elif lang == "bash":
            joined = re.sub(r"\\\n\s*", " ", body)
            lines = [re.sub(r"\s+#.*$", "", x).rstrip() for x in joined.splitlines()]
            blocks.append([x for x in lines if x.strip()])
    return leaves, blocks


def adapted(line: str) -> str:
    """``line`` with the test's additions (module docstring)."""
    for tool, extra in APPENDED.items():
        if f"$VILD_D2/{tool}" in line:
            return line + " " + " ".join(shlex.quote(str(x)) for x in extra)
    return line.replace(ALPHAS, "for a in 0.5; do")


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    home = tmp_path_factory.mktemp("own_data")
    checkout = home / "vild_d2"  # the stand-in checkout: tools/, configs/, make demo's files
    checkout.mkdir()
    for folder in ("tools", "configs"):
        (checkout / folder).symlink_to(REPO / folder)
    teacher = save_random_clip(str(checkout / "output/shapes/teacher/tiny_clip.pt"))
    _, opts = make_random_model(home / "demo_model", teacher, variant="vild_ensemble")
    demo_model = checkout / "output/shapes/vild_ensemble/model_final.pth"
    demo_model.parent.mkdir(parents=True)
    shutil.move(opts[opts.index("MODEL.WEIGHTS") + 1], demo_model)
    env = dict(
        os.environ,
        HOME=str(home),
        VILD_D2_CACHE=str(home / "cache"),
        OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    leaves, blocks = walkthrough(DOC.read_text())
    return {"home": home, "env": env, "leaves": leaves, "blocks": blocks}


def _bash(script: str, cwd: Path, env: dict) -> str:
    result = subprocess.run(
        ["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, script + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_page_names_what_the_test_runs():
    """The page's walk-through is the one the test runs: its setup, leaf configs and tools."""
    leaves, blocks = walkthrough(DOC.read_text())
    setup = blocks[0]
    assert setup[0].startswith("export VILD_D2=$HOME/vild_d2")
    assert setup[1] == "mkdir -p ~/vild_work && cd ~/vild_work"
    assert set(leaves) == {
        "my_data/rpn.yaml",
        "my_data/vild.yaml",
        "my_data/vild_ensemble.yaml",
    }
    script = "\n".join(x for block in blocks for x in block)
    for tool in (*APPENDED, "tools/build_text_classifier.py", "tools/serve.py"):
        assert f"$VILD_D2/{tool}" in script, tool
    assert ALPHAS in script and "tools/interpolate_checkpoints.py" in script
    # every path a command writes is relative (the work folder), or under $VILD_D2 read-only
    assert "--device cuda" not in script and "--num-gpus" not in script


@pytest.mark.slow
def test_walkthrough_commands(walk):
    home, env, blocks = walk["home"], walk["env"], walk["blocks"]
    demo_model = home / "vild_d2/output/shapes/vild_ensemble/model_final.pth"
    # 0. The page's setup, as written: $VILD_D2, the work folder, the configs and CLIP links.
    _bash("\n".join(blocks[0]), home, env)
    work = home / "vild_work"
    env = dict(env, VILD_D2=str(home / "vild_d2"))  # the setup's export, for the later blocks
    assert (work / "clip.pt").resolve() == (home / "vild_d2/output/shapes/teacher/tiny_clip.pt")
    # The user's data where the page has it, and the page's leaf configs, as written.
    write_coco_dataset(work / "my_data", name="my_parts", num_train=8, num_val=3, image_size=64)
    for name, body in walk["leaves"].items():
        (work / name).write_text(body)

    serve = [b for b in blocks if any("tools/serve.py" in x for x in b)]
    logs = [_bash("\n".join(map(adapted, b)), work, env) for b in blocks[1:] if b not in serve]
    out = work / "output" / "my_parts"

    # 2. Vocabularies: the base classes (training) and every class (test, novel marked).
    assert (out / "base.pth").is_file() and "K=8 D=32 novel=2" in logs[0]
    # 3-5. The base RPN, its proposals, their CLIP targets: in the work folder.
    assert (out / "rpn" / "model_final.pth").is_file()
    assert (work / "stores" / "my_parts_train_targets" / "header.json").is_file()
    # 6. ViLD, evaluated on my_parts_val at the end of training: AP50 and AP, novel / base /
    # all, boxes and masks; ViLD-text too.
    results = json.loads((out / "vild/inference/my_parts_val/results.json").read_text())
    for key in ("AP50-novel", "AP50-base", "AP50-all", "AP-novel", "AP-base", "AP-all"):
        assert key in results["bbox"], key
    assert "segm" in results  # the writer's polygons: masks are scored too
    assert (out / "vild_text/inference/my_parts_val/results.json").is_file()
    # 7. Evaluation alone: the same figures.
    again = json.loads((out / "vild_eval/inference/my_parts_val/results.json").read_text())
    assert again["bbox"]["AP50-novel"] == pytest.approx(results["bbox"]["AP50-novel"], nan_ok=True)
    # 8. The demo on the val pictures, with the dataset's classes as the vocabulary.
    found = sorted((out / "demo").glob("detections.json*"))
    assert found, sorted(p.name for p in (out / "demo").iterdir())
    first = found[0].read_text().splitlines()[0] if found[0].suffix == ".jsonl" else None
    detections = json.loads(first or found[0].read_text())
    assert detections["vocabulary"] == BASE + list(NOVEL)
    # 9. The demo's ViLD-ensemble (3 other classes) fine-tuned with its variant's config; then
    # interpolated with it and evaluated on the held-out split, AP-all printed by the grep.
    assert (out / "vild_ft/inference/my_parts_val/results.json").is_file()
    # ... with self-distillation from the start: its loss logged, no copy of the start saved.
    metrics = [json.loads(x) for x in (out / "vild_sd/metrics.json").read_text().splitlines()]
    steps = [m for m in metrics if "total_loss" in m]  # the other line: the evaluation's
    assert steps and all("loss_self_distill" in m for m in steps)
    saved = torch.load(out / "vild_sd/model_final.pth", map_location="cpu", weights_only=True)
    start = torch.load(demo_model, map_location="cpu", weights_only=True)
    assert set(saved["model"]) == set(start["model"])
    assert (out / "wise/alpha_0.5.pth").is_file()
    assert re.search(r'eval_0\.5/.*"AP-all": ', logs[-1]), logs[-1][-2000:]
    # Nothing of the walk-through went elsewhere: the stand-in checkout holds what it held.
    assert sorted(p.name for p in (home / "vild_d2").iterdir()) == ["configs", "output", "tools"]

    # 8. The server's API, asked for the two novel classes by name.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (command,) = serve[0]
    extra = ["--no-page", "--port", str(port), *TINY_OPTS]
    server = subprocess.Popen(
        ["bash", "-c", "exec " + command + " " + " ".join(shlex.quote(x) for x in extra)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    picture = next((work / "my_data/images/val").iterdir())
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
