"""Datasets registered when vild_d2 is imported, under ``$DETECTRON2_DATASETS`` (default
``./datasets``), as detectron2 does for its builtin ones. Registration reads no file."""

import os

from .toy import register_toy_world

_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_toy_world(os.path.join(_root, "vild_toy"))
