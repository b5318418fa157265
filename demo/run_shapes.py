#!/usr/bin/env python
"""ViLD end to end on the shapes world, on a CPU, through the project's own tools.

  python demo/run_shapes.py demo      # `make demo`: world -> teacher -> vocabularies -> base
                                       # RPN -> proposals -> CLIP targets -> ViLD -> LVIS eval
                                       # -> picture + results table
  python demo/run_shapes.py ablation  # `make ablation`: the same stages, then every variant
                                       # (supervised_base, clip_on_crops, vild_text, vild,
                                       # vild_ensemble) -> <output>/ablation.{json,md}

  python demo/run_shapes.py ablation --world unseen --seeds 0,1,2
                                       # the unseen-concept world (whole shapes novel, issue
                                       # 31): ViLD-text, ViLD-image, ViLD, ViLD-ensemble and
                                       # supervised_full, one whole run per seed, then
                                       # <output>/ablation_seeds.{json,md} (mean +- spread)

Stages are cached under --output (rerunning skips finished ones; changing --seed, --novel or a
schedule reruns what depends on it). The world goes to $DETECTRON2_DATASETS/shapes (with
--seeds: <datasets>/<output name>_seed<k>/shapes, the runs to <output>/seed<k>).
"""

import argparse
import json
import os
import shlex
import sys
import time

import vild_d2  # noqa: F401  (first: compatibility bridges)
from shapes_picture import (  # demo/ sibling modules (this script's folder is on sys.path)
    distill_boxes,
    draw_prediction_grid,
    load_predictions,
    novel_detections,
    novel_recall,
    target_quality,
    training_objects,
)
from shapes_pipeline import (
    ABLATION_VARIANTS,
    REPO,
    UNSEEN_VARIANTS,
    VARIANTS,
    ShapesOptions,
    ShapesPipeline,
    results_table,
)
from shapes_seeds import seed_options, seeds_table, summarise
from vild_d2.data.datasets.shapes import (
    DEFAULT_NOVEL,
    UNSEEN_SHAPES,
    WorldSpec,
    novel_for_shapes,
)
from vild_d2.distill import DistillStore
from vild_d2.fileio import atomic_write
from vild_d2.text import Vocabulary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["demo", "ablation"])
    p.add_argument(
        "--output", default="", help="default: output/shapes (--world unseen: output/shapes_unseen)"
    )
    p.add_argument(
        "--datasets",
        default=None,
        help="datasets root (default: $DETECTRON2_DATASETS"
        " or ./datasets); the world is written to <datasets>/shapes",
    )
    p.add_argument("--seed", type=int, default=0, help="world (and teacher) seed")
    p.add_argument(
        "--seeds",
        default="",
        help="ablation only: comma-separated seeds, one whole run each (the seed sets the world, "
        "the teacher and the detectors), then mean +- spread, e.g. 0,1,2",
    )
    p.add_argument(
        "--world",
        default="default",
        choices=("default", "unseen"),
        help="default: novel categories are colour-shape compositions (--novel); unseen: whole "
        f"shapes are novel in every colour (--novel-shapes, default {' '.join(UNSEEN_SHAPES)})",
    )
    p.add_argument("--novel", nargs="+", default=None, help="novel categories (default world)")
    p.add_argument("--novel-shapes", nargs="+", default=None, help="novel shapes (--world unseen)")
    p.add_argument(
        "--variant",
        default="vild_ensemble",
        choices=[v for v in VARIANTS if v.startswith("vild")],
        help="the ViLD variant `demo` trains",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=None,
        help="the ablation's rows (default: every variant; --world unseen: "
        f"{' '.join(UNSEEN_VARIANTS)})",
    )
    p.add_argument("--num-train", type=int, default=WorldSpec.num_train)
    p.add_argument("--num-val", type=int, default=WorldSpec.num_val)
    p.add_argument("--teacher-steps", type=int, default=ShapesOptions.teacher_steps)
    p.add_argument(
        "--teacher-data",
        default=ShapesOptions.teacher_data,
        choices=("scenes", "crops"),
        help="the teacher's pre-training data: CLIP-like captioned windows of scenes, "
        "or (the first teacher) object crops with the detection prompts",
    )
    p.add_argument(
        "--teacher-temperature",
        type=float,
        nargs=2,
        metavar=("START", "END"),
        default=ShapesOptions.teacher_temperature,
        help="scenes: the teacher's temperature schedule (demo/tiny_clip.py)",
    )
    p.add_argument(
        "--teacher",
        default="",
        metavar="FILE",
        help="use this CLIP checkpoint as the teacher instead of training one",
    )
    p.add_argument("--teacher-device", default="", help="where the teacher trains (e.g. cuda)")
    p.add_argument("--teacher-crops", type=int, default=240, help="training crops per category")
    p.add_argument("--iters", type=int, default=0, help="detector iterations (0 = config's)")
    p.add_argument(
        "--rpn-iters",
        type=int,
        default=0,
        help="base-RPN iterations (0 = configs/Shapes/rpn.yaml's)",
    )
    p.add_argument("--proposals", type=int, default=100, help="distilled proposals per image")
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help="processes per detector run (data parallel) and targets shards "
        "(0 = one per core, at most 2)",
    )
    p.add_argument(
        "--check",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME VARIANT", "KEY VALUE"),
        help="also train VARIANT with config overrides as row NAME (repeatable), "
        "e.g. --check vild_w1 vild MODEL.VILD.DISTILL_WEIGHT 1.0",
    )
    p.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides for every detector run (KEY VALUE ...)",
    )
    return p.parse_args(argv)


def _print_novel(pipeline: ShapesPipeline, variant: str) -> dict:
    inference = pipeline.out / variant / "inference" / "shapes_val"
    recall = novel_recall(pipeline.world / "annotations" / "val.json", load_predictions(inference))
    found = ", ".join(f"{n} {r['found']}/{r['objects']}" for n, r in recall.items())
    print(f"novel val objects found by {variant} (score >= 0.3, IoU >= 0.5): {found}")
    return recall


def _print_novel_detections(pipeline: ShapesPipeline, variants) -> dict:
    """What each model's novel-category detections lie on: where its APr is lost besides the
    objects it misses."""
    gt = pipeline.world / "annotations" / "val.json"
    print(
        "novel-category val detections (score >= 0.3) on: a correct object / an object of "
        "another category / part of an object / background"
    )
    counts = {}
    for v in variants:
        counts[v] = novel_detections(
            gt, load_predictions(pipeline.out / v / "inference" / "shapes_val")
        )
        print(f"  {v}: " + " / ".join(str(n) for n in counts[v].values()))
    return counts


def _fail(message: str):
    print(f"run_shapes: {message}", file=sys.stderr)
    sys.exit(2)  # bad input


def make_options(args) -> ShapesOptions:
    """The run's options from the command line; bad input exits 2 naming the option."""
    if args.world == "unseen":
        if args.novel:
            _fail("--novel: the unseen world's novel categories are whole shapes: --novel-shapes")
        try:
            novel = novel_for_shapes(args.novel_shapes or UNSEEN_SHAPES)
        except ValueError as e:
            _fail(f"--novel-shapes: {e}")
    else:
        if args.novel_shapes:
            _fail("--novel-shapes needs --world unseen")
        novel = tuple(args.novel or DEFAULT_NOVEL)
    try:  # a bad --novel fails here, before any stage runs
        WorldSpec(novel=novel)
    except ValueError as e:
        _fail(f"--novel: {e}")
    variants = args.variants or (UNSEEN_VARIANTS if args.world == "unseen" else ABLATION_VARIANTS)
    options = ShapesOptions(
        output=args.output
        or ("output/shapes_unseen" if args.world == "unseen" else "output/shapes"),
        seed=args.seed,
        novel=novel,
        num_train=args.num_train,
        num_val=args.num_val,
        teacher_steps=args.teacher_steps,
        teacher_data=args.teacher_data,
        teacher_device=args.teacher_device,
        teacher_temperature=args.teacher_temperature,
        teacher_file=args.teacher,
        teacher_crops=args.teacher_crops,
        iters=args.iters,
        rpn_iters=args.rpn_iters,
        proposals=args.proposals,
        processes=args.processes,
        extra_opts=tuple(args.opts),
        full_train=args.command == "ablation" and "supervised_full" in variants,
    )
    if args.datasets:
        options.datasets = args.datasets
    return options


def parse_seeds(text: str):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        _fail(f"--seeds: {text!r} is not comma-separated integers (e.g. 0,1,2)")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        _fail(f"--seeds: {text!r}: the seeds must be distinct and >= 0")
    return seeds


def run_one(args, options: ShapesOptions, command: str) -> dict:
    """One whole run (world -> teacher -> ... -> every variant) of ``options``; prints its
    tables and diagnostics, writes <output>/run_<command>.json (and, for the ablation,
    <output>/ablation.{json,md}); returns that summary."""
    pipeline = ShapesPipeline(options, REPO)
    start = time.perf_counter()
    pipeline.run_common()
    if args.command == "demo":
        variants = [args.variant]
    else:
        variants = list(
            args.variants or (UNSEEN_VARIANTS if args.world == "unseen" else ABLATION_VARIANTS)
        )
    if "clip_on_crops" in variants:  # needs the supervised model's RPN and mask head
        if "supervised_base" in variants:
            variants.remove("supervised_base")
        variants.insert(0, "supervised_base")
    for variant in variants:
        pipeline.run_variant(variant)
    for name, variant, *overrides in args.check:
        pipeline.run_variant(variant, name=name, overrides=overrides)
        variants.append(name)
    rows = {v: pipeline.results(v) for v in variants}

    teacher = pipeline.teacher_summary()
    if teacher:
        print(
            f"teacher zero-shot accuracy on held-out crops: {100 * teacher['accuracy']:.1f}% "
            f"(novel {100 * teacher['accuracy_novel']:.1f}%)"
        )
    print(f"\nshapes_val ({len(options.novel)} novel categories = APr):\n{results_table(rows)}\n")
    if args.command == "demo":
        shown = args.variant
    else:
        shown = "vild_ensemble" if "vild_ensemble" in variants else variants[-1]
    found = {v: _print_novel(pipeline, v) for v in variants}
    picture = draw_prediction_grid(
        pipeline.world / "annotations" / "val.json",
        pipeline.world / "images",
        load_predictions(pipeline.out / shown / "inference" / "shapes_val"),
        pipeline.out / f"{shown}_val_detections.png",
    )
    print(
        f"picture of {shown}'s val detections (score >= 0.4; novel categories magenta, "
        f"marked *): {picture}"
    )

    detections = _print_novel_detections(pipeline, variants)
    targets = DistillStore(str(pipeline.targets_store))
    vocabulary = Vocabulary.load(str(pipeline.vocab["all"]))
    objects = training_objects(pipeline.world)  # re-drawn once for both diagnostics
    proposals = DistillStore(str(pipeline.proposals_store))
    quality = target_quality(objects, options.novel, proposals, targets, vocabulary)
    print(
        "distillation targets on training objects (novel ones unannotated): "
        + "; ".join(
            f"{k}: proposal recall@0.5 {100 * q['recall']:.1f}%, teacher top-1 on the best "
            f"proposal {100 * q['teacher_top1']:.1f}%"
            for k, q in quality.items()
        )
    )
    composition = distill_boxes(objects, targets, vocabulary)
    print(
        "distillation boxes on: "
        + ", ".join(
            f"{k} {100 * c['fraction']:.1f}% (teacher confidence {c['confidence']:.2f})"
            for k, c in composition.items()
        )
    )

    if args.command == "ablation":
        doc = {v: rows[v] for v in variants}
        atomic_write(pipeline.out / "ablation.json", [json.dumps(doc, indent=1).encode()])
        table = results_table(rows) + f"\n\nMade by `{command}`"
        if teacher:
            table += (
                f"; teacher zero-shot accuracy {100 * teacher['accuracy']:.1f}% "
                f"(novel {100 * teacher['accuracy_novel']:.1f}%)"
            )
        atomic_write(pipeline.out / "ablation.md", [(table + ".\n").encode()])
        print(f"wrote {pipeline.out / 'ablation.json'} and {pipeline.out / 'ablation.md'}")
    summary = {
        "results": rows,
        "novel_found": found[shown],
        "novel_found_by_variant": found,
        "novel_detections": detections,
        "targets": quality,
        "distill_boxes": composition,
        "teacher": teacher,
        "stage_seconds": pipeline.timings,
        "seconds": time.perf_counter() - start,
    }
    atomic_write(
        pipeline.out / f"run_{args.command}.json", [json.dumps(summary, indent=1).encode()]
    )
    print(f"{args.command} finished in {summary['seconds']:.0f} s")
    return summary


def main(argv=None):
    args = parse_args(argv)
    command = "python demo/run_shapes.py " + shlex.join(argv if argv else sys.argv[1:])
    options = make_options(args)
    if not args.seeds:
        run_one(args, options, command)
        return
    if args.command != "ablation":
        _fail("--seeds is for the ablation")
    if args.teacher:
        _fail("--teacher with --seeds: the seed sets the teacher, each seed trains its own")
    seeds = parse_seeds(args.seeds)
    start = time.perf_counter()
    runs = {}
    for seed in seeds:
        print(f"\n===== seed {seed} =====", flush=True)
        runs[seed] = run_one(args, seed_options(options, seed), command)
    names = list(next(iter(runs.values()))["results"])
    summary = summarise(runs, names)
    summary["command"] = command
    summary["novel"] = list(options.novel)
    summary["seconds"] = time.perf_counter() - start
    out = options.output
    os.makedirs(out, exist_ok=True)
    table = seeds_table(summary) + f"\n\nMade by `{command}` in {summary['seconds']:.0f} s.\n"
    atomic_write(os.path.join(out, "ablation_seeds.json"), [json.dumps(summary, indent=1).encode()])
    atomic_write(os.path.join(out, "ablation_seeds.md"), [table.encode()])
    print(f"\n{table}\nwrote {out}/ablation_seeds.json and {out}/ablation_seeds.md")


if __name__ == "__main__":
    main()
