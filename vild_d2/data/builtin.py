"""Datasets registered when vild_d2 is imported, under ``$DETECTRON2_DATASETS`` (default
``./datasets``), as detectron2 does for its builtin ones. Registration reads no dataset file
(only the shapes world's small ``world.json``, for its categories)."""

import os

from .datasets import register_all_ovd
from .datasets.shapes import register_shapes_world

_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
# The shapes world: shapes_train_base, shapes_train, shapes_train_full, shapes_val. Not
# strict: an unreadable world.json must not stop the tools (e.g. the one that remakes it).
register_shapes_world(_root, strict=False)
# LVIS v1 / COCO 48-17 open-vocabulary splits and the transfer targets, under names of their own
# ("vild_" + detectron2's name for the same files: ours carry more metadata, e.g. the novel
# classes), so that detectron2's lvis_v1_val etc. keep their meaning.
register_all_ovd(_root)
