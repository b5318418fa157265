"""The shapes-world pipeline behind ``make demo`` and ``make ablation`` (demo/run_shapes.py).

Every stage runs one of the project's own tools in a subprocess, exactly as a user would:

    world       tools/make_shapes_world.py
    teacher     demo/tiny_clip.py
    vocabulary  tools/build_text_classifier.py (base classes, all classes)
    rpn         tools/train_net.py --config-file configs/Shapes/rpn.yaml  (base boxes only)
    proposals   tools/precompute_proposals.py  (teacher || rpn -> proposals run side by side)
    targets     tools/precompute_clip_embeddings.py
    <variant>   tools/train_net.py --config-file configs/Shapes/<variant>.yaml  (+ LVIS eval)

A stage is cached: ``<output>/stages/<name>.json`` records a key made of its command and the
keys of the stages it depends on; a stage whose key and outputs are unchanged is skipped, and a
changed one (another seed, novel list, schedule) reruns with everything after it.

On the unseen-concept world (whole shapes novel, ``demo/run_shapes.py --world unseen``) the
ablation adds ``supervised_full``, trained on the training images with the novel objects
annotated too (``annotations/train_full.json``): an upper reference, not a baseline.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from stages import StageRunner, file_key  # demo/ sibling module
from vild_d2.data.datasets.shapes import DEFAULT_NOVEL, WorldSpec, load_world_spec

__all__ = [
    "ABLATION_VARIANTS",
    "REPO",
    "ShapesOptions",
    "ShapesPipeline",
    "TRAINED_VARIANTS",
    "UNSEEN_VARIANTS",
    "VARIANTS",
]

REPO = Path(__file__).resolve().parent.parent  # the checkout: tools/, configs/, demo/

# The ablation's rows: config name under configs/Shapes -> what it is.
VARIANTS = {
    "supervised_base": "Mask R-CNN, base boxes only (linear classifier)",
    "clip_on_crops": "CLIP on cropped regions (teacher classifies RPN proposals)",
    "vild_text": "ViLD-text",
    "vild_image": "ViLD-image (distillation only)",
    "vild": "ViLD (text + image, w = 0.5)",
    "vild_ensemble": "ViLD-ensemble",
    "supervised_full": "Mask R-CNN, base and novel boxes (an upper reference)",
}
# The rows of `make ablation` on the default world, and on the unseen-concept world (issue 31:
# the four ViLD variants and the fully supervised upper reference).
ABLATION_VARIANTS = tuple(list(VARIANTS)[:6])
UNSEEN_VARIANTS = ("vild_text", "vild_image", "vild", "vild_ensemble", "supervised_full")
TRAINED_VARIANTS = (
    "supervised_base",
    "vild_text",
    "vild_image",
    "vild",
    "vild_ensemble",
    "supervised_full",
)
DISTILLED_VARIANTS = ("vild_image", "vild", "vild_ensemble")
METRICS = ("AP", "APr", "APc", "APf")


@dataclass
class ShapesOptions:
    """What a run is made of (demo/run_shapes.py's options)."""

    output: str = "output/shapes"
    datasets: str = field(default_factory=lambda: os.getenv("DETECTRON2_DATASETS", "datasets"))
    seed: int = 0
    novel: Sequence[str] = DEFAULT_NOVEL
    num_train: int = WorldSpec.num_train
    num_val: int = WorldSpec.num_val
    # The teacher (docs/TEACHER.md): "scenes", CLIP-like captioned windows of the world, 1200
    # steps, temperature 0.07 -> 0.01 (97.7% zero-shot, top probability 0.37 on background);
    # "crops": the first teacher, object crops with the detection prompts (600 steps, learnt
    # temperature: pass --teacher-data crops --teacher-steps 600).
    teacher_steps: int = 1200
    teacher_data: str = "scenes"
    teacher_device: str = ""  # where the teacher trains ("" = the tool's default, the CPU)
    # "scenes" only: the temperature schedule (start, end); None = the tool's default
    teacher_temperature: Optional[Sequence[float]] = (0.07, 0.01)
    # a CLIP checkpoint to use instead of training one (e.g. a teacher trained by an earlier
    # run of the same world, or a real CLIP); "" = train one
    teacher_file: str = ""
    teacher_crops: int = 240  # training crops per category (held-out: a sixth of that)
    iters: int = 0  # detector iterations; 0 = the config's SOLVER.MAX_ITER
    rpn_iters: int = 0  # base-RPN iterations; 0 = configs/Shapes/rpn.yaml's (600)
    proposals: int = 100  # per training image, for the distillation targets
    processes: int = 0  # per detector run and targets stage; 0 = one per core, at most 2
    extra_opts: Sequence[str] = ()  # config overrides for every detector run
    # also write annotations/train_full.json (novel training objects annotated: supervised_full)
    full_train: bool = False
    detector_seed: Optional[int] = None  # SEED of every detector run; None = the config's


class ShapesPipeline(StageRunner):
    """Runs the stages for ``options``; ``repo`` is the project checkout (tools/, configs/)."""

    def __init__(self, options: ShapesOptions, repo: Path, log=None):
        self.o = options
        self.repo = Path(repo).resolve()
        self.out = Path(options.output).resolve()
        self.datasets = Path(options.datasets).resolve()
        self.world = self.datasets / "shapes"
        self.teacher = (
            Path(options.teacher_file).resolve()
            if options.teacher_file
            else self.out / "teacher" / "tiny_clip.pt"
        )
        self.vocab = {
            "base": self.out / "vocabulary" / "base.pth",
            "all": self.out / "vocabulary" / "all.pth",
        }
        self.proposals_store = self.out / "stores" / "proposals_train"
        self.targets_store = self.out / "stores" / "clip_train"
        super().__init__(
            self.out, self.repo, dict(os.environ, DETECTRON2_DATASETS=str(self.datasets)), log
        )
        # Processes of a detector run and shards of the targets (0: one per core, at most 2):
        # on 2 cores a second process gains more than a second torch thread (docs/SHAPES.md
        # "Stage times").
        self.processes = options.processes or min(2, self.cores)

    def world_spec(self) -> WorldSpec:
        o = self.o
        return WorldSpec(seed=o.seed, num_train=o.num_train, num_val=o.num_val, novel=o.novel)

    def run_world(self):
        cmd = [
            "tools/make_shapes_world.py",
            "--root",
            str(self.world),
            "--seed",
            str(self.o.seed),
            "--num-train",
            str(self.o.num_train),
            "--num-val",
            str(self.o.num_val),
            "--novel",
            *self.o.novel,
            *(["--full-train"] if self.o.full_train else []),
        ]
        # The world folder is shared by every run with this datasets root: trust it only if
        # it is this run's world.
        self._stage(
            "world",
            [cmd],
            [self.world / "world.json"]
            + ([self.world / "annotations" / "train_full.json"] if self.o.full_train else []),
            clean=[self.world],
            valid=lambda: load_world_spec(self.world) == self.world_spec(),
        )

    def run_teacher(self):
        if self.o.teacher_file:  # given: its key is its content, so a changed file reruns
            if not self.teacher.is_file():
                raise FileNotFoundError(f"--teacher: no CLIP checkpoint at {self.teacher}")
            self.keys["teacher"] = file_key(self.teacher)
            self.log(f"[teacher] given: {self.teacher}")
            return
        temperature = self.o.teacher_temperature
        cmd = [
            "demo/tiny_clip.py",
            "--world",
            str(self.world),
            "--output",
            str(self.teacher),
            "--steps",
            str(self.o.teacher_steps),
            "--seed",
            str(self.o.seed),
            "--data",
            self.o.teacher_data,
            *(["--device", self.o.teacher_device] if self.o.teacher_device else []),
            *(
                ["--temperature", *map(str, temperature)]
                if temperature and self.o.teacher_data == "scenes"
                else []
            ),
            "--crops-per-class",
            str(self.o.teacher_crops),
            "--heldout-per-class",
            str(max(2, self.o.teacher_crops // 6)),
        ]
        self._stage("teacher", [cmd], [self.teacher], after=["world"], clean=[self.teacher])

    def run_vocabulary(self):
        cmds = [
            [
                "tools/build_text_classifier.py",
                "--clip",
                str(self.teacher),
                "--dataset",
                dataset,
                "--cache-dir",
                str(self.out / "cache"),
                "--output",
                str(self.vocab[which]),
            ]
            for which, dataset in (("base", "shapes_train_base"), ("all", "shapes_val"))
        ]
        vocab = list(self.vocab.values())
        self._stage("vocabulary", cmds, vocab, after=["teacher"], clean=vocab)

    def _train_cmd(
        self, variant: str, *extra: str, name: str = "", overrides: Sequence[str] = ()
    ) -> List[str]:
        opts = [
            "MODEL.VILD.CLIP_MODEL",
            str(self.teacher),
            "MODEL.VILD.EMBEDDING_CACHE_DIR",
            str(self.out / "cache"),
            "MODEL.VILD.TRAIN_VOCABULARY",
            str(self.vocab["base"]),
            "MODEL.VILD.TEST_VOCABULARY",
            str(self.vocab["all"]),
            "MODEL.VILD.DISTILL.STORES",
            f"('{self.targets_store}',)",
            "OUTPUT_DIR",
            str(self.out / (name or variant)),
        ]
        # The RPN has its own schedule (rpn.yaml, --rpn-iters): --iters is the detectors'.
        iters = self.o.rpn_iters if variant == "rpn" else self.o.iters
        if iters:
            opts += [
                "SOLVER.MAX_ITER",
                str(iters),
                "SOLVER.STEPS",
                f"({max(1, int(iters * 0.8))},)",
                "SOLVER.WARMUP_ITERS",
                str(min(100, max(1, iters // 5))),
            ]
        if self.o.detector_seed is not None:  # the seed sets the detectors too (--seeds)
            opts += ["SEED", str(self.o.detector_seed)]
        if variant != "rpn" and self.processes > 1:  # the RPN trains beside the teacher
            # data parallel (tools/train_net.py on a CPU: gloo), the same global batch
            extra = ("--num-gpus", str(self.processes), *extra)
        config = f"configs/Shapes/{variant}.yaml"
        return [
            "tools/train_net.py",
            "--config-file",
            config,
            *extra,
            *opts,
            *self.o.extra_opts,
            *overrides,
        ]

    def run_rpn(self):
        cmd = self._train_cmd("rpn")
        self._stage(
            "rpn",
            [cmd],
            [self.weights("rpn")],
            after=["world"],
            clean=[self.out / "rpn"],
            configs=["configs/Shapes/rpn.yaml"],
        )

    def run_proposals(self):
        rpn_weights = str(self.out / "rpn" / "model_final.pth")
        proposals = [
            "tools/precompute_proposals.py",
            "--config-file",
            "configs/Shapes/rpn.yaml",
            "--dataset",
            "shapes_train_base",
            "--output",
            str(self.proposals_store),
            "--num-proposals",
            str(self.o.proposals),
            "--num-workers",
            "1",
            "MODEL.WEIGHTS",
            rpn_weights,
            *self.o.extra_opts,
        ]
        self._stage(
            "proposals",
            [proposals],
            [self.proposals_store],
            after=["rpn"],
            clean=[self.proposals_store],
        )

    def run_targets(self):
        targets = [
            "tools/precompute_clip_embeddings.py",
            "--proposals",
            str(self.proposals_store),
            "--dataset",
            "shapes_train_base",
            "--clip",
            str(self.teacher),
            "--output",
            str(self.targets_store),
            "--max-proposals",
            str(self.o.proposals),
            "--num-workers",
            "1",
        ]
        n = self.processes  # shards of one store, written at once (the same bytes as one)
        self._stage(
            "targets",
            [targets + ["--shard", str(i), "--num-shards", str(n)] for i in range(n)],
            [self.targets_store],
            after=["proposals", "teacher"],
            clean=[self.targets_store],
            at_once=True,
        )

    def run_variant(self, variant: str, name: str = "", overrides: Sequence[str] = ()):
        """
        Train (or, for clip_on_crops, only evaluate) ``variant`` and evaluate it on val, under
        ``<output>/<name>`` (default: the variant's name) with config ``overrides`` (a check of
        one setting beside the ablation, e.g. another distillation weight).
        """
        name = name or variant
        results = self.results_file(name)
        if variant == "clip_on_crops":
            weights = self.weights("supervised_base")
            cmd = self._train_cmd(
                variant,
                "--eval-only",
                "MODEL.WEIGHTS",
                str(weights),
                name=name,
                overrides=overrides,
            )
            after = ["supervised_base", "vocabulary"]
        else:
            cmd = self._train_cmd(variant, name=name, overrides=overrides)
            after = ["vocabulary"] + (["targets"] if variant in DISTILLED_VARIANTS else [])
        outputs = [results] + ([] if variant == "clip_on_crops" else [self.weights(name)])
        self._stage(
            name,
            [cmd],
            outputs,
            after=["world", *after],
            clean=[self.out / name],
            configs=[f"configs/Shapes/{variant}.yaml"],
        )

    def run_common(self):
        """Everything the detectors need: world, teacher, vocabularies, proposals, targets."""
        self.run_world()
        # The teacher and the base RPN (then its proposals) need only the world.
        self.side_by_side([self.run_teacher], [self.run_rpn, self.run_proposals])
        self.run_vocabulary()
        self.run_targets()

    # ---------------------------------------------------------------------------- results
    def weights(self, variant: str) -> Path:
        return self.out / variant / "model_final.pth"

    def results_file(self, variant: str) -> Path:
        return self.out / variant / "inference" / "shapes_val" / "results.json"

    def results(self, variant: str) -> Dict[str, Dict[str, float]]:
        """{"bbox": {AP, APr, APc, APf}, "segm": {...}} of ``variant`` on shapes_val."""
        raw = json.loads(self.results_file(variant).read_text())
        return {
            task: {m: round(float(raw[task][m]), 2) for m in METRICS}
            for task in ("bbox", "segm")
            if task in raw
        }

    def teacher_summary(self) -> Optional[dict]:
        path = self.teacher.with_suffix(".json")
        return json.loads(path.read_text()) if path.is_file() else None


def results_table(rows: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """A Markdown table of {variant: results}: box and mask AP, APr, APc, APf."""
    head = "| variant | " + " | ".join(f"box {m}" for m in METRICS)
    head += " | " + " | ".join(f"mask {m}" for m in METRICS) + " |"
    lines = [head, "|---" * (1 + 2 * len(METRICS)) + "|"]
    for variant, res in rows.items():
        cells = [
            f"{res.get(t, {}).get(m, float('nan')):.1f}" for t in ("bbox", "segm") for m in METRICS
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
