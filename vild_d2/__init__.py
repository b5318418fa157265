"""ViLD for Detectron2. Importing the package registers its meta-architecture and RoI heads."""

from . import compat

# Must run before anything imports detectron2.layers / detectron2.data (see compat.py).
compat.apply_bridges()

from .checkpoint import ViLDCheckpointer  # noqa: E402
from .config import add_vild_config  # noqa: E402
from .data import ViLDDatasetMapper  # noqa: E402
from .engine.predictor import ViLDPredictor  # noqa: E402
from .modeling import ViLDOutputLayers, ViLDRCNN, ViLDROIHeads  # noqa: E402
from .text import TextEncoder, Vocabulary  # noqa: E402
from . import official  # noqa: E402, F401  (registers the official ViLD architecture's modules)

__all__ = [
    "add_vild_config",
    "ViLDRCNN",
    "ViLDROIHeads",
    "ViLDOutputLayers",
    "ViLDDatasetMapper",
    "ViLDCheckpointer",
    "ViLDPredictor",
    "TextEncoder",
    "Vocabulary",
]
