"""One web app: the JSON API (FastAPI, mounted at ``/api``) with the Gradio page mounted at
``/``, behind :class:`.guard.RequestGuard`; served by uvicorn with a header timeout, in the
foreground (:func:`serve`) or in a thread (:class:`ServerThread`, for tests and the load
benchmark)."""

import contextlib
import logging
import math
import socket
import threading
import time
from typing import List, Tuple

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from .guard import RequestGuard, timed_protocol
from .service import BadInput, DetectionService, Limits

__all__ = ["build_app", "serve", "ServerThread"]

logger = logging.getLogger(__name__)

FIELDS = ("image", "vocabulary", "builtin", "threshold")  # the /api/detect form
MAX_FIELD_BYTES = 2**20  # a text field (vocabulary: 2000 names fit many times over)
FORM_SLACK_BYTES = 4 * 2**20  # a multipart body beyond its files: fields and part headers


def _error_handlers(app: FastAPI) -> None:
    """Every error of ``app`` as ``{"error": message}``: the service's, Starlette's own 4xx
    (404, 405, ...), and FastAPI's validation errors (422), in one line."""

    @app.exception_handler(BadInput)
    def bad_input(request, e: BadInput):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    def invalid(request, e: RequestValidationError):
        parts = [
            f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in e.errors()
        ]
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)


class _DetectForm(MultiPartParser):
    """The ``/api/detect`` form, checked as it arrives: refused (BadInput 413) at the first
    byte over the per-file limit, or at the file after the last allowed one, so no more of the
    body is read. File parts go to temporary files (memory holds 1 MB of each at most)."""

    def __init__(self, request: Request, limits: Limits):
        super().__init__(
            request.headers,
            request.stream(),
            max_files=math.inf,
            max_fields=len(FIELDS) * 4,
            max_part_size=MAX_FIELD_BYTES,
        )
        self.limits = limits
        self.max_file_bytes = limits.max_upload_mb * 2**20
        self.file_count = 0
        self.file_bytes = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.file is not None:
            self.file_count += 1
            self.file_bytes = 0
            if self.file_count > self.limits.max_images:
                raise BadInput(
                    f"more than {self.limits.max_images} images (the next: "
                    f"{part.file.filename!r}), above {self.limits.max_images} per request",
                    413,
                )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is not None:
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                mb = self.limits.max_upload_mb
                raise BadInput(
                    f"{part.file.filename}: over {mb:g} MB (the upload was stopped there), above "
                    f"this server's {mb:g} MB per file",
                    413,
                )
        super().on_part_data(data, start, end)


async def read_detect_form(request: Request, limits: Limits):
    """The request's multipart form (an empty one for a request without a body)."""
    kind = request.headers.get("content-type", "")
    if not kind:
        return None
    if kind.lower().startswith("application/x-www-form-urlencoded"):  # fields, no file
        try:
            return await request.form(max_fields=len(FIELDS) * 4, max_part_size=MAX_FIELD_BYTES)
        except MultiPartException as e:
            raise BadInput(f"bad form: {e.message}", 400) from None
    if not kind.lower().startswith("multipart/form-data"):
        raise BadInput(
            f"the images must come as multipart/form-data (got {kind.split(';')[0]}): "
            "curl -F image=@photo.jpg -F vocabulary=\"cat, dog\" .../api/detect",
            415,
        )
    try:
        return await _DetectForm(request, limits).parse()
    except MultiPartException as e:
        status = 413 if "maximum size" in e.message else 400
        raise BadInput(f"bad multipart form: {e.message}", status) from None


def _detect_fields(form) -> Tuple[List[Tuple[str, object]], str, str, object]:
    """(files, vocabulary, builtin, threshold) of the form; unknown or misused fields refused."""
    if form is None:
        return [], "", "", None
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        raise BadInput(f"unknown form field {unknown[0]!r}: send {', '.join(FIELDS)}")
    files = []
    for i, item in enumerate(form.getlist("image")):
        if not isinstance(item, UploadFile):
            raise BadInput("'image' must be a file (curl -F image=@photo.jpg), not text")
        files.append((item.filename or f"image{i}", item.file))
    text = {}
    for key in FIELDS[1:]:
        values = form.getlist(key)
        if len(values) > 1 or any(isinstance(v, UploadFile) for v in values):
            raise BadInput(f"'{key}' must be given once, as text")
        text[key] = values[0] if values else None
    return files, text["vocabulary"] or "", text["builtin"] or "", text["threshold"]


def build_app(service: DetectionService, page: bool = True) -> FastAPI:
    """
    ``POST /api/detect`` (multipart: ``image`` one or more files; ``vocabulary`` comma-separated
    names or ``builtin`` a vocabulary of ``/api/info``; ``threshold``) -> the detections JSON of
    ``tools/demo.py --json``; a bad request -> 4xx ``{"error": message}``. ``GET /api/info``.
    ``page``: mount the Gradio page at ``/``. On shutdown the service's temporary files go.
    """
    limits = service.limits

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="vild_d2", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    api = FastAPI(title="vild_d2 API", docs_url="/docs", openapi_url="/openapi.json")
    _error_handlers(app)
    _error_handlers(api)

    @api.get("/info")
    def info():
        return service.info()

    form_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            },
                            "vocabulary": {"type": "string"},
                            "builtin": {"type": "string"},
                            "threshold": {"type": "number"},
                        },
                        "required": ["image"],
                    }
                }
            },
        }
    }

    @api.post("/detect", openapi_extra=form_doc)
    async def detect(request: Request):
        start = time.perf_counter()
        form = await read_detect_form(request, limits)
        try:
            files, vocabulary, builtin, threshold = _detect_fields(form)
            # The model's work in FastAPI's thread pool: requests overlap while the
            # predictor's lock orders the forwards.
            result = await run_in_threadpool(service.detect, files, vocabulary, builtin, threshold)
            answer = await run_in_threadpool(result.to_json)
        finally:
            if form is not None:
                await form.close()  # the uploads' temporary files
        answer["time_ms"]["total"] = round((time.perf_counter() - start) * 1e3, 1)  # with JSON
        return answer

    app.mount("/api", api)
    upload_dir = None
    if page:
        import gradio as gr  # heavy: only when the page is served

        from .page import build_page, upload_folder

        blocks = build_page(service)
        upload_dir = upload_folder()
        app = gr.mount_gradio_app(
            app,
            blocks,
            path="/",
            max_file_size=int(limits.max_upload_mb * 2**20),
            footer_links=["api"],
            # No web fonts: the page must work without internet.
            theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"]),
        )
    app.add_middleware(
        RequestGuard,
        max_multipart_bytes=int(limits.max_images * limits.max_upload_mb * 2**20)
        + FORM_SLACK_BYTES,
        body_timeout=limits.slow_timeout_s,
        upload_dir=upload_dir,
    )
    app.state.limits = limits
    return app


def _config(app: FastAPI, **kwargs) -> uvicorn.Config:
    limits: Limits = app.state.limits
    return uvicorn.Config(
        app,
        http=timed_protocol(limits.slow_timeout_s),
        timeout_keep_alive=limits.keep_alive_s,
        **kwargs,
    )


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve ``app`` until interrupted."""
    uvicorn.Server(_config(app, host=host, port=port, log_level="info")).run()


class ServerThread:
    """``app`` served by uvicorn in a daemon thread on ``host`` and a free port (``url``);
    a context manager that stops it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the OS picks a free one, held from now on
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = _config(app, log_level="warning", timeout_graceful_shutdown=5)
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
