"""tools/serve.py's limits, on real servers on 127.0.0.1: the page reads only files uploaded to
it; the body-size limit stops reading at the limit; slow and idle connections are closed; every
4xx is ``{"error": ...}``; the server's temporary files go when it stops; its options are
range-checked at start. Raw sockets where a client must misbehave (httpx cannot)."""

import vild_d2  # noqa: F401  (first: compat bridges)

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.serve import DetectionService, Limits, ServerThread, build_app

from tiny_world import make_random_model  # tests/ helper

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, tiny_clip_path):
    config_file, opts = make_random_model(tmp_path_factory.mktemp("limits"), tiny_clip_path)
    return ViLDPredictor(load_config(config_file, opts + ["TEST.DETECTIONS_PER_IMAGE", "5"]))


def _png(path: Path, value: int = 200) -> Path:
    Image.fromarray(np.full((48, 64, 3), value, np.uint8)).save(path)
    return path


def _recv_all(sock: socket.socket, timeout: float):
    """What the server sends until it closes the connection; None if it is still open after
    ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    except socket.timeout:
        return None


def _answer(raw: bytes):
    """(status, JSON body) of a raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


# --- the page: only uploaded files ---------------------------------------------------------
def test_the_page_reads_only_what_was_uploaded_and_cleans_up(predictor, tmp_path):
    """A page API call naming a server file (outside every allowed folder, and the checkout's
    docs/images/*.png) is refused with {"error"} before the file is read; an uploaded file
    works; when the server stops, the page's JSON folder and the sample photos are gone."""
    from gradio.utils import get_upload_folder

    outside = tmp_path / "private.png"  # unique pixels: no earlier copy can match its digest
    Image.fromarray(np.random.default_rng().integers(0, 256, (48, 64, 3), np.uint8)).save(outside)
    docs_png = sorted((ROOT / "docs" / "images").glob("*.png"))[0]
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    control = _png(tmp_path / "control.png")
    # relatime: a read moves the access time when it is older than the modification time.
    for path in (outside, docs_png, control):
        mtime = path.stat().st_mtime_ns
        os.utime(path, ns=(mtime - 3600 * 10**9, mtime))
    control.read_bytes()
    atime_works = control.stat().st_atime_ns != control.stat().st_mtime_ns - 3600 * 10**9
    before = {p: p.stat().st_atime_ns for p in (outside, docs_png)}

    service = DetectionService(predictor, samples=None)  # scikit-image's photos, written
    samples_folder = Path(next(iter(service.samples.values()))).parent
    with ServerThread(build_app(service)) as server:
        json_folder = Path(service._temporary[-1])
        assert json_folder.is_dir() and samples_folder.is_dir()
        tricks = [str(outside), str(docs_png), f"{get_upload_folder()}/../{outside.name}"]
        for path in tricks:
            for with_meta in (True, False):  # gradio checks only FileData with its "meta"
                data = {"path": path, "orig_name": "x.png"}
                if with_meta:
                    data["meta"] = {"_type": "gradio.FileData"}
                body = {"data": [[data], [], "typed names", "red square", 0.0]}
                for route in ("/gradio_api/call/run", "/gradio_api/queue/join"):
                    r = httpx.post(server.url + route, json=dict(body, fn_index=0))
                    assert r.status_code == 403, (path, route, r.text)
                    assert "not a file uploaded to this server" in r.json()["error"]
        if atime_works:
            assert {p: p.stat().st_atime_ns for p in before} == before  # never opened
        cached = list(Path(get_upload_folder()).glob(f"*/{outside.name}"))
        assert not any(hashlib.sha256(p.read_bytes()).hexdigest() == digest for p in cached)

        # The page itself refuses such a path too (were the guard bypassed).
        from vild_d2.serve.page import open_upload
        from vild_d2.serve.service import BadInput

        with pytest.raises(BadInput, match="not a file uploaded to this server"):
            open_upload(str(outside))
        # Gradio's own 404 (outside its /gradio_api/ protocol) in the error layout too.
        r = httpx.get(server.url + "/nowhere")
        assert (r.status_code, r.json()) == (404, {"error": "Not Found"})

        # What the page uploaded, and a sample by name, are read.
        upload = _png(tmp_path / "mine.png", 90)
        r = httpx.post(
            server.url + "/gradio_api/upload",
            files=[("files", ("mine.png", upload.read_bytes(), "image/png"))],
        )
        assert r.status_code == 200, r.text
        data = {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": "a"}
        sample = next(iter(service.samples))
        r = httpx.post(
            server.url + "/gradio_api/call/run",
            json={"data": [[data], [sample], "typed names", "red square", 0.0]},
        )
        assert r.status_code == 200, r.text
        events = httpx.get(f"{server.url}/gradio_api/call/run/{r.json()['event_id']}", timeout=60)
        assert "event: complete" in events.text and "detections** in 2 image(s)" in events.text
        assert list(json_folder.glob("detections-*.json"))  # the download, in gradio's cache
    assert not json_folder.exists() and not samples_folder.exists()


# --- limits before memory ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(predictor):
    """Limits made small: 1 MB a file, 2 files, 1 s for slow clients, 1 s keep-alive."""
    limits = Limits(max_upload_mb=1.0, max_images=2, slow_timeout_s=1.0, keep_alive_s=1.0)
    service = DetectionService(predictor, limits=limits, samples={})
    with ServerThread(build_app(service, page=False)) as server:
        yield server


def _multipart_head(url_path: str, length: int, boundary: str = "b0undary") -> bytes:
    return (
        f"POST {url_path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
        f"boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _file_part(name: str, boundary: str = "b0undary") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def test_uploads_are_refused_at_the_limit_not_after_reading_them(small_server):
    """A 5 MB body (within the 6 MB body limit: 2 files + 4 MB of fields) whose one file passes
    1 MB: the 413 comes after 1.2 MB were sent, while the client still owes the rest; a
    Content-Length over the body limit gets its 413 before any byte of body; a third file is
    refused at its headers; a chunked form without files is cut at 1 MB."""
    url = small_server.url
    with _connect(url) as sock:
        sock.sendall(_multipart_head("/api/detect", 5 * 2**20) + _file_part("big.png"))
        sock.sendall(b"\0" * int(1.2 * 2**20))  # and no more: a server reading on would wait
        start = time.perf_counter()
        status, body = _answer(_recv_all(sock, 10))
    assert time.perf_counter() - start < 5
    assert status == 413 and body["error"].startswith("big.png: over 1 MB (the upload was stopped")
    assert "above this server's 1 MB per file" in body["error"]

    with _connect(url) as sock:
        sock.sendall(_multipart_head("/api/detect", 1500 * 2**20))  # 1.5 GB announced
        status, body = _answer(_recv_all(sock, 10))
    assert status == 413 and body["error"] == (
        f"a multipart body (the files and fields) of {1500 * 2**20} bytes, over this server's "
        "limit of 6 MB: refused before reading it"
    )

    with _connect(url) as sock:
        parts = b"".join(_file_part(f"{i}.png") + b"x\r\n" for i in range(3))
        sock.sendall(_multipart_head("/api/detect", 5 * 2**20) + parts)
        status, body = _answer(_recv_all(sock, 10))
    assert status == 413 and body["error"].startswith("more than 2 images (the next: '2.png')")

    with _connect(url) as sock:
        sock.sendall(
            b"POST /api/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-"
            b"urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nbuiltin=\r\n"
        )
        for _ in range(40):  # 40 x 32 KB chunks: over 1 MB
            sock.sendall(b"8000\r\n" + b"x" * 0x8000 + b"\r\n")
        status, body = _answer(_recv_all(sock, 10))
    assert status == 413 and body["error"] == (
        "a request body over this server's limit of 1 MB: reading stopped there"
    )
    # The server goes on.
    assert httpx.get(url + "/api/info").status_code == 200


def test_slow_and_idle_connections_are_closed(small_server):
    url = small_server.url
    start = time.perf_counter()
    with _connect(url) as idle, _connect(url) as slow_headers, _connect(url) as slow_body:
        slow_headers.sendall(b"POST /api/detect HTTP/1.1\r\nHost: x\r\n")  # never ends
        slow_body.sendall(_multipart_head("/api/detect", 100_000) + _file_part("a.png") + b"x")
        assert _recv_all(idle, 10) == b""  # closed, nothing said
        assert _recv_all(slow_headers, 10) == b""
        status, body = _answer(_recv_all(slow_body, 10))
    assert status == 408 and body["error"].startswith("request body too slow")
    assert time.perf_counter() - start < 8  # 1 s limits, not the 10 s the test waits
    # Keep-alive: an answered connection left idle is closed after keep_alive_s.
    with _connect(url) as sock:
        sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.perf_counter()
        assert b'"limits"' in _recv_all(sock, 10)
    assert time.perf_counter() - start < 5


def test_every_error_is_in_the_error_layout(small_server):
    url = small_server.url
    cases = [
        ("GET", "/nowhere", 404, "Not Found"),
        ("GET", "/api/nowhere", 404, "Not Found"),
        ("GET", "/api/detect", 405, "Method Not Allowed"),
        ("POST", "/api/info", 405, "Method Not Allowed"),
    ]
    for method, path, status, message in cases:
        r = httpx.request(method, url + path)
        assert (r.status_code, r.json()) == (status, {"error": message}), path
    r = httpx.post(url + "/api/detect", json={"vocabulary": "cat"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = httpx.post(url + "/api/detect", data={"vocabulary": "cat", "treshold": "0.2"})
    assert r.status_code == 400 and r.json()["error"].startswith("unknown form field 'treshold'")


# --- the tool's options ----------------------------------------------------------------------
def test_serve_options_are_range_checked_at_start(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vild_serve_limits", ROOT / "tools/serve.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = ["--config-file", "no/such/config.yaml", "--no-page"]  # checked before the config
    for option, value, message in [
        ("--threshold", "1.5", "--threshold 1.5: must be in [0, 1]"),
        ("--threshold", "nan", "--threshold nan: must be in [0, 1]"),
        ("--max-megapixels", "0", "--max-megapixels 0: must be above 0 and finite"),
        ("--max-megapixels", "nan", "--max-megapixels nan: must be above 0 and finite"),
        ("--max-upload-mb", "-1", "--max-upload-mb -1: must be above 0 and finite"),
        ("--max-upload-mb", "inf", "--max-upload-mb inf: must be above 0 and finite"),
    ]:
        assert tool.main([*base, option, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {message}"], err
