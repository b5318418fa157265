"""A user's own COCO- or LVIS-format dataset (vild_d2.data.register_ovd_dataset, dataset YAML
files): the splits and metadata, every bad input of docs/OWN_DATA.md answered as documented, and
the evaluators' novel / base figures on hand-made data whose APs are worked out by hand."""

import vild_d2  # noqa: F401  (first: compat bridges)

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.evaluation import LVISEvaluator
from detectron2.structures import Boxes, Instances

from vild_d2.config import add_vild_config, load_config
from vild_d2.data import ViLDDatasetMapper, register_dataset_files, register_ovd_dataset
from vild_d2.engine import Trainer
from vild_d2.evaluation import COCOOpenVocabularyEvaluator

# Categories with non-contiguous ids, not listed in id order: "zebra" is the novel class.
CATS = [{"id": 9, "name": "zebra"}, {"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}]


def _ann(ann_id, image_id, cat, box, **extra):
    x, y, w, h = box
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": list(box),
        "area": w * h,
        "iscrowd": 0,
        **extra,
    }


def _write(root: Path, split: str, annotations, images=(1, 2, 3), categories=CATS, lvis=False):
    """<root>/<split>.json and 100 x 100 pictures <root>/<split>/<id>.png; returns the json."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in images:
        cv2.imwrite(str(folder / f"{i}.png"), np.full((100, 100, 3), 128, np.uint8))
        entry = {"id": i, "file_name": f"{i}.png", "height": 100, "width": 100}
        if lvis:
            entry.update(neg_category_ids=[], not_exhaustive_category_ids=[])
        entries.append(entry)
    path = root / f"{split}.json"
    doc = {"images": entries, "annotations": list(annotations), "categories": list(categories)}
    path.write_text(json.dumps(doc))
    return path


# A training json with every class annotated (zebra too: registration must remove it).
TRAIN = [
    _ann(1, 1, 5, (10, 10, 40, 40)),
    _ann(2, 1, 9, (60, 60, 30, 30)),
    _ann(3, 2, 2, (10, 10, 20, 20)),
]


def _register(tmp_path, name, train=TRAIN, val=TRAIN, novel=("zebra",), **kwargs):
    train_json = kwargs.pop("train_json", None) or _write(tmp_path, "train", train)
    val_json = kwargs.pop("val_json", None) or _write(tmp_path, "val", val)
    return register_ovd_dataset(
        name,
        train_json=str(train_json),
        train_images=str(kwargs.pop("train_images", tmp_path / "train")),
        val_json=str(val_json),
        val_images=str(tmp_path / "val"),
        novel=list(novel),
        **kwargs,
    )


def _cfg(tmp_path):
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path / "eval")
    return cfg


def test_splits_and_metadata(tmp_path):
    """Non-contiguous ids are mapped in id order (dog 2, cat 5, zebra 9); the base split has no
    zebra annotation; val keeps every class, novel_classes set, COCO's open-vocabulary
    evaluator."""
    train, val = _register(tmp_path, "own_a")
    assert (train, val) == ("own_a_train_base", "own_a_val")
    meta = MetadataCatalog.get(train)
    assert meta.thing_classes == ["dog", "cat"] and meta.novel_classes == []
    assert meta.thing_dataset_id_to_contiguous_id == {2: 0, 5: 1}
    dicts = DatasetCatalog.get(train)
    assert [[a["category_id"] for a in d["annotations"]] for d in dicts] == [[1], [0], []]
    vmeta = MetadataCatalog.get(val)
    assert vmeta.thing_classes == ["dog", "cat", "zebra"] and vmeta.novel_classes == ["zebra"]
    assert vmeta.thing_dataset_id_to_contiguous_id == {2: 0, 5: 1, 9: 2}
    assert vmeta.evaluator_type == "coco_ovd"
    assert vmeta.evaluation_tasks == ("bbox",)  # no segmentation in the json: boxes only
    vdicts = DatasetCatalog.get(val)
    assert sorted(a["category_id"] for d in vdicts for a in d["annotations"]) == [0, 1, 2]
    assert type(Trainer.build_evaluator(_cfg(tmp_path), val)) is COCOOpenVocabularyEvaluator


def test_dataset_file_through_load_config(tmp_path):
    """A dataset YAML named in MODEL.VILD.DATASET_FILES is registered by load_config, its
    paths relative to the file's folder."""
    _write(tmp_path / "data", "train", TRAIN)
    _write(tmp_path / "data", "val", TRAIN)
    f = tmp_path / "data" / "mine.yaml"
    f.write_text(
        "name: own_yaml\nformat: coco\nnovel: [zebra]\n"
        "train: {json: train.json, images: train}\nval: {json: val.json, images: val}\n"
    )
    cfg = load_config("configs/Shapes/vild.yaml", ["MODEL.VILD.DATASET_FILES", f"('{f}',)"])
    assert cfg.MODEL.VILD.DATASET_FILES == (str(f),)
    assert MetadataCatalog.get("own_yaml_val").image_root == str(tmp_path / "data" / "val")
    assert len(DatasetCatalog.get("own_yaml_train_base")) == 3
    f.write_text("name: x\ntrain: {json: a.json, images: a}\nval: {json: a.json}\nnovle: [a]\n")
    with pytest.raises(ValueError, match=r"mine.yaml: unknown keys \['novle'\]"):
        register_dataset_files([str(f)])


# --- bad input: each an error naming the file and the item, or a documented handling ---------


def test_novel_name_not_a_category(tmp_path):
    with pytest.raises(ValueError, match=r"novel class 'zebrah' is not a category of .*val.json"):
        _register(tmp_path, "own_b", novel=["zebrah"])


def test_duplicate_category_names(tmp_path):
    cats = CATS + [{"id": 11, "name": "cat"}]
    val = _write(tmp_path, "val", TRAIN, categories=cats)
    with pytest.raises(ValueError, match=r"val.json: duplicate category name 'cat' \(ids 5 and 11"):
        _register(tmp_path, "own_c", val_json=val)


def test_images_missing_on_disk(tmp_path):
    _register(tmp_path, "own_d")
    (tmp_path / "train" / "2.png").unlink()
    with pytest.raises(ValueError, match=r"train.json: 1 bad item.*\n  image id 2: .*2.png"):
        DatasetCatalog.get("own_d_train_base")


@pytest.mark.parametrize("box", [(10, 10, 0, 20), (10, 10, 20, -5)])
def test_zero_area_or_negative_box(tmp_path, box):
    train = TRAIN + [_ann(7, 3, 2, box)]
    _register(tmp_path, "own_e", train=train)
    with pytest.raises(ValueError, match=r"(?s)train.json: .*annotation id 7 \(image id 3\): bbox"):
        DatasetCatalog.get("own_e_train_base")


def test_iscrowd_kept_as_crowd_and_not_trained_on(tmp_path):
    """A crowd annotation stays in the dicts (iscrowd 1); the mapper drops it, as detectron2's
    (COCO evaluation treats it as an ignore region: test_coco_evaluator_by_hand)."""
    train = TRAIN + [_ann(8, 2, 5, (60, 60, 30, 30), iscrowd=1)]
    _register(tmp_path, "own_f", train=train)
    image2 = DatasetCatalog.get("own_f_train_base")[1]
    assert [(a["category_id"], a["iscrowd"]) for a in image2["annotations"]] == [(0, 0), (1, 1)]
    cfg = load_config("configs/Shapes/vild_text.yaml", ["INPUT.MIN_SIZE_TRAIN", "(100,)"])
    out = ViLDDatasetMapper(cfg, is_train=True)(image2)
    assert out["instances"].gt_classes.tolist() == [0]


def test_images_without_annotations_are_kept(tmp_path):
    """Image 3 has no annotation: kept in both splits (in val it counts false positives); the
    train loader's FILTER_EMPTY_ANNOTATIONS drops it, as for any detectron2 dataset."""
    _register(tmp_path, "own_g")
    assert [d["image_id"] for d in DatasetCatalog.get("own_g_val")] == [1, 2, 3]
    assert [d["image_id"] for d in DatasetCatalog.get("own_g_train_base")] == [1, 2, 3]
    loaded = get_detection_dataset_dicts(["own_g_train_base"], filter_empty=True)
    assert [d["image_id"] for d in loaded] == [1, 2]


def test_base_category_without_training_annotation(tmp_path):
    train = [a for a in TRAIN if a["category_id"] != 2]  # no dog in training
    _register(tmp_path, "own_h", train=train)
    with pytest.raises(ValueError, match=r"base categories without .*train.json: 'dog' \(id 2\)"):
        DatasetCatalog.get("own_h_train_base")


def test_image_root_is_a_file(tmp_path):
    (tmp_path / "not_a_folder.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"train_images .*not_a_folder.png is a file, not a fold"):
        _register(tmp_path, "own_i", train_images=tmp_path / "not_a_folder.png")


def test_train_and_val_categories_differ(tmp_path):
    train = _write(tmp_path, "train", TRAIN, categories=CATS + [{"id": 4, "name": "cow"}])
    _register(tmp_path, "own_j", train_json=train)
    with pytest.raises(ValueError, match=r"train json .*train.json and the val json have diff"):
        DatasetCatalog.get("own_j_train_base")


def test_val_annotation_without_area(tmp_path):
    val = [dict(a) for a in TRAIN]
    del val[1]["area"]
    _register(tmp_path, "own_k", val=val)
    with pytest.raises(
        ValueError, match=r"(?s)val.json: .*annotation id 2 \(image id 1\): no 'area'"
    ):
        DatasetCatalog.get("own_k_val")


# --- issue 27: boxes past the image's edge; names CLIP reads alike ------------------------------
# The images are 100 x 100 px. Each box below extends 50 px past one edge.
@pytest.mark.parametrize(
    "box,edge",
    [((60, 10, 90, 20), "right"), ((10, 60, 20, 90), "bottom"), ((-50, 10, 60, 20), "left")],
)
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_box_past_the_images_edge_is_refused(tmp_path, box, edge, split):
    bad = TRAIN + [_ann(7, 3, 2, box)]
    _register(tmp_path, f"own_edge_{split}_{edge}", **{split: bad})
    dataset = f"own_edge_{split}_{edge}_" + ("train_base" if split == "train" else "val")
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get(dataset)
    message = str(e.value)
    assert f"{split}.json: 1 bad item(s)" in message
    assert (
        f"annotation id 7 (image id 3): bbox {list(box)} extends 50 px past the image's {edge} edge"
        in message
    )


def test_a_box_within_a_pixel_of_the_edge_is_kept(tmp_path):
    """Float rounding of a converted json (x + w = 100.4 on a 100 px image) is not an error."""
    train = TRAIN + [_ann(7, 3, 2, (50.2, 0, 50.2, 100.9))]
    _register(tmp_path, "own_edge_ok", train=train)
    boxes = [
        a["bbox"] for d in DatasetCatalog.get("own_edge_ok_train_base") for a in d["annotations"]
    ]
    assert [50.2, 0.0, 50.2, 100.9] in boxes


@pytest.mark.parametrize(
    "name,message",
    [
        ("Cat", r"category names 'cat' \(id 5\) and 'Cat' \(id 11\) are the same name to CLIP"),
        ("ｃａｔ", r"category names 'cat' \(id 5\) and 'ｃａｔ' \(id 11\) are the same name"),
        ("c\x00at", r"category id 11: class name 'c\\x00at' has a control character"),
    ],
)
def test_category_names_clip_reads_alike_are_duplicates(tmp_path, name, message):
    val = _write(tmp_path, "val", TRAIN, categories=CATS + [{"id": 11, "name": name}])
    with pytest.raises(ValueError, match=r"val.json: " + message):
        _register(tmp_path, "own_alike_" + name.encode("unicode_escape").hex(), val_json=val)


# --- the evaluators on hand-made data ----------------------------------------------------------


def _evaluate(evaluator, dataset, dets):
    """dets: {image id: [(contiguous class, XYWH box, score)]}."""
    evaluator.reset()
    for d in DatasetCatalog.get(dataset):
        inst = Instances((d["height"], d["width"]))
        found = dets.get(d["image_id"], [])
        xyxy = [[x, y, x + w, y + h] for _, (x, y, w, h), _ in found]
        inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor([s for _, _, s in found], dtype=torch.float32)
        inst.pred_classes = torch.tensor([c for c, _, _ in found], dtype=torch.int64)
        evaluator.process([d], [{"instances": inst}])
    return evaluator.evaluate()["bbox"]


# Ground truth: cat (id 5, base) in images 1 and 2, zebra (id 9, novel) in images 1 and 3.
HAND_VAL = [
    _ann(1, 1, 5, (10, 10, 40, 40)),
    _ann(2, 1, 9, (60, 60, 30, 30)),
    _ann(3, 2, 5, (10, 10, 40, 40)),
    _ann(4, 3, 9, (20, 20, 40, 40)),
    _ann(5, 3, 2, (70, 5, 20, 20)),  # dog: in training, no detection below
]
DOG, CAT, ZEBRA = 0, 1, 2  # contiguous ids, in category id order (2, 5, 9)
HAND_DETS = {
    1: [(CAT, (10, 10, 40, 40), 0.95), (ZEBRA, (60, 60, 30, 30), 0.9)],
    2: [(CAT, (70, 70, 20, 20), 0.9), (CAT, (10, 10, 40, 40), 0.3)],
    # IoU with the ground truth (20, 20, 40, 40): 1600 / 2400 = 2/3
    3: [(ZEBRA, (20, 20, 40, 60), 0.8)],
}


def test_coco_evaluator_by_hand(tmp_path):
    """
    COCO's AP: precision at the 101 recall thresholds 0, 0.01, ..., 1 (each the best precision
    at that recall or above), averaged; AP averages it over IoU 0.5, 0.55, ..., 0.95.

    zebra (novel), 2 objects: image 1 exact (0.9), image 3 at IoU 2/3 (0.8).
      IoU 0.5 to 0.65 (4 thresholds): both hits, precision 1 at every recall: 100.
      IoU 0.7 to 0.95 (6): recall 1/2 at precision 1, never more: 51 of 101 points: 50.495.
      AP50 = 100; AP = (4 x 100 + 6 x 5100/101) / 10 = 71000/1010 = 70.297.
    cat (base), 2 objects, by score: hit (0.95), miss (0.9, image 2's empty corner), hit (0.3)
      -> (recall, precision) (1/2, 1), (1/2, 1/2), (1, 2/3) at every IoU (exact boxes);
      thresholds 0 to 0.5 (51) at precision 1, 0.51 to 1 (50) at 2/3:
      AP50 = AP = (51 + 50 x 2/3) / 101 x 100 = 83.498.
    dog (base): an object, no detection: AP 0.
    novel: AP50 100, AP 70.297; base (cat, dog): AP50 = AP = 83.498 / 2 = 41.749;
    all: AP50 = (100 + 83.498 + 0) / 3 = 61.166, AP = (70.297 + 83.498) / 3 = 51.265.
    """
    _register(tmp_path, "own_ev", val=HAND_VAL)
    evaluator = Trainer.build_evaluator(_cfg(tmp_path), "own_ev_val")
    res = _evaluate(evaluator, "own_ev_val", HAND_DETS)
    zebra_ap, cat_ap = 71000 / 1010, (51 + 50 * 2 / 3) / 101 * 100
    assert res["AP50-novel"] == pytest.approx(100)
    assert res["AP-novel"] == pytest.approx(zebra_ap)
    assert res["AP50-base"] == pytest.approx(cat_ap / 2)
    assert res["AP-base"] == pytest.approx(cat_ap / 2)
    assert res["AP50-all"] == pytest.approx((100 + cat_ap) / 3)
    assert res["AP-all"] == pytest.approx((zebra_ap + cat_ap) / 3)
    # detectron2's own per-class AP, mapped back through the non-contiguous ids.
    assert res["AP-zebra"] == pytest.approx(zebra_ap) and res["AP-dog"] == pytest.approx(0)

    # A crowd region (iscrowd 1) where image 2's miss lies: the miss is ignored, not a false
    # positive: cat is then 2 hits of 2 at precision 1: AP 100.
    crowd = HAND_VAL + [_ann(6, 2, 5, (70, 70, 20, 20), iscrowd=1)]
    _register(tmp_path / "crowd", "own_ev_crowd", val=crowd)
    evaluator = Trainer.build_evaluator(_cfg(tmp_path / "crowd"), "own_ev_crowd_val")
    res = _evaluate(evaluator, "own_ev_crowd_val", HAND_DETS)
    assert res["AP-cat"] == pytest.approx(100)
    assert res["AP50-base"] == pytest.approx(50)


def test_lvis_format_apr_is_the_novel_classes(tmp_path, monkeypatch):
    """LVIS format: APr is the declared novel classes' AP, whatever the json's frequencies say
    (zebra is marked "f" there, cat "r"): the evaluation json is rewritten (zebra "r", cat "c",
    dog without a frequency "f"), and images without LVIS's per-image fields are taken as
    exhaustively annotated. Same data and detections as the COCO case: APr = zebra's AP,
    APc = cat's, APf = dog's (0). (LVIS interpolates the same 101 points; each image's
    detections of a class are capped at 300, never reached here.)"""
    monkeypatch.setenv("VILD_D2_CACHE", str(tmp_path / "cache"))
    cats = [
        {"id": 9, "name": "zebra", "frequency": "f", "synonyms": ["zebra"]},
        {"id": 5, "name": "cat", "frequency": "r", "synonyms": ["cat", "kitty"]},
        {"id": 2, "name": "dog", "synonyms": ["dog"]},
    ]
    train = _write(tmp_path, "train", TRAIN, categories=cats)
    val = _write(tmp_path, "val", HAND_VAL, categories=cats)
    names = _register(tmp_path, "own_lv", train_json=train, val_json=val, format="lvis")
    meta = MetadataCatalog.get(names[1])
    assert meta.evaluator_type == "lvis" and meta.class_synonyms[1] == ["cat", "kitty"]
    derived = json.loads(Path(meta.json_file).read_text())
    freq = {c["name"]: c["frequency"] for c in derived["categories"]}
    assert freq == {"zebra": "r", "cat": "c", "dog": "f"}
    cfg = _cfg(tmp_path)
    cfg.TEST.DETECTIONS_PER_IMAGE = 300
    evaluator = Trainer.build_evaluator(cfg, names[1])
    assert type(evaluator) is LVISEvaluator
    res = _evaluate(evaluator, names[1], HAND_DETS)
    assert res["APr"] == pytest.approx(71000 / 1010)
    assert res["APc"] == pytest.approx((51 + 50 * 2 / 3) / 101 * 100)
    assert res["APf"] == pytest.approx(0)
    # Without novel=..., an LVIS dataset's novel classes are its "r" categories (here: cat).
    names = register_ovd_dataset(
        "own_lv2",
        train_json=str(train),
        train_images=str(tmp_path / "train"),
        val_json=str(val),
        val_images=str(tmp_path / "val"),
        format="lvis",
    )
    assert MetadataCatalog.get(names[1]).novel_classes == ["cat"]


# --- fine-tuning from another ViLD checkpoint: what the trainer's checkpointer loads ----------


@pytest.mark.parametrize(
    "saved, trained, error",
    [
        ("vild", "text", None),  # same parameters, another variant: everything loads
        ("vild_ensemble", "vild", "image_box_head.* in the checkpoint, not in the model"),
        ("vild", "ensemble", "image_box_head.*: not in the checkpoint"),
    ],
)
def test_finetune_checkpoint_of_another_variant(tmp_path, tiny_clip_path, saved, trained, error):
    """As the trainer loads MODEL.WEIGHTS (no --resume): weights only; a ViLD checkpoint must
    fit the model tensor for tensor, unless MODEL.VILD.ALLOW_PARTIAL_WEIGHTS (the trainer's
    ``partial``) lets the rest be new (docs/OWN_DATA.md, section 9)."""
    from detectron2.modeling import build_model

    from tiny_world import make_random_model
    from vild_d2.checkpoint import IncompatibleCheckpointError, ViLDCheckpointer

    config, opts = make_random_model(tmp_path, tiny_clip_path, variant=saved)
    weights = opts[opts.index("MODEL.WEIGHTS") + 1]
    model = build_model(load_config(config, [*opts, "MODEL.VILD.VARIANT", trained]))
    if error:
        with pytest.raises(IncompatibleCheckpointError, match=error):
            ViLDCheckpointer(model, str(tmp_path)).resume_or_load(weights, resume=False)
    ViLDCheckpointer(model, str(tmp_path), partial=True).resume_or_load(weights, resume=False)
