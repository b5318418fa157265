"""One way to pass settings (tools/cli/args.py): every tool with a config takes trailing
``KEY VALUE`` overrides (``--opts`` before them is the same) and ``--dataset-file``, its flags
anywhere. Each tool runs in this process, as far as its config: an override out of range must
be refused naming its key, which it can only be if it reached the config."""

import vild_d2  # noqa: F401  (first: compat bridges)

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from cli.args import add_config_arguments, parse_args, with_dataset_files
from vild_d2.config import load_config

ROOT = Path(__file__).resolve().parents[2]
# detectron2's key, range-checked by vild_d2.config (D2_RULES): [0, 1]
BAD = ["MODEL.ROI_HEADS.NMS_THRESH_TEST", "2"]
REFUSED = "MODEL.ROI_HEADS.NMS_THRESH_TEST = 2.0: must be a number in [0, 1]"


def _tool(name, monkeypatch):
    """tools/<name>.py as a module; its loggers' setup left out (they stay as they are)."""
    spec = importlib.util.spec_from_file_location(
        f"overrides_{name}", ROOT / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "setup_logger"):
        monkeypatch.setattr(module, "setup_logger", lambda name=None, **kw: logging.getLogger(name))
    return module


def _parser():
    p = argparse.ArgumentParser(prog="tool")
    add_config_arguments(p)
    p.add_argument("--input", nargs="+")
    p.add_argument("--num", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p


def test_trailing_overrides_opts_and_flags_anywhere_are_one_syntax():
    head = ["--config-file", "c.yaml", "--input", "a.png"]
    want = ["MODEL.WEIGHTS", "m.pth", "SEED", "-1"]  # a value may start with a dash
    forms = [
        [*head, "--json", "--num", "3", *want],  # trailing
        [*head, "--json", "--num", "3", "--opts", *want],  # --opts: the alias
        [*head, *want[:2], "--json", *want[2:], "--num=3"],  # flags between and after
        [*head, "--opts", *want, "--nu", "3", "--json"],  # a flag after --opts; a prefix
    ]
    for argv in forms:
        args = parse_args(_parser(), argv)
        got = (args.opts, args.input, args.num, args.json, args.config_file)
        assert got == (want, ["a.png"], 3, True, "c.yaml"), argv
        assert args.dataset_file == [] and not hasattr(args, "_opts_alias")


def test_a_list_flag_ends_at_the_first_config_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("SEED").write_text("")  # a file named like a key is a file
    argv = ["--config-file", "c", "--input", "a.png", "IMG_0001.JPG", "SEED"]
    args = parse_args(_parser(), [*argv, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", "o"])
    assert args.input == ["a.png", "IMG_0001.JPG", "SEED"]
    assert args.opts == ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", "o"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["SEED", "1", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["SEED", "1", "MODEL.DEVICE"], "the config override MODEL.DEVICE has no value"),
    ],
)
def test_a_bad_flag_or_a_key_without_value_is_argparses_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(_parser(), ["--config-file", "c.yaml", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def _dataset_file(root: Path, name: str) -> Path:
    """A one-image COCO dataset (cat, dog; dog novel) and its YAML dataset file."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "images" / "1.png")
    doc = {
        "images": [{"id": 1, "file_name": "1.png", "height": 30, "width": 40}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100}
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "a.json").write_text(json.dumps(doc))
    split = "{json: a.json, images: images}"
    f = root / f"{name}.yaml"
    f.write_text(f"name: {name}\nnovel: [dog]\ntrain: {split}\nval: {split}\n")
    return f


def test_dataset_file_is_added_to_the_configs_own(tmp_path, monkeypatch):
    own = _dataset_file(tmp_path / "own", "overrides_own")
    more = _dataset_file(tmp_path / "more", "overrides_more")
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs/Shapes/vild.yaml")
    opts = ["MODEL.VILD.DATASET_FILES", f"('{own}',)", "SEED", "3"]
    got = with_dataset_files(config, opts, ["more/overrides_more.yaml", str(own)])
    assert got == [*opts, "MODEL.VILD.DATASET_FILES", repr((str(own), str(more)))]
    cfg = load_config(config, got)  # both registered
    assert cfg.MODEL.VILD.DATASET_FILES == (str(own), str(more)) and cfg.SEED == 3
    from detectron2.data import MetadataCatalog

    assert MetadataCatalog.get("overrides_more_val").thing_classes == ["cat", "dog"]
    assert with_dataset_files(config, opts, []) == opts


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (32, 24)).save(path)
    return str(path)


def _config_tools(tmp_path, image):
    """(tool, its arguments but the overrides) for every tool that takes a config."""
    ensemble = str(ROOT / "configs/Shapes/vild_ensemble.yaml")
    return {
        "demo": ["--config-file", ensemble, "--input", image, "--output", str(tmp_path / "d")],
        "serve": ["--config-file", ensemble, "--no-page"],
        "export_model": [
            *("--config-file", ensemble, "--output", str(tmp_path / "e")),
            *("--sample-image", image),
        ],
        "precompute_proposals": [
            *("--config-file", str(ROOT / "configs/Shapes/rpn.yaml")),
            *("--dataset", "shapes_train_base", "--output", str(tmp_path / "p")),
        ],
        "train_net": [
            *("--config-file", str(ROOT / "configs/Shapes/vild.yaml")),
            *("OUTPUT_DIR", str(tmp_path / "t")),
        ],
        "convert_official_checkpoint": [
            *("--config-file", str(ROOT / "configs/LVIS-OVD/official/vild_R50_tf.yaml")),
            *("--checkpoint", str(tmp_path / "missing_ckpt"), "--output", str(tmp_path / "c.pth")),
        ],
    }


def _run(tool, argv, capsys):
    """The tool's exit status and its stderr."""
    if tool.__name__.endswith("train_net"):  # main(args): one line raised, printed by __main__
        try:
            tool.main(tool.parse_args(argv))
        except tool.InputError as e:
            return 2, str(e)
        return 0, ""
    code = tool.main(argv)
    return code, capsys.readouterr().err


def test_every_config_tool_applies_a_trailing_override(tmp_path, image, capsys, monkeypatch):
    for name, argv in _config_tools(tmp_path, image).items():
        tool = _tool(name, monkeypatch)
        for form in ([*argv, *BAD], [*argv, "--opts", *BAD]):
            code, err = _run(tool, form, capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and REFUSED in lines[0], (name, form, err)
    assert os.listdir(tmp_path) == ["in.png"]  # refused before any output


def test_every_tool_takes_dataset_file(tmp_path, image, capsys, monkeypatch):
    missing = str(tmp_path / "missing.yaml")
    runs = {name: [*argv, "--dataset-file", missing] for name, argv in
            _config_tools(tmp_path, image).items()}  # fmt: skip
    runs["build_text_classifier"] = [
        *("--clip", "c.pt", "--dataset", "d", "--output", str(tmp_path / "v.pth")),
        *("--dataset-file", missing),
    ]
    runs["precompute_clip_embeddings"] = [
        *("--proposals", "p", "--dataset", "d", "--clip", "c", "--output", str(tmp_path / "c")),
        *("--dataset-file", missing),
    ]
    for name, argv in runs.items():
        code, err = _run(_tool(name, monkeypatch), argv, capsys)
        assert code == 2 and f"dataset file {missing} not found" in err, (name, err)
    assert os.listdir(tmp_path) == ["in.png"]
