"""tools/train_net.py end to end on a tiny shapes world: each variant trains, saves and
evaluates."""

import vild_d2  # noqa: F401  (first: compat bridges)

import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tiny_world import tool_world  # tests/ helper

# Trains, evaluates or starts processes: minutes on a CPU (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow

ITERS = 10


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory, tiny_clip_path):
    """A tiny world at <root>/shapes (the subprocesses register it as shapes_* on import, from
    $DETECTRON2_DATASETS), registered here as ttrain_*, and its distillation store."""
    return tool_world(tmp_path_factory.mktemp("datasets"), tiny_clip_path, "ttrain", threads=2)


def _train_net(env, *args):
    proc = subprocess.run(
        [sys.executable, "tools/train_net.py", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", ["vild_text", "vild", "vild_ensemble"])
def test_train_and_evaluate(variant, tiny_env, tmp_path):
    env = tiny_env["env"]
    common = [
        *tiny_env["common"],
        # A barely trained model with logits x100 can give its foreground classes
        # probabilities that underflow to 0: keep every box so the evaluator has input.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "-1.0",
    ]
    log = _train_net(
        env,
        "--config-file",
        f"configs/Shapes/{variant}.yaml",
        *common,
        "SOLVER.MAX_ITER",
        str(ITERS),
        "OUTPUT_DIR",
        str(tmp_path),
    )
    if variant != "vild_text":
        assert "loss_distill" in log
    # The LVIS evaluator ran on the val split (novel classes = APr) for boxes and masks.
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log, log[-3000:]
    assert "AP,AP50,AP75,APs,APm,APl,APr,APc,APf" in log
    # setup() configures the project's logger: its messages (here the text classifier's) show.
    assert "vild_d2.text.encoder]:" in log

    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert checkpoint["iteration"] == ITERS - 1
    # The test vocabulary (shapes_val's classes) is saved with it.
    assert checkpoint["vocabulary"]["names"] == list(tiny_env["world"]["spec"].classes)

    if variant == "vild_ensemble":
        log = _train_net(
            env,
            "--config-file",
            f"configs/Shapes/{variant}.yaml",
            "--eval-only",
            *common,
            "MODEL.WEIGHTS",
            str(tmp_path / "model_final.pth"),
            "OUTPUT_DIR",
            str(tmp_path / "eval"),
        )
        assert "copypaste: Task: segm" in log
        assert (
            tmp_path / "eval" / "inference" / "shapes_val" / "lvis_instances_results.json"
        ).is_file()


def test_training_vocabulary_must_match_training_classes(tiny_env, tmp_path):
    from vild_d2 import Vocabulary
    from vild_d2.engine import Trainer
    from vild_d2.config import load_config

    base = list(tiny_env["world"]["spec"].base)
    shuffled = str(tmp_path / "shuffled.pth")
    Vocabulary(base[::-1], torch.randn(len(base), 8)).save(shuffled)
    train = tiny_env["world"]["train"]
    opts = [
        *tiny_env["common"],
        "DATASETS.TRAIN",
        f"('{train}',)",
        "DATASETS.TEST",
        "()",
        "MODEL.VILD.TRAIN_VOCABULARY",
        shuffled,
        "MODEL.VILD.TEST_VOCABULARY",
        shuffled,
    ]
    cfg = load_config("configs/Shapes/vild.yaml", opts)
    with pytest.raises(ValueError, match=f"{train}.*first difference at index 0"):
        Trainer.build_model(cfg)
    Vocabulary(base, torch.randn(len(base), 8)).save(shuffled)
    assert Trainer.build_model(cfg).roi_heads.box_predictor.cls_score.train_vocabulary.names == base


def _weights_differ(a_path, b_path):
    a = torch.load(a_path, weights_only=True)["model"]
    b = torch.load(b_path, weights_only=True)["model"]
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_killed_run_resumes_bit_identical(tiny_env, tmp_path):
    """``kill -9`` after a checkpoint, then ``--resume`` (given after the overrides): the final
    weights equal an uninterrupted run's, bit for bit (optimizer momentum, RNG states and the
    data stream's position are in the checkpoint)."""
    # One thread: on a busy machine, OpenMP threads that wait for each other slowed these runs
    # ten-fold (and a single thread leaves nothing to reorder).
    env = dict(tiny_env["env"], OMP_NUM_THREADS="1")

    def command(out):
        return [
            sys.executable,
            "tools/train_net.py",
            "--config-file",
            "configs/Shapes/vild.yaml",
            *tiny_env["common"],
            "DATASETS.TEST",
            "()",
            "SEED",
            "3",
            "SOLVER.MAX_ITER",
            "10",
            "SOLVER.CHECKPOINT_PERIOD",
            "2",
            "OUTPUT_DIR",
            str(out),
        ]

    _train_net(env, *command(tmp_path / "whole")[2:])
    # Killed once the checkpoint of iteration 3 is complete (last_checkpoint names it).
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command(killed), env=env, stdout=log, stderr=subprocess.STDOUT)
        last = killed / "last_checkpoint"
        while proc.poll() is None:
            if last.is_file() and last.read_text().strip() == "model_0000003.pth":
                proc.kill()
                break
            time.sleep(0.005)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (killed / "model_final.pth").exists()
    log = _train_net(env, *command(killed)[2:], "--resume")
    start = int(re.search(r"Starting training from iteration (\d+)", log).group(1))
    assert 4 <= start < 10
    assert _weights_differ(tmp_path / "whole" / "model_final.pth", killed / "model_final.pth") == []


def test_cold_and_warm_text_cache_train_the_same(tiny_env, tmp_path):
    """The same SEED trains the same weights whether the text embeddings are computed (CLIP is
    loaded: its construction draws random numbers) or read from the cache."""
    from detectron2.utils.env import seed_all_rng

    from vild_d2.config import load_config
    from vild_d2.engine import Trainer

    cache = tmp_path / "cache"  # empty: the first run computes, the second reads
    for run in ("cold", "warm"):
        cfg = load_config(
            "configs/Shapes/vild.yaml",
            [
                *tiny_env["common"],
                "MODEL.VILD.EMBEDDING_CACHE_DIR",
                str(cache),
                "DATASETS.TRAIN",
                f"('{tiny_env['world']['train']}',)",
                "DATASETS.TEST",
                "()",
                "SOLVER.MAX_ITER",
                "2",
                "OUTPUT_DIR",
                str(tmp_path / run),
            ],
        )
        seed_all_rng(5)  # as detectron2's default_setup does with SEED 5
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        assert any(p.name.endswith(".pt") for p in (cache / "text").iterdir())
    assert (
        _weights_differ(
            tmp_path / "cold" / "model_final.pth", tmp_path / "warm" / "model_final.pth"
        )
        == []
    )


def test_each_test_dataset_is_evaluated_with_its_own_classes(tiny_env, tmp_path):
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import DatasetEvaluator

    from vild_d2 import Vocabulary
    from vild_d2.config import load_config
    from vild_d2.engine import Trainer

    world = tiny_env["world"]
    val, train = world["val"], world["train"]  # 36 and 30 classes
    cfg = load_config(
        "configs/Shapes/vild.yaml",
        [
            *tiny_env["common"],
            "DATASETS.TRAIN",
            f"('{train}',)",
            "DATASETS.TEST",
            f"('{val}', '{train}')",
            "OUTPUT_DIR",
            str(tmp_path),  # its evaluation files go here, not into the checkout's output/
        ],
    )
    cfg.defrost()
    model = Trainer.build_model(cfg)
    custom = Vocabulary(
        ["cat", "dog"], torch.randn(2, model.roi_heads.box_predictor.cls_score.embed_dim)
    )
    model.set_vocabulary(custom)

    class VocabularySeen(DatasetEvaluator):
        """Records which vocabulary the model had while the dataset was evaluated."""

        def reset(self):
            self.names = None

        def process(self, inputs, outputs):
            self.names = list(model.vocabulary.names)

        def evaluate(self):
            return {"seen": {"classes": float(len(self.names))}}

    probes = [VocabularySeen(), VocabularySeen()]
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    results = Trainer.test(cfg, model, probes)
    # An evaluation during training leaves the training's RNG as it was (the test loaders draw
    # from it): otherwise a resumed run would not continue as an uninterrupted one.
    assert torch.equal(torch.rand(3), expected)
    for probe, name in zip(probes, cfg.DATASETS.TEST):
        assert probe.names == MetadataCatalog.get(name).thing_classes
    assert results[val]["seen"]["classes"] == 36.0
    assert model.vocabulary.names == ["cat", "dog"]  # restored

    # An explicit test vocabulary that is not the dataset's classes is refused.
    path = str(tmp_path / "custom.pth")
    custom.save(path)
    cfg.MODEL.VILD.TEST_VOCABULARY = path
    with pytest.raises(ValueError, match=f"TEST_VOCABULARY.*{val}"):
        Trainer.test(cfg, model, probes)
