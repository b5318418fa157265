"""The tiny ViLD config, seeded random vocabularies and a training batch shared by
tests/modeling/test_model.py, tests/modeling/test_self_distill.py and
tests/checkpoint/test_loading.py."""

import torch
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances

from vild_d2 import Vocabulary, add_vild_config
from tiny_world import TINY_OPTS  # tests/ helper

TRAIN_NAMES = ["red square", "blue circle", "green triangle"]
TEST_NAMES = ["red square", "blue circle", "green triangle", "yellow star", "purple cross"]
DIM = 16


def random_vocab(names, seed, dim=DIM, novel=None):
    """A vocabulary of ``names`` with seeded random (N, dim) embeddings."""
    g = torch.Generator().manual_seed(seed)
    # Deliberately not unit-norm: the model must normalise the class embeddings itself.
    return Vocabulary(list(names), torch.randn(len(names), dim, generator=g) * 3, novel)


def tiny_cfg(variant, vocab_files, **overrides):
    """configs/Shapes/Base-Shapes-R18-FPN.yaml shrunk by TINY_OPTS, as ``variant``, with the
    vocabulary files ``vocab_files["train"]`` and ``["test"]``; ``overrides``: KEY=VALUE."""
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file("configs/Shapes/Base-Shapes-R18-FPN.yaml")
    cfg.merge_from_list(TINY_OPTS)
    cfg.MODEL.VILD.VARIANT = variant
    cfg.MODEL.VILD.TRAIN_VOCABULARY = vocab_files["train"]
    cfg.MODEL.VILD.TEST_VOCABULARY = vocab_files["test"]
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def tiny_inputs(num_images=2, num_distill=(5, 3), with_gt=(True, True), dim=DIM, seed=0):
    """A training batch of 64 x 80 random images: two boxes and masks each (``with_gt``),
    ``num_distill`` distillation boxes with random (dim,) CLIP targets."""
    g = torch.Generator().manual_seed(seed)
    h, w = 64, 80
    inputs = []
    for i in range(num_images):
        image = torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8)
        inst = Instances((h, w))
        if with_gt[i]:
            boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 10.0, 76.0, 50.0]])
            masks = torch.zeros(2, h, w, dtype=torch.bool)
            for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[k, y0:y1, x0:x1] = True
            inst.gt_boxes, inst.gt_classes, inst.gt_masks = (
                Boxes(boxes),
                torch.tensor([0, 2]),
                BitMasks(masks),
            )
        else:
            inst.gt_boxes = Boxes(torch.zeros(0, 4))
            inst.gt_classes = torch.zeros(0, dtype=torch.long)
            inst.gt_masks = BitMasks(torch.zeros(0, h, w, dtype=torch.bool))
        m = num_distill[i]
        xy = torch.rand(m, 2, generator=g) * torch.tensor([w / 2, h / 2])
        distill = Instances((h, w))
        distill.boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(m, 2, generator=g) * 20], 1))
        distill.embeddings = torch.randn(m, dim, generator=g)
        inputs.append(
            {"image": image, "height": h, "width": w, "instances": inst, "distill": distill}
        )
    return inputs
