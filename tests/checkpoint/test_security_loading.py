"""No code runs from a file a user loads (weights .pkl / .pth, config YAML and its _BASE_,
proposal files, a --clip file), every loader in the code is a safe one, and what the tools
write is whole and never replaces a user's file unasked (issue 27, items 1, 5 and 6).

Each code-execution case loads a payload that would create a marker file, and checks that the
marker is absent: the payload was refused before it ran."""

import vild_d2  # noqa: F401  (first: compat bridges)

import ast
import collections
import errno
import functools
import importlib.util
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from PIL import Image

from tiny_world import make_random_model
from vild_d2.checkpoint import IncompatibleCheckpointError, ViLDCheckpointer
from vild_d2.config import load_config
from vild_d2.data.proposals import load_proposals_into_dataset
from vild_d2.engine.training_data import get_test_dicts, get_training_dicts
from vild_d2.safe_load import UnsafeFileError
from vild_d2.text import Vocabulary, load_clip

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickled, it would run a shell command creating ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture(autouse=True)
def _keep_loggers():
    """The tools, run in this process, add handlers bound to the captured stdout: put every
    logger back as it was afterwards, so later log lines do not go to a closed stream (and,
    if no tool had set up logging before, let the next one set it up again)."""
    from detectron2.utils.logger import setup_logger

    loggers = [logging.getLogger()] + [
        x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)
    ]
    before = {x.name: (list(x.handlers), x.propagate, x.level) for x in loggers}
    pristine = not any(logging.getLogger(n).handlers for n in ("vild_d2", "detectron2"))
    yield
    for x in list(logging.Logger.manager.loggerDict.values()) + [logging.getLogger()]:
        if isinstance(x, logging.Logger):
            handlers, propagate, level = before.get(x.name, ([], True, logging.NOTSET))
            x.handlers[:] = handlers
            x.propagate, x.level = propagate, level
    if pristine:
        setup_logger.cache_clear()


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_path):
    """A random tiny ViLD checkpoint: (config file, opts with MODEL.WEIGHTS, its state)."""
    root = tmp_path_factory.mktemp("security")
    config_file, opts = make_random_model(root, tiny_clip_path)
    state = torch.load(opts[-1], map_location="cpu", weights_only=True)["model"]
    return config_file, opts, state


def _model(world):
    config_file, opts, _ = world
    return build_model(load_config(config_file, opts))


# --- weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_detectron2_pkl_of_numpy_arrays_still_loads(world, tmp_path, protocol):
    """detectron2's model-zoo / ImageNet files: numpy arrays in (ordered) dicts."""
    state = world[2]
    arrays = collections.OrderedDict((k, v.numpy().copy()) for k, v in state.items())
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol)
    model = _model(world)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ViLDCheckpointer(model, complete=True).load(str(path))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_pkl_that_would_run_code_is_refused_unrun(world, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    arrays = {k: v.numpy() for k, v in world[2].items()}
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": _Payload(marker)}))
    with pytest.raises(IncompatibleCheckpointError) as e:
        ViLDCheckpointer(_model(world)).load(str(path))
    assert not marker.exists()
    line = _one_line(str(e.value))
    assert str(path) in line and "refused" in line and "posix.system" in line


def test_a_pth_that_would_run_code_is_refused_without_torch_advice(world, tiny_clip_path, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": world[2], "extra": _Payload(marker)}, path)
    with pytest.raises(IncompatibleCheckpointError) as e:
        ViLDCheckpointer(_model(world)).load(str(path))
    # the same file as a vocabulary and as a CLIP checkpoint
    with pytest.raises(UnsafeFileError) as as_vocabulary:
        Vocabulary.load(str(path))
    with pytest.raises(UnsafeFileError) as as_clip:
        load_clip(str(path))
    assert not marker.exists()
    for error in (e, as_vocabulary, as_clip):
        line = _one_line(str(error.value))
        assert str(path) in line and "refused" in line and "posix.system" in line
        assert "weights_only" not in line


def test_every_tool_loads_weights_through_the_safe_loader(world, tmp_path, capsys):
    """demo, serve, export_model and train_net --eval-only with MODEL.WEIGHTS evil.pkl."""
    config_file, opts, _ = world
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {}, "__author__": _Payload(marker)}))
    weights = ["MODEL.WEIGHTS", str(evil)]
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 24)).save(image)
    runs = {
        "demo": ["--input", str(image), "--output", str(tmp_path / "demo")],
        "serve": [],
        "export_model": ["--output", str(tmp_path / "export")],
    }
    for tool, args in runs.items():
        code = _tool(tool).main(["--config-file", config_file, *args, "--opts", *opts, *weights])
        assert code == 2, tool
        line = _one_line(capsys.readouterr().err)
        assert str(evil) in line and "refused" in line, (tool, line)
    train_net = _tool("train_net")
    out = ["OUTPUT_DIR", str(tmp_path / "train")]
    args = train_net.parse_args(
        ["--config-file", config_file, "--eval-only", *opts, *weights, *out]
    )
    with pytest.raises(IncompatibleCheckpointError, match="refused"):
        train_net.main(args)
    assert not marker.exists()


# --- configs -------------------------------------------------------------------------------
def test_a_config_with_a_python_tag_is_refused_unrun(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.yaml"
    evil.write_text(
        '_BASE_: "{}"\nMODEL:\n  DEVICE: !!python/object/apply:os.system ["touch \'{}\'"]\n'.format(
            REPO / "configs/Shapes/vild.yaml", marker
        )
    )
    child = tmp_path / "sub" / "child.yaml"  # the payload in its _BASE_, relative to it
    child.parent.mkdir()
    child.write_text("_BASE_: ../evil.yaml\nSEED: 3\n")
    for config in (evil, child):
        with pytest.raises(ValueError) as e:
            load_config(str(config))
        line = _one_line(str(e.value))
        assert line.startswith(f"{evil}: line 3: refused the YAML tag !!python/object/apply:os.")
    image = tmp_path / "images" / "in.png"
    image.parent.mkdir()
    Image.new("RGB", (32, 24)).save(image)
    code = _tool("demo").main(
        ["--config-file", str(child), "--input", str(image), "--output", str(tmp_path / "o")]
    )
    assert code == 2 and str(evil) in _one_line(capsys.readouterr().err)
    assert not marker.exists()
    # a Python file (a LazyConfig) is read as YAML, never run: not a mapping, one line
    python_file = tmp_path / "lazy.py"
    python_file.write_text(f"import os\nos.system(\"touch '{marker}'\")\n")
    with pytest.raises(ValueError, match="lazy.py .* is not a config"):
        load_config(str(python_file))
    assert not marker.exists()
    # a safe _BASE_ chain still loads, relative to each file, keeping its values
    (tmp_path / "sub" / "ok.yaml").write_text(
        f'_BASE_: "{REPO / "configs/Shapes/vild.yaml"}"\nSEED: 3\n'
    )
    cfg = load_config(str(tmp_path / "sub" / "ok.yaml"))
    assert cfg.SEED == 3 and cfg.MODEL.META_ARCHITECTURE == "ViLDRCNN"


# --- proposal files ------------------------------------------------------------------------
@pytest.fixture
def toy_dataset():
    name = "security_toy_proposals"
    dicts = [
        {
            "file_name": f"{i}.png",
            "image_id": i,
            "height": 20,
            "width": 20,
            "annotations": [
                {"bbox": [1, 1, 9, 9], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}
            ],
        }
        for i in (7, 8)
    ]
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(name).set(thing_classes=["thing"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _proposals_cfg(world, name, key, path):
    cfg = load_config(world[0], world[1]).clone()
    cfg.defrost()
    cfg.MODEL.LOAD_PROPOSALS = True
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = (name,)
    cfg.DATASETS[key] = (str(path),)
    return cfg


def test_a_proposal_file_that_would_run_code_is_refused_unrun(world, toy_dataset, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "proposals.pkl"
    evil.write_bytes(pickle.dumps({"ids": [7, 8], "boxes": _Payload(marker)}))
    calls = (
        lambda: get_training_dicts(
            _proposals_cfg(world, toy_dataset, "PROPOSAL_FILES_TRAIN", evil)
        ),
        lambda: get_test_dicts(
            _proposals_cfg(world, toy_dataset, "PROPOSAL_FILES_TEST", evil), toy_dataset
        ),
    )
    for call in calls:
        with pytest.raises(UnsafeFileError) as e:
            call()
        line = _one_line(str(e.value))
        assert str(evil) in line and "refused" in line and "tools/precompute_proposals.py" in line
    assert not marker.exists()


def test_a_proposal_file_of_data_is_joined(world, toy_dataset, tmp_path):
    """detectron2's format (as tools/precompute_proposals.py writes it, with the BoxMode enum
    itself): each image's boxes sorted by decreasing objectness."""
    path = tmp_path / "proposals.pkl"
    boxes = {
        7: np.array([[0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]], np.float32),
        8: np.zeros((0, 4)),
    }
    logits = {7: np.array([0.1, 0.9, 0.5], np.float32), 8: np.zeros(0)}
    with open(path, "wb") as f:
        pickle.dump(
            {
                "ids": [8, 7, 99],
                "boxes": [boxes[8], boxes[7], np.ones((1, 4))],
                "objectness_logits": [logits[8], logits[7], np.ones(1)],
                "bbox_mode": BoxMode.XYXY_ABS,
            },
            f,
        )
    dicts = get_training_dicts(_proposals_cfg(world, toy_dataset, "PROPOSAL_FILES_TRAIN", path))
    by_id = {d["image_id"]: d for d in dicts}
    np.testing.assert_array_equal(by_id[7]["proposal_boxes"], boxes[7][[1, 2, 0]])
    expected = np.array([0.9, 0.5, 0.1], np.float32)
    np.testing.assert_array_equal(by_id[7]["proposal_objectness_logits"], expected)
    assert by_id[8]["proposal_boxes"].shape == (0, 4)
    assert by_id[7]["proposal_bbox_mode"] == BoxMode.XYXY_ABS
    with pytest.raises(ValueError, match="no proposals for 1 image.*image_id 8"):
        load_proposals_into_dataset([{"image_id": 8}], _pickled(tmp_path, {"ids": [7]}))


def _pickled(tmp_path, obj):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"boxes": [], "objectness_logits": [], **obj}))
    return str(path)


# --- every loader in the code ----------------------------------------------------------------
def _is_constant(keywords, key, value) -> bool:
    return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is value


def _unsafe_calls(path: Path):
    """(line, call) of each loader call that could run code from a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = node.func.attr
        kw = {k.arg: k.value for k in node.keywords}
        const = functools.partial(_is_constant, kw)
        unsafe = (
            (owner == "torch" and name == "load" and not const("weights_only", True))
            or (owner == "pickle" and name in ("load", "loads", "Unpickler"))
            or (owner in ("np", "numpy") and name == "load" and not const("allow_pickle", False))
            or (owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"))
            or (name == "merge_from_file" and not const("allow_unsafe", False))
        )
        if unsafe and path.name != "safe_load.py":
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{name}")
    return found


def test_no_loader_in_the_code_can_run_code_from_a_file():
    files = [
        p for d in ("vild_d2", "vild_d2_runtime", "tools", "demo") for p in (REPO / d).rglob("*.py")
    ]
    found = [call for p in files for call in _unsafe_calls(p)]
    assert not found, found


# --- atomic checkpoints ----------------------------------------------------------------------
class _DiskFull:
    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_save_that_fails_leaves_no_partial_file(world, tmp_path):
    model = _model(world)
    checkpointer = ViLDCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000029")
    good = (tmp_path / "model_0000029.pth").read_bytes()
    for name in ("model_0000029", "model_0000039"):  # over a complete file, and a new one
        with pytest.raises(OSError, match="No space left") as e:
            checkpointer.save(name, extra=_DiskFull())
        assert e.value.errno == errno.ENOSPC and name in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000029.pth"]
    assert (tmp_path / "model_0000029.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000029.pth"
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000029.pth")
    ViLDCheckpointer(_model(world), complete=True).load(checkpointer.get_checkpoint_file())


# --- tools: bad inputs and outputs ---------------------------------------------------------
def test_export_model_refuses_bad_inputs_and_keeps_outputs(world, tmp_path, capsys):
    config_file, opts, state = world
    export = _tool("export_model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.ts").write_text("mine")
    base = ["--config-file", config_file, "--output", str(out)]
    # 1. an existing output without --overwrite: refused before any work
    assert export.main([*base, "--opts", *opts]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.ts" in line and "--overwrite" in line
    # 2. --overwrite, with a checkpoint of another model (a tensor missing)
    partial = tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in state.items() if "box_head" not in k}}, partial)
    assert export.main([*base, "--overwrite", "--opts", *opts, "MODEL.WEIGHTS", str(partial)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(partial) in line and "box_head" in line
    # 3. a sample image over the default 100 megapixels (its header says 12000 x 9000)
    big = tmp_path / "big.png"
    Image.new("1", (12000, 9000)).save(big)
    assert export.main([*base, "--overwrite", "--sample-image", str(big), "--opts", *opts]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(big) in line and "12000x9000" in line and "--max-megapixels" in line
    assert (out / "model.ts").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["model.ts"]


def test_build_text_classifier_refuses_bad_inputs_and_keeps_outputs(
    tiny_clip_path, tmp_path, capsys
):
    tool = _tool("build_text_classifier")
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload(marker)}, evil)
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n" * 20)
    out = tmp_path / "v.pth"
    base = ["--names", "cat,dog", "--cache-dir", "", "--device", "cpu", "--output", str(out)]
    for clip_file, says in ((text, "is not a CLIP checkpoint"), (evil, "refused")):
        assert tool.main(["--clip", str(clip_file), *base]) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(clip_file) in line and says in line and "weights_only" not in line
    assert not out.exists() and not marker.exists()
    out.write_text("mine")
    assert tool.main(["--clip", tiny_clip_path, *base]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(out) in line and "--overwrite" in line and out.read_text() == "mine"
    assert tool.main(["--clip", tiny_clip_path, *base, "--overwrite"]) == 0
    assert Vocabulary.load(str(out)).names == ["cat", "dog"]
