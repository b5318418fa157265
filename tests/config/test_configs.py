"""Every YAML in configs/ loads through the same setup() as tools/train_net.py."""

import vild_d2  # noqa: F401  (first: compat bridges)

from pathlib import Path

import pytest

from detectron2.engine import default_argument_parser

from vild_d2.config import VARIANTS
from vild_d2.engine import setup

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml"))
# The shapes ablation's baselines and its base RPN: (meta-architecture, RoI heads).
BASELINES = {
    "configs/Shapes/supervised_base.yaml": ("GeneralizedRCNN", "StandardROIHeads"),
    "configs/Shapes/supervised_full.yaml": ("GeneralizedRCNN", "StandardROIHeads"),
    "configs/Shapes/clip_on_crops.yaml": ("CLIPOnCropsRCNN", "StandardROIHeads"),
    "configs/Shapes/rpn.yaml": ("ProposalNetwork", None),
}
# The official ViLD architecture (vild_d2/official): ViLDRCNN / ViLDROIHeads subclasses.
BASELINES.update({str(p): ("OfficialViLDRCNN", "OfficialViLDROIHeads")
                  for p in Path("configs/LVIS-OVD/official").glob("*.yaml")})  # fmt: skip
BASELINES["configs/Shapes/official_finetune.yaml"] = ("OfficialViLDRCNN", "OfficialViLDROIHeads")


def test_configs_found():
    assert len(CONFIGS) >= 9


@pytest.mark.parametrize("config_file", CONFIGS)
def test_config_loads(config_file, tmp_path):
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            config_file,
            "OUTPUT_DIR",
            str(tmp_path),
            "MODEL.VILD.TEMPERATURE",
            "0.02",
        ]
    )
    cfg = setup(args)
    arch, heads = BASELINES.get(config_file, ("ViLDRCNN", "ViLDROIHeads"))
    assert cfg.MODEL.META_ARCHITECTURE == arch
    assert heads is None or cfg.MODEL.ROI_HEADS.NAME == heads
    assert cfg.MODEL.VILD.VARIANT in VARIANTS
    assert cfg.MODEL.VILD.TEMPERATURE == 0.02  # command-line overrides reach the node
    assert (
        cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG and cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK
    )
    assert (tmp_path / "config.yaml").is_file()  # default_setup ran
