"""What stands in front of the app, so that no request costs more than its limits before it is
checked: a body-size limit that stops reading at the limit, time limits for slow clients (a
request's headers, then its body), a refusal of page requests that name server files the
client never uploaded, and one error layout, ``{"error": message}``, for the server's 4xx.

:class:`RequestGuard` is an ASGI middleware (the app's outermost but Starlette's own error
middleware); :func:`timed_protocol` is uvicorn's HTTP/1.1 protocol with a header timeout (uvicorn
has none: a client that sends one header byte a minute would hold its connection for ever).
"""

import asyncio
import json
import os
import time
from typing import Iterable, List, Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["RequestGuard", "foreign_paths", "timed_protocol"]

# Gradio's own protocol (its client reads "detail"): its answers are left as they are.
GRADIO_PREFIX = "/gradio_api/"
# A body must keep up this average rate once the first timeout has passed (Apache's
# mod_reqtimeout rule: timeout + 1 s per MIN_RATE bytes received).
MIN_RATE = 16 * 1024  # bytes per second


class _Refused(Exception):
    """Raised into the app when the guard has answered the request itself."""


def foreign_paths(value, folder: str) -> List[str]:
    """The ``"path"`` strings of every dict in a JSON value (gradio's ``FileData``, with or
    without its ``meta``) that are not inside ``folder`` once links and ``..`` are resolved."""
    root = os.path.realpath(folder)
    found: List[str] = []

    def walk(v):
        if isinstance(v, dict):
            path = v.get("path")
            if isinstance(path, str) and not _inside(path, root):
                found.append(path)
            for item in v.values():
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(value)
    return found


def _inside(path: str, root: str) -> bool:
    try:
        real = os.path.realpath(path)
        return os.path.commonpath([real, root]) == root
    except ValueError:  # another drive, an empty path, a NUL byte
        return False


def _json_error(status: int, message: str) -> tuple:
    body = json.dumps({"error": message}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the rest of the body is never read
        ],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class _Exchange:
    """One request's responses: the app's, rewritten to ``{"error"}`` when they are a 4xx in
    FastAPI's ``{"detail"}`` layout (outside gradio's protocol), or the guard's own refusal
    (then whatever the app still sends is dropped)."""

    def __init__(self, send, rewrite: bool):
        self._send = send
        self.rewrite = rewrite
        self.started = False
        self.refused = False
        self._held = None
        self._chunks: List[bytes] = []

    async def refuse(self, status: int, message: str) -> None:
        if not self.started and not self.refused:
            for m in _json_error(status, message):
                await self._send(m)
        self.refused = True

    async def send(self, message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
            if self.rewrite and 400 <= message["status"] < 500:
                self._held = message
                return
        elif self._held is not None and message["type"] == "http.response.body":
            self._chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            start, body = self._held, b"".join(self._chunks)
            self._held = None
            start, body = _as_error_layout(start, body)
            await self._send(start)
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await self._send(message)


def _as_error_layout(start: dict, body: bytes):
    """A 4xx whose body is ``{"detail": ...}`` (FastAPI, Starlette) or plain text -> the same
    status with ``{"error": message}``; anything else unchanged."""
    headers = dict(start.get("headers", []))
    kind = headers.get(b"content-type", b"").split(b";")[0].strip()
    if kind == b"application/json":
        try:
            value = json.loads(body)
        except ValueError:
            return start, body
        if not (isinstance(value, dict) and set(value) == {"detail"}):
            return start, body
        detail = value["detail"]
        message = detail if isinstance(detail, str) else json.dumps(detail)
    elif kind == b"text/plain":
        message = body.decode("utf-8", "replace").strip()
    else:
        return start, body
    new_start, new_body = _json_error(start["status"], message)
    keep = [
        (k, v) for k, v in start.get("headers", []) if k not in (b"content-type", b"content-length")
    ]
    new_start["headers"] = keep + new_start["headers"][:2]  # the app decides keep-alive
    return new_start, new_body["body"]


class RequestGuard:
    """
    ASGI middleware. Per HTTP request:

    - body size: a ``Content-Length`` over the limit is refused (413) before one body byte is
      read; a body without one is counted as it arrives and refused at the limit. The limit is
      ``max_multipart_bytes`` for ``multipart/form-data`` (file uploads) and
      ``max_other_bytes`` for anything else (JSON calls);
    - slow bodies: the body must arrive within ``body_timeout`` seconds plus 1 s per
      :data:`MIN_RATE` bytes received, else 408 and the connection is closed. Only while the
      body is read: a streamed answer (server-sent events) waits on the client for as long as
      it takes;
    - ``upload_dir`` (the page's): a JSON body naming a file (a ``"path"``) outside it is
      refused (403) before the page sees it: only files uploaded to this server may be read;
    - outside ``/gradio_api/``, 4xx answers use ``{"error": message}``.

    Refusals are ``{"error": message}`` with ``Connection: close``.
    """

    def __init__(
        self,
        app,
        *,
        max_multipart_bytes: int,
        max_other_bytes: int = 2**20,
        body_timeout: float = 20.0,
        upload_dir: Optional[str] = None,
    ):
        self.app = app
        self.max_multipart_bytes = max_multipart_bytes
        self.max_other_bytes = max_other_bytes
        self.body_timeout = body_timeout
        self.upload_dir = upload_dir

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers", []))
        exchange = _Exchange(send, rewrite=not path.startswith(GRADIO_PREFIX))
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        limit = self.max_multipart_bytes if multipart else self.max_other_bytes
        what = "a multipart body (the files and fields)" if multipart else "a request body"
        over = f"over this server's limit of {limit / 2**20:g} MB"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            why = f"{what} of {int(length)} bytes, {over}: refused before reading it"
            return await exchange.refuse(413, why)
        too_large = f"{what} {over}: reading stopped there"
        body_receive = self._guarded(receive, exchange, limit, too_large)
        try:
            # Every route, not only /gradio_api/: no spelling of a path may slip by.
            if self.upload_dir and not multipart:
                body_receive = await self._check_files(body_receive, receive, exchange)
                if body_receive is None:
                    return
            await self.app(scope, body_receive, exchange.send)
        except _Refused:
            pass
        except Exception:
            if not exchange.refused:
                raise

    def _guarded(self, receive, exchange: _Exchange, limit: int, too_large: str):
        start = time.monotonic()
        received = 0
        done = False

        async def guarded():
            nonlocal received, done
            if exchange.refused:
                return {"type": "http.disconnect"}
            if done:
                return await receive()
            allowed = start + self.body_timeout + received / MIN_RATE - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(allowed, 0.001))
            except asyncio.TimeoutError:
                seconds = time.monotonic() - start
                await exchange.refuse(
                    408,
                    f"request body too slow: {received} bytes in {seconds:.0f} s (this server "
                    f"waits {self.body_timeout:g} s plus 1 s per {MIN_RATE // 1024} KB)",
                )
                raise _Refused() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    await exchange.refuse(413, too_large)
                    raise _Refused()
                done = not message.get("more_body", False)
            return message

        return guarded

    async def _check_files(self, body_receive, receive, exchange: _Exchange):
        """Read a (small, bounded) JSON body whole, refuse it if it names a file outside the
        upload folder, else hand it on unread. None: refused."""
        chunks = []
        while True:
            message = await body_receive()
            if message["type"] != "http.request":
                return body_receive
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            value = json.loads(body) if body.strip() else None
        except ValueError:
            value = None  # not JSON: gradio cannot read it either
        foreign = foreign_paths(value, self.upload_dir) if value is not None else []
        if foreign:
            await exchange.refuse(
                403,
                f"{_shown(foreign)}: not a file uploaded to this server: upload it first "
                "(the page's image box, or gradio's /gradio_api/upload), or pick a sample by "
                "name; nothing was read",
            )
            return None
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the wait for a disconnect

        return replay


def _shown(paths: Iterable[str]) -> str:
    paths = list(paths)
    more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
    return repr(paths[0][:200]) + more


def timed_protocol(header_timeout: float) -> type:
    """uvicorn's HTTP/1.1 (h11) protocol whose connections are closed when a request's headers
    do not arrive within ``header_timeout`` seconds: of the connection's opening, or of the
    first byte after the last answer (between requests, uvicorn's own ``timeout_keep_alive``
    closes an idle connection)."""

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting_for_headers():
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol
