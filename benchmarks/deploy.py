"""The ``deploy`` task: the exported ViLD-ensemble (vocabulary as an input, ONNX) run by
``vild_d2_runtime`` (ONNX Runtime + numpy, no PyTorch) against the PyTorch ``ViLDPredictor``,
per image, in turns (:func:`~benchmarks.common.round_robin`), on the same photos, weights,
vocabulary (the 1203 LVIS names, rare ones novel) and thread count; both do the whole job
(resize, detector, boxes and masks to the original image). Then the runtime's cost of a
vocabulary change: new names (the exported text tower + numpy prompt ensemble, beside the
library's PyTorch TextEncoder on the same names) and names already seen.
"""

import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.export import deploy_metadata, export_onnx, export_text_encoder_onnx
from vild_d2.text import TextEncoder as LibraryTextEncoder
from vild_d2.text import Vocabulary, builtin_vocabulary, novel_mask
from vild_d2_runtime import Detector
from vild_d2_runtime import TextEncoder as RuntimeTextEncoder

from .common import round_robin
from .models import TINY_CLIP_LABEL, BenchmarkSetup, copy_text_branch_to_image_branch
from .models import zero_rpn_deltas

__all__ = ["benchmark_deploy", "benchmark_deploy_trained"]

SHAPES_CONFIG = "configs/Shapes/vild_ensemble.yaml"
# The shapes model at its own test size (configs/Shapes/Base-Shapes-R18-FPN.yaml).
SHAPES_SIZE = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256"]


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:  # not Linux
        return float("nan")


def _predictor(config_file, opts):
    """A ViLD-ensemble predictor with random weights made to do a trained model's work
    (proposals = anchors, image branch = text branch: see benchmarks/models.py)."""
    torch.manual_seed(0)
    predictor = ViLDPredictor(load_config(config_file, [*opts, "MODEL.VILD.VARIANT", "ensemble"]))
    zero_rpn_deltas(predictor.model)
    copy_text_branch_to_image_branch(predictor.model)
    return predictor


def _compare(predictor, detector, image, names, novel) -> dict:
    """How alike the two are on one photo: detections and largest differences."""
    ref = predictor(image)["instances"]
    got = detector(image, names, novel)
    out = {"detections_pytorch": len(ref), "detections_runtime": len(got["boxes"])}
    out.update(_differences(ref, got))
    return out


def _differences(ref, got) -> dict:
    """Same classes, largest box and score differences of the predictor's Instances and the
    runtime's detections, when they have as many (non-zero) detections; else {}."""
    if len(ref) != len(got["boxes"]) or not len(ref):
        return {}
    return {
        "same_classes": bool(np.array_equal(ref.pred_classes.numpy(), got["classes"])),
        "max_box_diff_px": float(np.abs(ref.pred_boxes.tensor.numpy() - got["boxes"]).max()),
        "max_score_diff": float(np.abs(ref.scores.numpy() - got["scores"]).max()),
    }


def _time_model(label, config_file, opts, setup, workdir, text_encoder, names, novel, emb):
    predictor = _predictor(config_file, opts)
    novel_rows = novel_mask(names, novel)
    predictor.set_vocabulary(Vocabulary(names, torch.from_numpy(emb), novel_rows))
    onnx_path = Path(workdir) / label / "model.onnx"
    image = predictor.preprocess(setup.images[0])["image"]
    export_onnx(
        predictor.model,
        image,
        str(onnx_path),
        vocabulary_input=True,
        metadata=deploy_metadata(predictor),
    )
    detector = Detector(str(onnx_path), text_encoder, threads=torch.get_num_threads())
    detector.vocabulary(names, novel)  # the names' embeddings: from the text encoder's cache
    images = setup.images[:2] if setup.quick else setup.images

    @torch.no_grad()
    def pytorch():
        for im in images:
            predictor(im)

    def runtime():
        for im in images:
            detector(im, names, novel)

    seconds = round_robin({"pytorch": pytorch, "onnxruntime": runtime}, setup.repeats)
    ms = {k: 1000 * v / len(images) for k, v in seconds.items()}
    ms["onnx_file_mib"] = onnx_path.stat().st_size / 2**20
    return ms, _compare(predictor, detector, images[-1], names, novel), detector


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def benchmark_deploy(setup: BenchmarkSetup) -> dict:
    """Milliseconds per image, PyTorch predictor vs the runtime, for the shapes model and (not
    quick) the benchmark's R50-FPN, both ViLD-ensemble over the LVIS names; and the runtime's
    vocabulary-change costs."""
    load_start = _loadavg()
    lvis = builtin_vocabulary("lvis")
    # Quick: the first 60 names, so that a smoke run encodes few prompts.
    names = list(lvis.names[:60] if setup.quick else lvis.names)
    novel = [n for n in lvis.novel if n in set(names)]
    num_new = 30 if setup.quick else len(names)
    with tempfile.TemporaryDirectory() as workdir:
        library = LibraryTextEncoder(setup.clip_path, cache_dir=None, device=setup.device)
        text_encoder = Path(workdir) / "text_encoder.onnx"
        export_text_encoder_onnx(library, str(text_encoder))
        runtime_text = RuntimeTextEncoder(str(text_encoder), threads=torch.get_num_threads())
        # New names, side by side: the same names through each (the cache starts empty).
        new = names[:num_new]
        _ = library.model  # CLIP loaded before the timing, as the runtime's session is
        start = time.perf_counter()
        library.encode(new)
        pytorch_new = 1000 * (time.perf_counter() - start) * len(names) / num_new
        start = time.perf_counter()
        runtime_text.encode(new)
        runtime_new = 1000 * (time.perf_counter() - start) * len(names) / num_new
        emb = runtime_text.encode(names)  # the rest too, when quick
        shapes_opts = [*setup.opts, *SHAPES_SIZE]
        models = [("shapes_r18_fpn", SHAPES_CONFIG, shapes_opts)]
        if not setup.quick:
            models.append(("r50_fpn", setup.config_file, setup.opts))
        per_image, alike, ratios = {}, {}, {}
        for label, config_file, opts in models:
            ms, same, detector = _time_model(
                label, config_file, opts, setup, workdir, runtime_text, names, novel, emb
            )
            ms["onnx_file_mib"] = round(ms["onnx_file_mib"], 1)
            per_image[label], alike[label] = ms, same
            ratios[f"deploy_runtime_vs_pytorch_{label}"] = ms["onnxruntime"] / ms["pytorch"]
        # Names seen before: the vocabulary's own LRU (the same list again), and a new list of
        # known names (a shuffled LVIS: every name from the per-name cache, stacked anew).
        coco = builtin_vocabulary("coco").names
        runtime_text.encode(coco)
        detector.vocabulary(coco)
        switch = _median_ms(
            lambda: (detector.vocabulary(names, novel), detector.vocabulary(coco)), 50
        )
        shuffled = [random.Random(i).sample(names, len(names)) for i in range(20)]
        lists = iter(shuffled)
        known = _median_ms(lambda: detector.vocabulary(next(lists)), len(shuffled))
    return {
        "deploy_ms_per_image": per_image,
        "deploy_vocabulary_ms": {
            "new_1203_names_runtime": runtime_new,
            "new_1203_names_pytorch_text_encoder": pytorch_new,
            "cached_vocabulary_switch_runtime": switch / 2,
            "known_1203_names_new_list_runtime": known,
        },
        "ratios": ratios,
        "deploy_extra": {
            "alike_last_image": alike,
            "vocabulary": f"LVIS v1 names ({len(names)}), the rare ones ({len(novel)}) novel",
            "text_encoder": TINY_CLIP_LABEL + ", exported to ONNX",
            "new_names_measured_on": num_new,
            "onnxruntime_threads": torch.get_num_threads(),
            "loadavg_1min_start_end": [load_start, _loadavg()],
            "cpu_count": os.cpu_count(),
        },
    }


# The grid of issue 30 on a trained model (``--weights``): thread counts, vocabulary sizes,
# score thresholds (the config's, 0.0 in configs/Shapes, and detectron2's default 0.05).
GRID_THREADS = (1, 2)
GRID_SIZES = (6, 56, 1203)
GRID_THRESHOLDS = (0.0, 0.05)


def grid_vocabularies(world_names: Sequence[str]) -> Dict[int, List[str]]:
    """K -> names: the model's world names first, then LVIS names (none repeated), for each K
    of :data:`GRID_SIZES` (K = 1203: the whole LVIS list, the world's names in front)."""
    extra = [n for n in builtin_vocabulary("lvis").names if n not in set(world_names)]
    pool = [*world_names, *extra]
    return {k: pool[:k] for k in GRID_SIZES}


def grid_images(world_image: np.ndarray, photo: np.ndarray) -> Dict[str, np.ndarray]:
    """The two images: one of the model's world (128 px) and a photo of 1000 x 333."""
    return {
        f"{world_image.shape[1]}x{world_image.shape[0]}": world_image,
        "1000x333": cv2.resize(photo, (1000, 333), interpolation=cv2.INTER_AREA),
    }


def benchmark_deploy_trained(setup: BenchmarkSetup, config_file: str, weights: str) -> dict:
    """Median ms per image of the PyTorch predictor and the runtime on a trained ViLD-ensemble
    (``weights``), each side doing the whole job (resize, detector, boxes, every mask pasted
    on the original image), for every cell of threads x K x score threshold x image; with
    each cell's detections compared."""
    load_start = _loadavg()
    predictors = {
        thresh: ViLDPredictor(
            load_config(
                config_file,
                ["MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(thresh)],
            )
        )
        for thresh in GRID_THRESHOLDS
    }
    cfg = predictors[GRID_THRESHOLDS[0]].cfg
    vocabularies = grid_vocabularies(list(predictors[GRID_THRESHOLDS[0]].vocabulary.names))
    first = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
    world_image = cv2.imread(first, cv2.IMREAD_COLOR)
    images = grid_images(world_image, setup.images[0])
    cells, ratios = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        text_path = Path(workdir) / "text_encoder.onnx"
        export_text_encoder_onnx(LibraryTextEncoder(cfg.MODEL.VILD.CLIP_MODEL), str(text_path))
        text = RuntimeTextEncoder(str(text_path))
        for thresh in GRID_THRESHOLDS:
            predictor = predictors[thresh]
            onnx_path = Path(workdir) / f"thresh_{thresh}" / "model.onnx"
            example = predictor.preprocess(world_image)["image"]
            export_onnx(
                predictor.model,
                example,
                str(onnx_path),
                vocabulary_input=True,
                metadata=deploy_metadata(predictor),
            )
            for threads in GRID_THREADS:
                torch.set_num_threads(threads)
                detector = Detector(str(onnx_path), text, threads=threads)
                for k, names in vocabularies.items():
                    emb, novel = detector.vocabulary(names)
                    predictor.set_vocabulary(
                        Vocabulary(names, torch.from_numpy(emb), torch.from_numpy(novel))
                    )
                    for label, image in images.items():
                        cell = _time_cell(predictor, detector, image, names, setup.repeats)
                        cell.update(threads=threads, classes=k, score_thresh=thresh, image=label)
                        cells.append(cell)
                        key = f"deploy_runtime_vs_pytorch_t{threads}_k{k}_s{thresh}_{label}"
                        ratios[key] = cell["runtime_ms"] / cell["pytorch_ms"]
    return {
        "deploy_grid": cells,
        "ratios": ratios,
        "deploy_extra": {
            "model": {"config": config_file, "weights": weights},
            "timed_rounds_per_cell": setup.repeats,
            "loadavg_1min_start_end": [load_start, _loadavg()],
            "cpu_count": os.cpu_count(),
        },
    }


def _time_cell(predictor, detector, image, names, repeats: int) -> dict:
    """One cell: both sides in turns (:func:`~benchmarks.common.round_robin`), then how alike
    their last outputs are."""
    last = {}

    @torch.no_grad()
    def pytorch():
        last["pytorch"] = predictor(image)["instances"]

    def runtime():
        dets = detector(image, names)
        if "masks" in dets:
            dets["masks"] = np.asarray(dets["masks"])  # pasted, as the predictor's are
        last["runtime"] = dets

    seconds = round_robin({"pytorch": pytorch, "runtime": runtime}, repeats)
    ref, got = last["pytorch"], last["runtime"]
    return {
        "pytorch_ms": 1000 * seconds["pytorch"],
        "runtime_ms": 1000 * seconds["runtime"],
        "detections": [len(ref), len(got["boxes"])],
        **_differences(ref, got),
    }
