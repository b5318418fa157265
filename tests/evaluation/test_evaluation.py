"""Evaluation of the benchmarks on hand-made data: the numbers are worked out by hand.

Predictions are real ``Instances`` fed through ``evaluator.reset/process/evaluate`` of the
evaluator ``Trainer.build_evaluator`` picks from the dataset's ``evaluator_type``.
"""

import vild_d2  # noqa: F401  (first: compat bridges)

import json
import logging
from pathlib import Path

import cv2
import numpy as np

import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_FILE_NAMES
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
)
from detectron2.structures import Boxes, Instances

from vild_d2.config import add_vild_config
from vild_d2.data.datasets import (
    register_coco_ovd,
    register_lvis_v1_ovd,
    register_objects365_v2_val,
    register_voc_2007_test,
)
from vild_d2.engine import Trainer
from vild_d2.evaluation import COCOOpenVocabularyEvaluator
from tiny_world import TINY_OPTS  # tests/ helper
from tiny_datasets import (  # tests/ helper
    coco_picks,
    lvis_picks,
    write_coco_json,
    write_lvis_json,
    write_voc,
)

# Recall 1/2 at precision 1 under the 101-point interpolation of COCO and LVIS: the recall
# thresholds 0, 0.01, ..., 0.50 (51 of 101) have precision 1, the others 0.
HALF_RECALL_AP = 100 * 51 / 101


def _cfg(tmp_path):
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path)
    return cfg


def _box_mask(box, h, w):
    """(h, w) bool: the polygon of an XYWH box, rasterised by pycocotools as ground truth is."""
    x, y, bw, bh = box
    rles = mask_util.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)
    return torch.from_numpy(mask_util.decode(mask_util.merge(rles)).astype(bool))


def _instances(size, dets, masks=False):
    """dets: [(contiguous class, XYWH box, score)] -> Instances with XYXY boxes (and masks)."""
    inst = Instances(size)
    xyxy = [[x, y, x + bw, y + bh] for _, (x, y, bw, bh), _ in dets]
    inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([s for _, _, s in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([c for c, _, _ in dets], dtype=torch.int64)
    if masks:
        per_det = [_box_mask(b, *size) for _, b, _ in dets]
        inst.pred_masks = torch.stack(per_det) if dets else torch.zeros((0, *size), dtype=bool)
    return inst


def _run(evaluator, dataset_name, dets_per_image, masks=False):
    evaluator.reset()
    for d in DatasetCatalog.get(dataset_name):
        size = (d["height"], d["width"])
        outputs = [{"instances": _instances(size, dets_per_image.get(d["image_id"], []), masks)}]
        evaluator.process([d], outputs)
    return evaluator.evaluate()


# --- LVIS: APr / APc / APf --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lvis_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    p = lvis_picks()
    box, elsewhere = (10, 10, 30, 30), (60, 60, 30, 30)
    write_lvis_json(
        root / "lvis" / "lvis_v1_val.json",
        "val2017",
        [
            # image id, ground truth, neg_category_ids, not_exhaustive_category_ids
            (1, [(p["R1"], box), (p["R2"], elsewhere)], [], []),
            (2, [(p["F1"], box)], [], [p["F1"]]),  # F1 not exhaustively annotated here
            (3, [(p["F2"], box)], [], []),
            (4, [(p["C1"], box)], [], []),
            (5, [], [p["C1"]], []),  # verified: no C1 here
            (6, [], [], []),  # C1 unverified here
        ],
    )
    register_lvis_v1_ovd(str(root), prefix="e_lvis_v1")
    return "e_lvis_v1_val", p


def test_lvis_ap_by_frequency(lvis_val, tmp_path):
    name, p = lvis_val
    cls = {k: v - 1 for k, v in p.items()}  # contiguous ids over the 1203 classes
    box, elsewhere = (10, 10, 30, 30), (60, 60, 30, 30)
    cfg = _cfg(tmp_path)
    cfg.TEST.DETECTIONS_PER_IMAGE = 300
    evaluator = Trainer.build_evaluator(cfg, name)
    assert type(evaluator) is LVISEvaluator

    # 1. Perfect detections of the novel (rare) classes only: APr = 100; the base classes with
    # ground truth (C1, F1, F2) have no detection: APc = APf = 0; AP = 2 of 5 classes = 40.
    novel_only = {1: [(cls["R1"], box, 0.9), (cls["R2"], elsewhere, 0.8)]}
    res = _run(evaluator, name, novel_only, masks=True)
    for task in ("bbox", "segm"):
        assert res[task]["APr"] == pytest.approx(100)
        assert res[task]["APc"] == pytest.approx(0)
        assert res[task]["APf"] == pytest.approx(0)
        assert res[task]["AP"] == pytest.approx(40)

    # 2. Add base detections, each class with one correct box (score 0.5-0.6) and one wrong box
    # scored higher (0.9):
    #  F1: the wrong box is in image 2, which lists F1 as not exhaustive -> ignored: AP 100.
    #  F2: the wrong box is a false positive ranked first -> precision 1/2 at recall 1: AP 50.
    #  C1: a wrong box in image 5 (C1 verified absent) is a false positive; one in image 6
    #      (C1 unverified) is ignored -> AP 50.
    # APr = 100, APc = 50, APf = (100 + 50) / 2 = 75, AP = (100 + 100 + 50 + 100 + 50) / 5 = 80.
    dets = dict(novel_only)
    dets[2] = [(cls["F1"], box, 0.5), (cls["F1"], elsewhere, 0.9)]
    dets[3] = [(cls["F2"], box, 0.5), (cls["F2"], elsewhere, 0.9)]
    dets[4] = [(cls["C1"], box, 0.6)]
    dets[5] = [(cls["C1"], box, 0.9)]
    dets[6] = [(cls["C1"], box, 0.95)]
    res = _run(evaluator, name, dets, masks=True)
    for task in ("bbox", "segm"):
        assert res[task]["APr"] == pytest.approx(100)
        assert res[task]["APc"] == pytest.approx(50)
        assert res[task]["APf"] == pytest.approx(75)
        assert res[task]["AP"] == pytest.approx(80)

    # Control: without image 2's not-exhaustive flag F1 would score like F2 (AP 50).
    data = json.loads(Path(MetadataCatalog.get(name).json_file).read_text())
    data["images"][1]["not_exhaustive_category_ids"] = []
    control = tmp_path / "lvis" / "lvis_v1_val.json"
    control.parent.mkdir()
    control.write_text(json.dumps(data))
    register_lvis_v1_ovd(str(tmp_path), prefix="e_lvis_ctrl")
    res = _run(Trainer.build_evaluator(cfg, "e_lvis_ctrl_val"), "e_lvis_ctrl_val", dets)
    assert res["bbox"]["APf"] == pytest.approx(50)


# --- COCO 48/17: box AP50 on novel / base / all -----------------------------------------------


@pytest.fixture(scope="module")
def coco_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    p = coco_picks()
    write_coco_json(
        root / "coco" / "annotations" / "instances_val2017.json",
        [
            (1, [(p["N1"], (10, 10, 30, 30)), (p["B1"], (50, 50, 30, 30))]),
            (2, [(p["N2"], (10, 10, 30, 30)), (p["B1"], (50, 50, 30, 30))]),
            # X is outside the 65 classes: the benchmark's ground truth drops it.
            (3, [(p["B2"], (10, 10, 30, 30)), (p["X"], (50, 50, 30, 30))]),
        ],
    )
    return root, p


def test_coco_ovd_ap50_novel_base_all(coco_val, tmp_path, monkeypatch):
    root, p = coco_val
    monkeypatch.setenv("VILD_D2_CACHE", str(tmp_path / "cache"))
    register_coco_ovd(str(root), prefix="e_coco_ov")
    name = "e_coco_ov_val"
    evaluator = Trainer.build_evaluator(_cfg(tmp_path), name)
    assert type(evaluator) is COCOOpenVocabularyEvaluator
    assert not evaluator._use_fast_impl  # pure-Python detectron2: pycocotools' COCOeval
    id_map = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    cls = {k: id_map[p[k]] for k in p if k != "X"}
    dets = {
        1: [(cls["N1"], (10, 10, 30, 30), 0.9), (cls["B1"], (50, 50, 30, 30), 0.8)],
        # IoU with the ground truth 30x30 = 900 / 1350 = 2/3: a hit at IoU 0.5 ... 0.65.
        2: [(cls["N2"], (10, 10, 30, 45), 0.9)],
    }
    res = _run(evaluator, name, dets)["bbox"]
    # Per class AP50: N1 100, N2 100 (IoU 2/3 >= 0.5), B1 one of two found, B2 none found.
    assert res["AP50-novel"] == pytest.approx(100)
    assert res["AP50-base"] == pytest.approx((HALF_RECALL_AP + 0) / 2)
    assert res["AP50-all"] == pytest.approx((100 + 100 + HALF_RECALL_AP + 0) / 4)
    # detectron2's metrics over the same 65-class ground truth (X dropped, or AP50 would be
    # averaged over 5 classes): AP50 = AP50-all; AP over IoU 0.5:0.95, N2 hit at 4 of the 10.
    assert res["AP50"] == pytest.approx(res["AP50-all"])
    assert res["AP"] == pytest.approx((100 + 40 + HALF_RECALL_AP + 0) / 4)


def test_coco_ovd_evaluator_needs_novel_classes(coco_val, tmp_path, monkeypatch):
    root, _ = coco_val
    monkeypatch.setenv("VILD_D2_CACHE", str(tmp_path / "cache"))
    register_coco_ovd(str(root), prefix="e_coco_ov2")
    with pytest.raises(ValueError, match="novel classes"):
        COCOOpenVocabularyEvaluator("e_coco_ov2_val", novel_classes=["not a class"])


# --- transfer: VOC AP50, Objects365 COCO AP ---------------------------------------------------


def test_voc_ap50(tmp_path):
    grid = {n: (1 + 100 * (k % 5), 1 + 100 * (k // 5)) for k, n in enumerate(VOC_FILE_NAMES)}
    write_voc(
        tmp_path,
        {
            # one object of each class, and a second aeroplane plus a "difficult" dog elsewhere
            "000001": [(n, (x, y, x + 59, y + 59), False) for n, (x, y) in grid.items()],
            "000002": [("aeroplane", (1, 1, 60, 60), False), ("dog", (101, 101, 160, 160), True)],
        },
    )
    name = register_voc_2007_test(str(tmp_path), name="e_voc_2007_test")
    evaluator = Trainer.build_evaluator(_cfg(tmp_path), name)
    assert type(evaluator) is PascalVOCDetectionEvaluator
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        inst = Instances((d["height"], d["width"]))
        anns = d["annotations"] if d["image_id"] == "000001" else []  # image 2: nothing found
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4))
        inst.scores = torch.full((len(anns),), 0.9)
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        evaluator.process([d], [{"instances": inst}])
    res = evaluator.evaluate()["bbox"]
    # VOC 2007 11-point AP: aeroplane at recall 1/2 -> 6 of 11 points; the difficult dog is not
    # counted, so the 19 other classes are perfect.
    assert res["AP50"] == pytest.approx((19 * 100 + 100 * 6 / 11) / 20)


def test_objects365_coco_ap(tmp_path):
    json_file = tmp_path / "objects365" / "annotations" / "zhiyuan_objv2_val.json"
    cats = [{"id": i, "name": f"o365 class {i}"} for i in range(1, 366)]
    write_coco_json(json_file, [(5, [(1, (10, 10, 30, 30)), (365, (50, 50, 40, 40))])], cats)
    data = json.loads(json_file.read_text())
    for a in data["annotations"]:
        del a["segmentation"]  # Objects365 annotates boxes only
    json_file.write_text(json.dumps(data))
    name = register_objects365_v2_val(str(tmp_path), name="e_objects365_v2_val")
    evaluator = Trainer.build_evaluator(_cfg(tmp_path), name)
    assert type(evaluator) is COCOEvaluator
    # Both objects found (contiguous ids 0 and 364 map back to Objects365 ids 1 and 365), plus a
    # lower-scored false positive: AP stays 100 (it ranks after every hit).
    found = [(0, (10, 10, 30, 30), 0.9), (364, (50, 50, 40, 40), 0.8)]
    dets = {5: found + [(0, (60, 5, 30, 30), 0.1)]}
    # A mask model (the ViLD configs' MASK_ON) predicts masks too: only boxes are scored.
    results = _run(evaluator, name, dets, masks=True)
    assert set(results) == {"bbox"}
    res = results["bbox"]
    assert res["AP"] == pytest.approx(100)
    assert res["AP-Person"] == pytest.approx(100)  # names from the package's Objects365 file


def test_unknown_evaluator_type(tmp_path):
    MetadataCatalog.get("e_no_evaluator").set(evaluator_type="cityscapes_instance")
    with pytest.raises(NotImplementedError, match="coco_ovd"):
        Trainer.build_evaluator(_cfg(tmp_path), "e_no_evaluator")


# --- --eval-only over several test datasets -------------------------------------------------


class _VocabularyRecorder(DatasetEvaluator):
    """Records the classes the model detects while a dataset is evaluated."""

    def __init__(self, model, seen):
        self.model, self.seen = model, seen

    def process(self, inputs, outputs):
        self.seen.append(list(self.model.vocabulary.names))

    def evaluate(self):
        return {}


def _write_images(folder, names, size):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def test_trainer_test_evaluates_each_dataset_with_its_vocabulary(
    coco_val, tiny_clip_path, tmp_path, monkeypatch
):
    root, _ = coco_val
    monkeypatch.setenv("VILD_D2_CACHE", str(tmp_path / "cache"))
    coco = register_coco_ovd(str(root), prefix="e2e_coco_ov")[1]
    _write_images(root / "coco" / "val2017", [f"{i:012d}.jpg" for i in (1, 2, 3)], (100, 100))
    write_voc(
        tmp_path,
        {
            "000001": [("aeroplane", (11, 21, 260, 180), False)],
            "000002": [("diningtable", (100, 100, 400, 300), False)],
        },
    )
    _write_images(tmp_path / "VOC2007" / "JPEGImages", ["000001.jpg", "000002.jpg"], (500, 500))
    voc = register_voc_2007_test(str(tmp_path), name="e2e_voc_2007_test")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of {article} {}.\n")

    cfg = _cfg(tmp_path)
    cfg.merge_from_file("configs/Shapes/Base-Shapes-R18-FPN.yaml")
    cfg.merge_from_list(
        TINY_OPTS
        + [
            "MODEL.VILD.CLIP_MODEL",
            tiny_clip_path,
            "MODEL.VILD.PROMPT_TEMPLATES",
            str(templates),
            "MODEL.VILD.EMBEDDING_CACHE_DIR",
            str(tmp_path / "embeddings"),
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            "-1.0",  # random weights: keep every box
            "DATASETS.TEST",
            f"('{coco}', '{voc}')",
            "OUTPUT_DIR",
            str(tmp_path / "output"),
        ]
    )
    model = Trainer.build_model(cfg).eval()
    before = list(model.vocabulary.names)
    seen = {coco: [], voc: []}
    evaluators = [
        DatasetEvaluators([Trainer.build_evaluator(cfg, n), _VocabularyRecorder(model, seen[n])])
        for n in (coco, voc)
    ]
    records, d2_logger = [], logging.getLogger("detectron2")
    handler, level = logging.Handler(logging.INFO), d2_logger.level
    handler.emit = records.append
    d2_logger.addHandler(handler)
    d2_logger.setLevel(logging.INFO)
    try:
        results = Trainer.test(cfg, model, evaluators)
    finally:
        d2_logger.removeHandler(handler)
        d2_logger.setLevel(level)

    assert list(results) == [coco, voc]
    assert {"AP50-novel", "AP50-base", "AP50-all"} <= set(results[coco]["bbox"])
    assert "AP50" in results[voc]["bbox"]
    # Each dataset was scored with its own classes; VOC with its readable names.
    assert seen[coco] == [MetadataCatalog.get(coco).thing_classes] * 3
    assert seen[voc][0][0] == "airplane" and "dining table" in seen[voc][0]
    assert seen[voc] == [MetadataCatalog.get(voc).vocabulary_names] * 2
    assert model.vocabulary.names == before  # restored afterwards
    # One results table per dataset.
    titles = [r.getMessage() for r in records if "in csv format" in r.getMessage()]
    assert titles == [f"Evaluation results for {n} in csv format:" for n in (coco, voc)]


def test_trainer_test_wants_one_evaluator_per_dataset(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.DATASETS.TEST = ("e_a", "e_b")
    evaluator = DatasetEvaluators([])
    with pytest.raises(ValueError, match="1 evaluators for 2 test datasets"):
        Trainer.test(cfg, object(), evaluator)
