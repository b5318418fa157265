"""tools/train_net.py end to end on the toy world: each variant trains, saves and evaluates."""

import vild_d2  # noqa: F401  (first: compat bridges)

import os
import subprocess
import sys

import pytest
import torch

from vild_d2.data.toy import TOY_CLASSES

ITERS = 10


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    subprocess.run(
        [
            sys.executable,
            "tools/make_toy_world.py",
            "--root",
            str(root / "vild_toy"),
            "--num-train",
            "4",
            "--num-val",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), OMP_NUM_THREADS="2")
    return root, env


def _train_net(env, *args):
    proc = subprocess.run(
        [sys.executable, "tools/train_net.py", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", ["vild_text", "vild", "vild_ensemble"])
def test_train_and_evaluate(variant, toy_env, tmp_path):
    root, env = toy_env
    common = [
        "MODEL.VILD.CLIP_MODEL",
        str(root / "vild_toy" / "tiny_clip.pt"),
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(root / "cache"),
        # A barely trained model with logits x100 can give its foreground classes
        # probabilities that underflow to 0: keep every box so the evaluator has input.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "-1.0",
    ]
    log = _train_net(
        env,
        "--config-file",
        f"configs/Toy/{variant}.yaml",
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
    assert checkpoint["vocabulary"]["names"] == TOY_CLASSES  # test vocabulary saved with it

    if variant == "vild_ensemble":
        log = _train_net(
            env,
            "--config-file",
            f"configs/Toy/{variant}.yaml",
            "--eval-only",
            *common,
            "MODEL.WEIGHTS",
            str(tmp_path / "model_final.pth"),
            "OUTPUT_DIR",
            str(tmp_path / "eval"),
        )
        assert "copypaste: Task: segm" in log
        assert (
            tmp_path / "eval" / "inference" / "vild_toy_val" / "lvis_instances_results.json"
        ).is_file()


def test_training_vocabulary_must_match_training_classes(tmp_path):
    from detectron2.config import get_cfg

    from vild_d2 import Vocabulary, add_vild_config
    from vild_d2.data.toy import TOY_NOVEL
    from vild_d2.engine import Trainer

    base = [c for c in TOY_CLASSES if c not in TOY_NOVEL]
    shuffled = str(tmp_path / "shuffled.pth")
    Vocabulary(base[::-1], torch.randn(len(base), 8)).save(shuffled)
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file("configs/Toy/vild.yaml")
    cfg.MODEL.VILD.TRAIN_VOCABULARY = shuffled
    cfg.MODEL.VILD.TEST_VOCABULARY = shuffled
    with pytest.raises(ValueError, match="vild_toy_train.*first difference at index 0"):
        Trainer.build_model(cfg)
    Vocabulary(base, torch.randn(len(base), 8)).save(shuffled)
    assert Trainer.build_model(cfg).roi_heads.box_predictor.train_vocabulary.names == base


def test_resume_continues_from_last_checkpoint(toy_env, tmp_path):
    root, env = toy_env
    common = [
        "--config-file",
        "configs/Toy/vild.yaml",
        "MODEL.VILD.CLIP_MODEL",
        str(root / "vild_toy" / "tiny_clip.pt"),
        "MODEL.VILD.EMBEDDING_CACHE_DIR",
        str(root / "cache"),
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(tmp_path),
    ]
    _train_net(env, *common, "SOLVER.MAX_ITER", "2")
    log = _train_net(env, "--resume", *common, "SOLVER.MAX_ITER", "4")
    assert "Starting training from iteration 2" in log
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert checkpoint["iteration"] == 3


def test_each_test_dataset_is_evaluated_with_its_own_classes(toy_env, tmp_path):
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import DatasetEvaluator

    from vild_d2 import Vocabulary, add_vild_config
    from vild_d2.data.toy import register_toy_world
    from vild_d2.engine import Trainer

    root, _ = toy_env
    register_toy_world(str(root / "vild_toy"))  # this process registered ./datasets at import
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file("configs/Toy/vild.yaml")
    cfg.MODEL.VILD.CLIP_MODEL = str(root / "vild_toy" / "tiny_clip.pt")
    cfg.MODEL.VILD.EMBEDDING_CACHE_DIR = str(root / "cache")
    cfg.DATASETS.TEST = ("vild_toy_val", "vild_toy_train")  # 12 and 10 classes
    model = Trainer.build_model(cfg)
    custom = Vocabulary(["cat", "dog"], torch.randn(2, model.roi_heads.box_predictor.embed_dim))
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
    results = Trainer.test(cfg, model, probes)
    for probe, name in zip(probes, cfg.DATASETS.TEST):
        assert probe.names == MetadataCatalog.get(name).thing_classes
    assert results["vild_toy_val"]["seen"]["classes"] == 12.0
    assert model.vocabulary.names == ["cat", "dog"]  # restored

    # An explicit test vocabulary that is not the dataset's classes is refused.
    path = str(tmp_path / "custom.pth")
    custom.save(path)
    cfg.MODEL.VILD.TEST_VOCABULARY = path
    with pytest.raises(ValueError, match="TEST_VOCABULARY.*vild_toy_val"):
        Trainer.test(cfg, model, probes)
