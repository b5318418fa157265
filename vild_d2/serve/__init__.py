"""A web page and an HTTP JSON API to try a ViLD model (``tools/serve.py``): the request logic in
:mod:`.service`, the app in :mod:`.app`, the Gradio page in :mod:`.page` (imported only when
the page is served). The load benchmark is ``benchmarks/serve.py`` (``tools/benchmark.py
--task serve``), outside the package."""

from .app import ServerThread, build_app, serve
from .service import BadInput, DetectionService, Detections, Limits

__all__ = [
    "BadInput",
    "DetectionService",
    "Detections",
    "Limits",
    "ServerThread",
    "build_app",
    "serve",
]
