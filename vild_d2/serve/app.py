"""One web app: the JSON API (FastAPI) with the Gradio page mounted at ``/``; served by uvicorn,
in the foreground (:func:`serve`) or in a thread (:class:`ServerThread`, for tests and the
load benchmark)."""

import logging
import socket
import threading
import time
from typing import List, Optional

import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse

from .service import BadInput, DetectionService

__all__ = ["build_app", "serve", "ServerThread"]

logger = logging.getLogger(__name__)


def build_app(service: DetectionService, page: bool = True) -> FastAPI:
    """
    ``POST /api/detect`` (multipart: ``image`` one or more files; ``vocabulary`` comma-separated
    names or ``builtin`` a vocabulary of ``/api/info``; ``threshold``) -> the detections JSON of
    ``tools/demo.py --json``; a bad request -> 4xx ``{"error": message}``. ``GET /api/info``.
    ``page``: mount the Gradio page at ``/``.
    """
    app = FastAPI(title="vild_d2", docs_url="/api/docs", openapi_url="/api/openapi.json")

    @app.exception_handler(BadInput)
    def bad_input(request, e: BadInput):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.get("/api/info")
    def info():
        return service.info()

    # A plain (sync) function: FastAPI runs it in its thread pool, so requests overlap while
    # the predictor's lock orders the forwards.
    @app.post("/api/detect")
    def detect(
        image: List[UploadFile] = File(default=[]),
        vocabulary: str = Form(default=""),
        builtin: str = Form(default=""),
        threshold: Optional[str] = Form(default=None),
    ):
        start = time.perf_counter()
        files = [(f.filename or f"image{i}", f.file.read()) for i, f in enumerate(image)]
        answer = service.detect(files, vocabulary, builtin, threshold).to_json()
        answer["time_ms"]["total"] = round((time.perf_counter() - start) * 1e3, 1)  # with JSON
        return answer

    if page:
        import gradio as gr  # heavy: only when the page is served

        from .page import build_page

        blocks = build_page(service)
        app = gr.mount_gradio_app(
            app,
            blocks,
            path="/",
            allowed_paths=[blocks.json_dir],
            max_file_size=int(service.limits.max_upload_mb * 2**20),
            footer_links=["api"],
            # No web fonts: the page must work without internet.
            theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"]),
        )
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve ``app`` until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="info")


class ServerThread:
    """``app`` served by uvicorn in a daemon thread on ``host`` and a free port (``url``);
    a context manager that stops it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the OS picks a free one, held from now on
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
