"""Smoke run of the whole shapes pipeline (demo/run_shapes.py) at toy size: every stage runs the
project's tools for real (world, teacher, vocabularies, RPN, proposals, CLIP targets, four
detectors, CLIP on crops, LVIS evaluation), then a rerun finds every stage cached."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from shapes_pipeline import ShapesOptions, ShapesPipeline

# Trains, evaluates or starts processes: minutes on a CPU (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STAGES = ["world", "teacher", "vocabulary", "rpn", "proposals", "targets"]
VARIANTS = ["supervised_base", "clip_on_crops", "vild_text", "vild_image", "vild", "vild_ensemble"]
CHECK = ["--check", "vild_w2", "vild", "MODEL.VILD.DISTILL_WEIGHT", "2.0"]
NOVEL = ["red circle", "blue star", "green heart"]  # not the default: --novel must reach the world
TINY = [
    "--seed",
    "2",
    "--novel",
    *NOVEL,
    "--num-train",
    "8",
    "--num-val",
    "4",
    "--teacher-steps",
    "3",
    "--teacher-crops",
    "2",
    "--iters",
    "4",
    "--rpn-iters",
    "4",
    "--proposals",
    "16",
    *CHECK,
    "--opts",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
]


def _run(command, tmp_path):
    env = dict(os.environ, VILD_D2_CACHE=str(tmp_path / "cache"))
    args = [
        sys.executable,
        "demo/run_shapes.py",
        command,
        "--output",
        str(tmp_path / "out"),
        "--datasets",
        str(tmp_path / "ds"),
        *TINY,
    ]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("shapes")
    return tmp_path, _run("ablation", tmp_path)


def test_every_stage_writes_its_artefact(ablation):
    tmp_path, stdout = ablation
    out, world = tmp_path / "out", tmp_path / "ds" / "shapes"
    for path in [
        world / "world.json",
        world / "annotations" / "val.json",
        out / "teacher" / "tiny_clip.pt",
        out / "teacher" / "tiny_clip.json",
        out / "vocabulary" / "base.pth",
        out / "vocabulary" / "all.pth",
        out / "rpn" / "model_final.pth",
        out / "stores" / "proposals_train" / "header.json",
        out / "stores" / "clip_train" / "header.json",
        *[out / v / "model_final.pth" for v in VARIANTS + ["vild_w2"] if v != "clip_on_crops"],
    ]:
        assert path.is_file(), path
    for stage in STAGES + VARIANTS:
        assert f"[{stage}] done" in stdout, stage
    assert "zero-shot accuracy" in stdout
    spec = json.loads((world / "world.json").read_text())
    assert spec["seed"] == 2 and spec["novel"] == NOVEL
    val = json.loads((world / "annotations" / "val.json").read_text())
    assert sorted(c["name"] for c in val["categories"] if c["frequency"] == "r") == sorted(NOVEL)


def test_the_evaluator_reports_apr_for_every_variant(ablation):
    tmp_path, stdout = ablation
    out = tmp_path / "out"
    table = json.loads((out / "ablation.json").read_text())
    assert list(table) == VARIANTS + ["vild_w2"]  # the --check row last
    # The check is the vild config with its override, written to its own folder.
    config = (out / "vild_w2" / "config.yaml").read_text()
    assert "DISTILL_WEIGHT: 2.0" in config
    for variant in VARIANTS:
        # The LVIS evaluator's own numbers, as train_net wrote them.
        raw = json.loads((out / variant / "inference" / "shapes_val" / "results.json").read_text())
        for task in ("bbox", "segm"):
            assert set(table[variant][task]) == {"AP", "APr", "APc", "APf"}
            assert table[variant][task]["APr"] == pytest.approx(raw[task]["APr"], abs=0.01)
    markdown = (out / "ablation.md").read_text()
    assert "| vild_ensemble |" in markdown and "demo/run_shapes.py ablation" in markdown
    assert "--novel 'red circle' 'blue star' 'green heart'" in markdown  # the command, as run


def test_picture_and_rerun_is_cached(ablation):
    tmp_path, _ = ablation
    picture = tmp_path / "out" / "vild_ensemble_val_detections.png"
    image = cv2.imread(str(picture))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 1000
    stdout = _run("demo", tmp_path)  # the ablation trained vild_ensemble: nothing to redo
    for stage in STAGES + ["vild_ensemble"]:
        assert f"[{stage}] cached" in stdout, stage
    assert "running" not in stdout
    assert "novel val objects found by vild_ensemble" in stdout
    summary = json.loads((tmp_path / "out" / "run_demo.json").read_text())
    for kind in ("base", "novel"):  # the targets' diagnostics, as fractions
        assert 0.0 <= summary["targets"][kind]["recall"] <= 1.0
    assert "novel: proposal recall@0.5" in stdout
    boxes = summary["distill_boxes"]  # what the distillation boxes lie on: fractions of all
    assert set(boxes) == {"object", "part", "background"}
    assert sum(b["fraction"] for b in boxes.values()) == pytest.approx(1.0)
    detections = summary["novel_detections"]["vild_ensemble"]
    assert set(detections) == {"correct", "other_class", "part", "background"}


def test_stage_cache_keys(tmp_path):
    """A stage reruns when its command, a config it reads, an upstream stage or its validity
    check changes, and its stale outputs are deleted first (the tools resume what they find)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("A: 1\n")
    (tmp_path / "configs" / "x.yaml").write_text('_BASE_: "base.yaml"\n')
    log = []
    pipe = ShapesPipeline(ShapesOptions(output=str(tmp_path / "out")), tmp_path, log=log.append)
    out, stale = tmp_path / "made.txt", tmp_path / "stale"

    def stage(text, after=(), valid=None):
        stale.mkdir(exist_ok=True)
        cmd = ["-c", f"open({str(out)!r}, 'a').write({text!r})"]
        pipe._stage(
            "s", [cmd], [out], after=after, clean=[stale], configs=["configs/x.yaml"], valid=valid
        )
        return log[-1]

    assert "done" in stage("1") and not stale.exists()
    assert "cached" in stage("1") and stale.exists()
    assert "done" in stage("2") and out.read_text() == "12"  # command changed
    (tmp_path / "configs" / "base.yaml").write_text("A: 2\n")  # a _BASE_ file changed
    assert "done" in stage("2")
    assert "cached" in stage("2")
    pipe.keys["up"] = "other"
    assert "done" in stage("2", after=["up"])  # an upstream stage's key changed
    assert "done" in stage("2", after=["up"], valid=lambda: False)
    out.unlink()
    assert "done" in stage("2", after=["up"])  # an output went missing
    bad = ["-c", "raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="stage 'b' failed \\(exit 3\\)"):
        pipe._stage("b", [bad], [out])


def test_side_by_side_runs_branches_at_once_one_core_each(tmp_path):
    """Independent stages run at the same time, the cores split between them: branch a's tool
    waits for a file that branch b's tool writes, so run one after the other, a would fail;
    when the other branch ends, a's threads file hands it both cores. The second branch's
    output goes to its log; a failing branch raises once both finished."""
    log = []
    pipe = ShapesPipeline(ShapesOptions(output=str(tmp_path / "out")), tmp_path, log=log.append)
    flag, seen = tmp_path / "b_started", tmp_path / "threads"

    def tool(name, code):
        def stage():
            pipe._stage(name, [["-c", code]], [tmp_path / name])

        stage.__name__ = f"run_{name}"
        return stage

    record = "import os; open({!r}, 'a').write(os.environ.get('OMP_NUM_THREADS', '-') + ' ')"
    wait_for_b = (
        "import time, pathlib\n"
        f"for _ in range(600):\n    if pathlib.Path({str(flag)!r}).exists(): break\n"
        "    time.sleep(0.1)\nelse:\n    raise SystemExit('b never started')\n"
        "import os\nshare = pathlib.Path(os.environ['VILD_D2_THREADS_FILE'])\n"
        "for _ in range(600):\n    if share.read_text() == '2': break\n"
        "    time.sleep(0.1)\nelse:\n    raise SystemExit('the cores never came')\n"
        f"{record.format(str(seen))}; open({str(tmp_path / 'a')!r}, 'w').write('a')"
    )
    b = (
        f"open({str(flag)!r}, 'w').write('1'); print('hello from b'); "
        f"{record.format(str(seen))}; open({str(tmp_path / 'b')!r}, 'w').write('b')"
    )

    def write(n):
        return f"open({str(tmp_path / n)!r}, 'w').write({n!r})"

    pipe.side_by_side([tool("a", wait_for_b)], [tool("b", b), tool("c", write("c"))], cores=2)
    assert all((tmp_path / n).exists() for n in "abc")
    assert seen.read_text().split() == ["1", "1"]  # one thread each, 2 cores split
    assert "hello from b" in (tmp_path / "out" / "stages" / "b.log").read_text()

    for n in "abc":
        (tmp_path / n).unlink()
    (tmp_path / "out" / "stages" / "c.json").unlink()
    with pytest.raises(RuntimeError, match="stage 'c' failed .*c.log"):
        # c fails; a still runs to the end before the error is raised
        pipe.side_by_side(
            [tool("a", "import time; time.sleep(1); " + write("a"))],
            [tool("c", "raise SystemExit(5)")],
            cores=2,
        )
    assert (tmp_path / "a").exists()


def test_given_teacher_is_keyed_by_its_content(tmp_path):
    """``--teacher FILE``: no teacher is trained; the stages after it rerun when the file's bytes
    change, and a missing file is an error naming it."""
    teacher = tmp_path / "clip.pt"
    teacher.write_bytes(b"weights 1")
    log = []
    options = ShapesOptions(output=str(tmp_path / "out"), teacher_file=str(teacher))
    pipe = ShapesPipeline(options, tmp_path, log=log.append)
    pipe.run_teacher()
    first = pipe.keys["teacher"]
    assert pipe.teacher == teacher and "given" in log[-1]
    assert not (tmp_path / "out" / "teacher").exists()  # nothing trained
    teacher.write_bytes(b"weights 2")
    pipe.run_teacher()
    assert pipe.keys["teacher"] != first
    teacher.unlink()
    with pytest.raises(FileNotFoundError, match="clip.pt"):
        pipe.run_teacher()


def test_iters_sets_the_detectors_schedule_not_the_rpns(tmp_path):
    pipe = ShapesPipeline(ShapesOptions(output=str(tmp_path / "out"), iters=600), tmp_path)
    detector = pipe._train_cmd("vild")
    assert detector[detector.index("SOLVER.MAX_ITER") + 1] == "600"
    assert detector[detector.index("SOLVER.STEPS") + 1] == "(480,)"
    assert "SOLVER.MAX_ITER" not in pipe._train_cmd("rpn")  # configs/Shapes/rpn.yaml's 600
    pipe.o.rpn_iters = 4
    rpn = pipe._train_cmd("rpn")
    assert rpn[rpn.index("SOLVER.MAX_ITER") + 1] == "4"


def test_default_teacher_is_the_frozen_clip_like_recipe(tmp_path):
    """make demo / make ablation train the teacher docs/TEACHER.md froze: captioned windows of
    scenes, 1200 steps, temperature 0.07 -> 0.01; the first teacher's recipe takes no schedule."""
    seen = {}
    for data in ("scenes", "crops"):
        pipe = ShapesPipeline(ShapesOptions(output=str(tmp_path), teacher_data=data), tmp_path)
        pipe._stage = lambda name, commands, *a, data=data, **k: seen.setdefault(data, commands[0])
        pipe.run_teacher()
    scenes, crops = seen["scenes"], seen["crops"]
    assert scenes[scenes.index("--data") + 1] == "scenes"
    assert scenes[scenes.index("--steps") + 1] == "1200"
    assert scenes[scenes.index("--temperature") + 1 :][:2] == ["0.07", "0.01"]
    assert "--temperature" not in crops


def test_detectors_run_data_parallel_and_targets_as_shards(tmp_path):
    """With 2 processes: each detector is one data-parallel run of 2 (the RPN, trained beside
    the teacher, stays one), and the targets are 2 shards of one store started at once."""
    pipe = ShapesPipeline(ShapesOptions(output=str(tmp_path / "out"), processes=2), tmp_path)
    vild = pipe._train_cmd("vild")
    assert vild[vild.index("--num-gpus") + 1] == "2"
    assert "--num-gpus" not in pipe._train_cmd("rpn")
    seen = {}
    pipe._stage = lambda name, commands, *a, **k: seen.update(commands=commands, **k)
    pipe.run_targets()
    shards = [(c[c.index("--shard") + 1], c[c.index("--num-shards") + 1]) for c in seen["commands"]]
    assert shards == [("0", "2"), ("1", "2")] and seen["at_once"]
    one = ShapesPipeline(ShapesOptions(output=str(tmp_path / "out"), processes=1), tmp_path)
    assert "--num-gpus" not in one._train_cmd("vild")


def test_stage_commands_at_once(tmp_path):
    """at_once: a stage's commands (shards) start together, the cores split between them; the
    first waits for a file the second writes, so run in turn it would fail."""
    log = []
    pipe = ShapesPipeline(ShapesOptions(output=str(tmp_path / "out")), tmp_path, log=log.append)
    pipe.cores = 2
    flag, seen, done = tmp_path / "flag", tmp_path / "threads", tmp_path / "done"
    record = f"import os; open({str(seen)!r}, 'a').write(os.environ['OMP_NUM_THREADS'] + ' ')"
    first = (
        "import time, pathlib\n"
        f"for _ in range(600):\n    if pathlib.Path({str(flag)!r}).exists(): break\n"
        "    time.sleep(0.05)\nelse:\n    raise SystemExit('the second never started')\n"
        f"{record}; open({str(done)!r}, 'w').write('x')"
    )
    second = f"{record}; open({str(flag)!r}, 'w').write('1'); print('shard 1 says hi')"
    pipe._stage("shards", [["-c", first], ["-c", second]], [done], at_once=True)
    assert seen.read_text().split() == ["1", "1"]
    assert "shard 1 says hi" in (tmp_path / "out" / "stages" / "shards.1.log").read_text()
    with pytest.raises(RuntimeError, match="stage 'bad' failed \\(exit 4\\)"):
        pipe._stage("bad", [["-c", "pass"], ["-c", "raise SystemExit(4)"]], [], at_once=True)
