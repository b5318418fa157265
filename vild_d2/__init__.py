"""ViLD for Detectron2. Importing the package registers its meta-architecture and RoI heads."""
from . import compat

# Must run before anything imports detectron2.layers / detectron2.data (see compat.py).
compat.apply_bridges()

from .config import add_vild_config  # noqa: E402

__all__ = ["add_vild_config"]
