"""The benchmark datasets, registered through the same functions as on import, over tiny datasets
written in the real on-disk formats (LVIS v1 json, COCO json, VOC xml + ImageSets)."""

import vild_d2  # noqa: F401  (first: compat bridges)

import json
import math
import os
from itertools import islice
from pathlib import Path

import pytest
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_FILE_NAMES
from detectron2.data.samplers import RepeatFactorTrainingSampler

from vild_d2.text.categories import coco_ov_split, lvis_v1_categories
from vild_d2.data.datasets import (
    prepare_coco_ovd_json,
    register_coco_2017_val,
    register_coco_ovd,
    register_lvis_v1_ovd,
    register_objects365_v2_val,
    register_voc_2007_test,
)
from vild_d2.text import TextEncoder
from vild_d2.text.vocabulary import vocabulary_from_dataset
from tiny_datasets import (  # tests/ helper
    coco_picks,
    lvis_picks,
    write_coco_json,
    write_lvis_json,
    write_voc,
)

# --- LVIS v1 open-vocabulary ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lvis_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    p = lvis_picks()
    write_lvis_json(
        root / "lvis" / "lvis_v1_train.json",
        "train2017",
        [
            (1, [(p["F1"], (10, 10, 30, 30)), (p["R1"], (50, 50, 30, 30))], [], []),
            (2, [(p["F1"], (10, 10, 30, 30)), (p["C1"], (50, 50, 20, 20))], [], []),
            (3, [(p["F1"], (5, 5, 40, 40)), (p["R2"], (50, 50, 30, 30))], [p["C1"]], []),
            (4, [(p["R1"], (10, 10, 30, 30))], [], []),  # only a novel object
        ],
    )
    write_lvis_json(
        root / "lvis" / "lvis_v1_val.json",
        "val2017",
        [(11, [(p["R1"], (10, 10, 30, 30)), (p["F1"], (50, 50, 30, 30))], [], [])],
    )
    names = register_lvis_v1_ovd(str(root), prefix="t_lvis_v1")
    assert names == ["t_lvis_v1_train_base", "t_lvis_v1_train", "t_lvis_v1_val"]
    return root


def test_lvis_base_split_has_no_novel_annotation(lvis_root):
    cats = {c["id"]: c for c in lvis_v1_categories()}
    p = lvis_picks()
    base_meta = MetadataCatalog.get("t_lvis_v1_train_base")
    classes = base_meta.thing_classes
    assert len(classes) == 866
    # Contiguous id k is the k-th frequent/common category in LVIS id order.
    base_ids = sorted(i for i, c in cats.items() if c["frequency"] in "fc")
    assert classes == [cats[i]["name"] for i in base_ids]
    assert base_meta.thing_dataset_id_to_contiguous_id == {i: k for k, i in enumerate(base_ids)}

    dicts = DatasetCatalog.get("t_lvis_v1_train_base")
    assert [d["image_id"] for d in dicts] == [1, 2, 3, 4]
    got = [[classes[a["category_id"]] for a in d["annotations"]] for d in dicts]
    name = {k: cats[v]["name"] for k, v in p.items()}
    assert got == [[name["F1"]], [name["F1"], name["C1"]], [name["F1"]], []]
    # The full split keeps the rare annotations, with the 1203-class ids.
    full = DatasetCatalog.get("t_lvis_v1_train")
    assert sum(len(d["annotations"]) for d in full) == 7
    assert {a["category_id"] for d in full for a in d["annotations"]} == {
        p[k] - 1 for k in ("F1", "R1", "C1", "R2")
    }
    image = os.path.join(str(lvis_root), "coco", "train2017", f"{1:012d}.jpg")
    assert dicts[0]["file_name"] == image


def test_lvis_novel_mask_matches_frequency_field(lvis_root):
    with open(lvis_root / "lvis" / "lvis_v1_val.json") as f:
        json_cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    meta = MetadataCatalog.get("t_lvis_v1_val")
    assert meta.evaluator_type == "lvis" and len(meta.thing_classes) == 1203
    rare = [c["name"] for c in json_cats if c["frequency"] == "r"]
    assert meta.novel_classes == rare and len(rare) == 337
    assert meta.class_synonyms == [c["synonyms"] for c in json_cats]
    # Training never sees a novel class; its vocabulary has no novel mask bit set.
    assert MetadataCatalog.get("t_lvis_v1_train_base").novel_classes == []
    assert not set(rare) & set(MetadataCatalog.get("t_lvis_v1_train_base").thing_classes)


def test_lvis_repeat_factor_sampler_on_base_split(lvis_root):
    # The train loader's own path: load, drop images left without annotations (image 4 had only
    # a novel object), then repeat factors r(c) = max(1, sqrt(t / f(c))).
    dicts = get_detection_dataset_dicts(["t_lvis_v1_train_base"], filter_empty=True)
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.5)
    # f(F1) = 3/3 -> r = 1; f(C1) = 1/3 -> r = sqrt(1.5), the factor of image 2.
    assert factors.tolist() == pytest.approx([1.0, math.sqrt(1.5), 1.0])
    sampler = RepeatFactorTrainingSampler(factors, seed=0)
    assert all(0 <= i < 3 for i in islice(iter(sampler), 20))


# --- COCO 48/17 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    p = coco_picks()
    ann = root / "coco" / "annotations"
    write_coco_json(
        ann / "instances_train2017.json",
        [
            (1, [(p["B1"], (10, 10, 30, 30)), (p["N1"], (50, 50, 30, 30))]),
            (2, [(p["X"], (10, 10, 30, 30)), (p["B2"], (50, 50, 30, 30))]),
            (3, [(p["N2"], (10, 10, 30, 30))]),
        ],
    )
    write_coco_json(
        ann / "instances_val2017.json",
        [
            (11, [(p["N1"], (10, 10, 30, 30)), (p["B1"], (50, 50, 30, 30))]),
            (12, [(p["X"], (10, 60, 20, 20)), (p["B2"], (50, 50, 30, 30))]),
        ],
    )
    return root


@pytest.fixture()
def coco_ovd(coco_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VILD_D2_CACHE", str(tmp_path / "cache"))
    assert register_coco_ovd(str(coco_root), prefix="t_coco_ov") == [
        "t_coco_ov_train_base",
        "t_coco_ov_val",
    ]
    return coco_root, tmp_path / "cache"


def test_coco_base_split_has_only_base_annotations(coco_ovd):
    root, _ = coco_ovd
    split = coco_ov_split()
    p = coco_picks()
    meta = MetadataCatalog.get("t_coco_ov_train_base")
    base = sorted(split["base"], key=lambda c: c["id"])
    assert meta.thing_classes == [c["name"] for c in base] and len(base) == 48
    names = {c["id"]: c["name"] for c in COCO_CATEGORIES}
    dicts = DatasetCatalog.get("t_coco_ov_train_base")
    got = [[meta.thing_classes[a["category_id"]] for a in d["annotations"]] for d in dicts]
    assert got == [[names[p["B1"]]], [names[p["B2"]]], []]  # novel N1, N2 and X removed
    assert dicts[0]["file_name"] == os.path.join(str(root), "coco", "train2017", f"{1:012d}.jpg")


def test_coco_val_split_and_derived_json(coco_ovd):
    root, cache = coco_ovd
    split = coco_ov_split()
    p = coco_picks()
    meta = MetadataCatalog.get("t_coco_ov_val")
    assert len(meta.thing_classes) == 65 and meta.evaluator_type == "coco_ovd"
    assert sorted(meta.novel_classes) == sorted(c["name"] for c in split["novel"])
    # Registration wrote nothing; the derived ground truth goes to the cache, not next to the
    # originals.
    originals = sorted(os.listdir(root / "coco" / "annotations"))
    assert not cache.exists()
    dicts = DatasetCatalog.get("t_coco_ov_val")
    ids = [[a["category_id"] for a in d["annotations"]] for d in dicts]
    id_map = meta.thing_dataset_id_to_contiguous_id
    assert ids == [[id_map[p["N1"]], id_map[p["B1"]]], [id_map[p["B2"]]]]
    path = Path(prepare_coco_ovd_json("t_coco_ov_val"))
    assert cache in path.parents and path == Path(meta.json_file)
    derived = json.loads(path.read_text())
    assert sorted(c["id"] for c in derived["categories"]) == sorted(id_map)
    assert [a["category_id"] for a in derived["annotations"]] == [p["N1"], p["B1"], p["B2"]]
    assert len(derived["images"]) == 2
    assert sorted(os.listdir(root / "coco" / "annotations")) == originals


def test_coco_derived_json_follows_a_replaced_original(coco_ovd):
    root, cache = coco_ovd
    p = coco_picks()
    source = root / "coco" / "annotations" / "instances_val2017.json"
    before = source.read_bytes()
    try:
        path = Path(prepare_coco_ovd_json("t_coco_ov_val"))
        written = path.stat().st_mtime_ns
        assert Path(prepare_coco_ovd_json("t_coco_ov_val")).stat().st_mtime_ns == written  # hit
        # Another version of the original with an OLDER mtime (a copy restored with cp -p or
        # tar): the derived ground truth must follow it, not stay stale.
        old = source.stat().st_mtime - 3600
        write_coco_json(source, [(11, [(p["N1"], (10, 10, 30, 30))])])
        os.utime(source, (old, old))
        derived = json.loads(Path(prepare_coco_ovd_json("t_coco_ov_val")).read_text())
        assert [a["category_id"] for a in derived["annotations"]] == [p["N1"]]
        assert sorted(os.listdir(source.parent)) == ["instances_train2017.json", source.name]
    finally:
        source.write_bytes(before)


# --- transfer targets -----------------------------------------------------------------------


def test_coco_2017_val_transfer(coco_root):
    register_coco_2017_val(str(coco_root), name="t_coco_2017_val")
    dicts = DatasetCatalog.get("t_coco_2017_val")
    meta = MetadataCatalog.get("t_coco_2017_val")
    assert len(meta.thing_classes) == 80 and meta.evaluator_type == "coco"
    assert sum(len(d["annotations"]) for d in dicts) == 4  # all 80 classes kept, X too


def test_voc_readable_vocabulary_names(tmp_path, tiny_clip_path):
    write_voc(
        tmp_path,
        {"000001": [("aeroplane", (11, 21, 60, 80), False)], "000002": [("dog", (1, 1, 9, 9), 1)]},
    )
    register_voc_2007_test(str(tmp_path), name="t_voc_2007_test")
    meta = MetadataCatalog.get("t_voc_2007_test")
    # The evaluator reads class names from the xml files: thing_classes stay the file names.
    assert meta.thing_classes == list(VOC_FILE_NAMES) and meta.evaluator_type == "pascal_voc"
    d = DatasetCatalog.get("t_voc_2007_test")[0]
    # 1-based inclusive pixel indices -> 0-based coordinates (detectron2's convention).
    assert d["annotations"][0]["category_id"] == 0
    assert d["annotations"][0]["bbox"] == [10.0, 20.0, 60.0, 80.0]
    enc = TextEncoder(tiny_clip_path, templates=["a photo of {}."], cache_dir=None)
    vocab = vocabulary_from_dataset("t_voc_2007_test", enc)
    readable = {"aeroplane": "airplane", "diningtable": "dining table", "tvmonitor": "tv monitor"}
    readable.update({"pottedplant": "potted plant", "motorbike": "motorbike"})
    assert vocab.names == [readable.get(n, n) for n in VOC_FILE_NAMES]
    assert vocab.embeddings.shape == (20, 32)


def test_vocabulary_names_keep_the_novel_mask_of_thing_classes(tiny_clip_path):
    MetadataCatalog.get("t_text_names").set(
        thing_classes=["aeroplane", "tvmonitor", "dog"],
        vocabulary_names=["airplane", "tv monitor", "dog"],
        novel_classes=["tvmonitor"],
    )
    enc = TextEncoder(tiny_clip_path, templates=["a photo of {}."], cache_dir=None)
    vocab = vocabulary_from_dataset("t_text_names", enc)
    assert vocab.names == ["airplane", "tv monitor", "dog"]
    assert vocab.novel.tolist() == [False, True, False]
    MetadataCatalog.get("t_bad_text_names").set(thing_classes=["a", "b"], vocabulary_names=["a"])
    with pytest.raises(ValueError, match="1 vocabulary_names for 2 thing_classes"):
        vocabulary_from_dataset("t_bad_text_names", enc)


def test_objects365_v2_val(tmp_path):
    json_file = tmp_path / "objects365" / "annotations" / "zhiyuan_objv2_val.json"
    rows = (Path(vild_d2.__file__).parent / "assets" / "objects365_v2_names.csv").read_text()
    cats = [{"id": int(r.split(",")[0]), "name": r.split(",")[1]} for r in rows.splitlines()]
    write_coco_json(json_file, [(7, [(1, (10, 10, 30, 30)), (365, (50, 50, 20, 20))])], cats)
    data = json.loads(json_file.read_text())
    data["images"][0]["file_name"] = "images/v1/patch0/objects365_v1_00000007.jpg"
    json_file.write_text(json.dumps(data))
    register_objects365_v2_val(str(tmp_path), name="t_objects365_v2_val")
    meta = MetadataCatalog.get("t_objects365_v2_val")
    assert len(meta.thing_classes) == 365 and meta.evaluator_type == "coco"
    assert meta.thing_classes[0] == "Person"
    (d,) = DatasetCatalog.get("t_objects365_v2_val")
    assert [a["category_id"] for a in d["annotations"]] == [0, 364]
    assert d["file_name"] == os.path.join(
        str(tmp_path), "objects365", "val", "images", "v1", "patch0", "objects365_v1_00000007.jpg"
    )


# --- missing files and configs --------------------------------------------------------------


@pytest.mark.parametrize(
    "register, name, expected",
    [
        (register_lvis_v1_ovd, "m_lvis_v1_val", ["lvis/lvis_v1_val.json", "lvisdataset.org"]),
        (
            register_lvis_v1_ovd,
            "m_lvis_v1_train_base",
            ["lvis/lvis_v1_train.json", "coco/train2017"],
        ),
        (register_coco_ovd, "m_coco_ov_val", ["instances_val2017.json", "cocodataset.org"]),
        (register_voc_2007_test, "m_voc", ["VOC2007/ImageSets/Main/test.txt", "VOCtest"]),
        (
            register_objects365_v2_val,
            "m_o365",
            ["objects365/annotations/zhiyuan_objv2_val.json", "objects365.org"],
        ),
        (register_coco_2017_val, "m_coco_val", ["coco/annotations/instances_val2017.json"]),
    ],
)
def test_missing_file_is_a_clear_error(register, name, expected, tmp_path):
    if register is register_lvis_v1_ovd:
        register(str(tmp_path), prefix="m_lvis_v1")
    elif register is register_coco_ovd:
        register(str(tmp_path), prefix="m_coco_ov")
    else:
        register(str(tmp_path), name=name)
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get(name)
    message = str(e.value)
    assert f"dataset {name!r}" in message and str(tmp_path) in message
    assert "Expected layout" in message and "Nothing is downloaded" in message
    for text in expected:
        assert text in message


def _config_datasets(path):
    cfg = yaml.safe_load(Path(path).read_text())
    base = cfg.get("_BASE_")
    names = list(_config_datasets(Path(path).parent / base)) if base else []
    for key in ("TRAIN", "TEST"):
        value = cfg.get("DATASETS", {}).get(key)
        if value:
            names += [n.strip(" '\"") for n in value.strip("()").split(",") if n.strip()]
    return names


def test_every_config_dataset_is_registered():
    configs = sorted(Path("configs").rglob("*.yaml"))
    used = {n for c in configs for n in _config_datasets(c)}
    assert {"vild_lvis_v1_train_base", "vild_lvis_v1_val", "vild_coco_2017_ov_train_base"} <= used
    assert {
        "vild_coco_2017_ov_val",
        "vild_coco_2017_val",
        "vild_voc_2007_test",
        "vild_objects365_v2_val",
    } <= used
    assert used <= set(DatasetCatalog.list())
