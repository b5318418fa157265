"""The unseen-concept ablation's plumbing (demo/run_shapes.py --world unseen --seeds, issue 31):
options threaded to every stage, and mean +- spread with the ordering rule worked by hand.
In-process, no stage runs (the pipeline's smoke run: tests/demos/test_shapes_pipeline.py)."""

import dataclasses

import pytest

import run_shapes
from shapes_pipeline import ShapesOptions, ShapesPipeline
from shapes_seeds import ordering, seed_options, seeds_table, spread, summarise

NOVEL = ["red", "orange", "yellow", "green", "blue", "purple"]  # the colours, by hand


def _options(*argv):
    return run_shapes.make_options(run_shapes.parse_args(["ablation", *argv]))


def test_unseen_world_options(tmp_path):
    o = _options("--world", "unseen", "--datasets", str(tmp_path))
    assert sorted(o.novel) == sorted([n + " star" for n in NOVEL] + [n + " heart" for n in NOVEL])
    assert o.full_train and o.output == "output/shapes_unseen"
    o = _options("--world", "unseen", "--novel-shapes", "cross")
    assert sorted(o.novel) == sorted(n + " cross" for n in NOVEL)
    default = _options()
    assert not default.full_train and default.output == "output/shapes"
    assert len(default.novel) == 6 and default.detector_seed is None
    # the unseen world without its upper reference needs no train_full.json
    assert not _options("--world", "unseen", "--variants", "vild", "vild_text").full_train


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--world", "unseen", "--novel", "red star"], "--novel-shapes"),
        (["--novel-shapes", "star"], "needs --world unseen"),
        (["--world", "unseen", "--novel-shapes", "blob"], "'blob'"),
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "distinct"),
    ],
)
def test_bad_options_exit_2_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        args = run_shapes.parse_args(["ablation", *argv])
        run_shapes.make_options(args)
        run_shapes.parse_seeds(args.seeds)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_seed_sets_world_teacher_and_detectors(tmp_path):
    base = ShapesOptions(output=str(tmp_path / "out" / "unseen"), datasets=str(tmp_path / "ds"))
    o = seed_options(dataclasses.replace(base, full_train=True), 2)
    assert o.seed == 2 and o.detector_seed == 2
    assert o.output == str(tmp_path / "out" / "unseen" / "seed2")
    assert o.datasets == str(tmp_path / "ds" / "unseen_seed2")
    pipe = ShapesPipeline(o, tmp_path)
    seen = {}
    pipe._stage = lambda name, commands, outputs, *a, **k: seen.update({name: (commands, outputs)})
    pipe.run_world()
    pipe.run_teacher()
    world_cmd, outputs = seen["world"]
    assert world_cmd[0][world_cmd[0].index("--seed") + 1] == "2" and "--full-train" in world_cmd[0]
    assert outputs[-1].name == "train_full.json"
    teacher = seen["teacher"][0][0]
    assert teacher[teacher.index("--seed") + 1] == "2"
    for variant in ("rpn", "vild", "supervised_full"):
        cmd = pipe._train_cmd(variant)
        assert cmd[cmd.index("SEED") + 1] == "2", variant
    assert "SEED" not in ShapesPipeline(base, tmp_path)._train_cmd("vild")  # the config's
    assert "--full-train" not in _world_cmd(ShapesPipeline(base, tmp_path))


def _world_cmd(pipe):
    seen = []
    pipe._stage = lambda name, commands, *a, **k: seen.append(commands[0])
    pipe.run_world()
    return seen[0]


def test_spread_by_hand():
    s = spread([60.0, 64.0, 62.0])
    assert s["mean"] == 62.0 and s["spread"] == 2.0 and s["std"] == pytest.approx(2.0)
    assert spread([5.0])["spread"] == 0.0 and spread([5.0])["std"] == 0.0


def _run(apr, found=(3, 4), background=7):
    """A seed's summary as run_shapes.run_one writes it; ``apr``: {variant: box APr}."""
    return {
        "results": {
            v: {"bbox": {"AP": a + 1, "APr": a}, "segm": {"AP": a + 2, "APr": a - 1}}
            for v, a in apr.items()
        },
        "novel_found_by_variant": {
            v: {
                "red star": {"found": found[0], "objects": found[1]},
                "blue heart": {"found": 1, "objects": 2},
            }
            for v in apr
        },
        "novel_detections": {v: {"correct": 1, "background": background} for v in apr},
        "teacher": {"accuracy": 0.9, "accuracy_base": 0.95, "accuracy_novel": 0.8},
    }


def test_summary_and_the_ordering_rule_by_hand():
    # ViLD 70, 72, 74 (mean 72, spread 2); ViLD-text 60, 66, 63 (mean 63, spread 3): 9 > 5.
    runs = {
        0: _run({"vild_text": 60.0, "vild": 70.0, "vild_ensemble": 63.0}, background=4),
        1: _run({"vild_text": 66.0, "vild": 72.0, "vild_ensemble": 63.0}, background=8),
        2: _run({"vild_text": 63.0, "vild": 74.0, "vild_ensemble": 63.0}, found=(1, 4)),
    }
    summary = summarise(runs, ["vild_text", "vild", "vild_ensemble"])
    vild = summary["variants"]["vild"]
    assert vild["box APr"]["mean"] == 72.0 and vild["box APr"]["spread"] == 2.0
    assert vild["mask APr"]["mean"] == 71.0 and vild["box AP"]["mean"] == 73.0
    # found: 3+1, 3+1, 1+1 of 4+2 -> mean 10/3, spread 1; background 4, 8, 7 -> spread 2
    assert vild["novel found"]["mean"] == pytest.approx(10 / 3)
    assert vild["novel found"]["spread"] == 1.0 and vild["novel objects"]["mean"] == 6
    assert vild["novel on background"]["spread"] == 2.0
    assert summary["teacher"]["accuracy_novel"]["mean"] == pytest.approx(80.0)
    rule = ordering(summary)
    assert rule["vild_minus_text"] == 9.0 and rule["spreads_combined"] == 5.0
    assert rule["ensemble_minus_text"] == 0.0 and rule["holds"]
    table = seeds_table(summary)
    row = (
        "| vild | 73.0 ± 2.0 | 72.0 ± 2.0 | 74.0 ± 2.0 | 71.0 ± 2.0 | 3.3 ± 1.0 of 6 | 6.3 ± 2.0 |"
    )
    assert row in table and "The ordering holds" in table
    # ViLD-text 56, 70, 63 (mean 63, spread 7): ViLD's lead 9 is not MORE than 2 + 7.
    runs[0] = _run({"vild_text": 56.0, "vild": 70.0, "vild_ensemble": 63.0})
    runs[1] = _run({"vild_text": 70.0, "vild": 72.0, "vild_ensemble": 63.0})
    rule = ordering(summarise(runs, ["vild_text", "vild", "vild_ensemble"]))
    assert rule["spreads_combined"] == 9.0 and rule["vild_minus_text"] == 9.0
    assert not rule["vild_beyond_noise"] and not rule["holds"]
    # the ensemble below ViLD-text fails the rule even with ViLD far ahead
    runs = {s: _run({"vild_text": 60.0, "vild": 80.0, "vild_ensemble": 59.9}) for s in (0, 1)}
    rule = ordering(summarise(runs, ["vild_text", "vild", "vild_ensemble"]))
    assert rule["vild_beyond_noise"] and not rule["ensemble_at_least_text"]
    assert "does not hold" in seeds_table(summarise(runs, ["vild_text", "vild", "vild_ensemble"]))
    assert ordering(summarise(runs, ["vild_text"])) is None
