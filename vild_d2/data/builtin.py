"""Datasets registered when vild_d2 is imported, under ``$DETECTRON2_DATASETS`` (default
``./datasets``), as detectron2 does for its builtin ones. Registration reads no dataset file
(only the shapes world's small ``world.json``, for its categories)."""

import os

from .datasets import register_all_ovd
from .datasets.shapes import register_shapes_world

_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
# The shapes world: shapes_train_base, shapes_train, shapes_val. Not strict: an unreadable
# world.json must not stop the tools (e.g. the one that remakes it).
register_shapes_world(_root, strict=False)
# LVIS v1 / COCO 48-17 open-vocabulary splits and the transfer targets (replacing detectron2's
# registrations of lvis_v1_{train,val}, coco_2017_val and voc_2007_test: same files, more metadata).
register_all_ovd(_root)
