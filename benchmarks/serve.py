"""The ``serve`` task: the web server (``tools/serve.py``'s API) under load. N concurrent clients
on 127.0.0.1 for a bounded time, against the same work done by calling the predictor directly
in one process (the limit). Every answer is checked against the predictor's own for its
vocabulary: an error or a mixed-up vocabulary is counted, never hidden."""

import io
import statistics
import threading
import time
from typing import List, Sequence

import httpx
import numpy as np
from PIL import Image, ImageOps

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.serve import DetectionService, Detections, ServerThread, build_app

from .models import BenchmarkSetup

__all__ = ["run_load", "benchmark_serve"]

# Two vocabularies of the same size, no name shared: a request answered with the other one's
# classifier shows in its names or its scores.
VOCABULARIES = (
    ["person", "helmet", "flag", "rocket", "space suit", "cup"],
    ["cat", "dog", "coffee mug", "spoon", "table", "plant"],
)


def _summary(latencies: List[float], seconds: float) -> dict:
    ms = sorted(1e3 * t for t in latencies)
    if not ms:
        return {"requests": 0, "requests_per_s": 0.0, "p50_ms": 0.0, "p95_ms": 0.0}
    return {
        "requests": len(ms),
        "requests_per_s": round(len(ms) / seconds, 2),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
    }


def _key(detections: Sequence[dict]) -> list:
    return [(d["category_name"], d["score"]) for d in detections]


def _decode(data: bytes) -> np.ndarray:
    """Encoded image bytes -> BGR uint8 (H, W, 3), as the server decodes an upload (PIL, EXIF
    rotation applied), so that the direct calls see the very pixels the server sees."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def run_load(
    url: str,
    predictor: ViLDPredictor,
    images: Sequence[bytes],
    vocabularies: Sequence[Sequence[str]],
    *,
    clients: int = 4,
    seconds: float = 10.0,
    threshold: float = 0.3,
) -> dict:
    """
    Args:
        url: a running server (``tools/serve.py``) whose model is ``predictor``'s.
        images: encoded images (PNG, JPEG bytes); requests cycle over images x vocabularies,
            each client starting elsewhere so that vocabularies interleave.
    Returns:
        ``{"server": {...}, "direct": {...}, "clients", "seconds", "server_vs_direct"}``, with
        requests, requests/s, p50/p95 latency (ms); for the server also errors (non-200 or no
        answer) and mixed_up (an answer that differs from the predictor's for its vocabulary).
    """
    decoded = [_decode(data) for data in images]
    jobs = [(i, list(v)) for i in range(len(images)) for v in vocabularies]

    def direct(i, names):
        # The server's work without HTTP: the predictor, the threshold, the answer's JSON.
        vocab = predictor.resolve_vocabulary(names)
        instances = predictor(decoded[i], vocabulary=vocab)["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        answer = Detections(
            vocab, predictor.novel_mask(vocab), threshold, [(f"image{i}", decoded[i], instances)]
        )
        return answer.to_json()["images"][0]["detections"]

    expected = {(i, tuple(v)): _key(direct(i, v)) for i, v in jobs}  # also warms the caches

    # The limit: the same jobs, one after another, in this process.
    latencies, k, end = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        direct(*jobs[k % len(jobs)])
        latencies.append(time.perf_counter() - start)
        k += 1
    direct_summary = _summary(latencies, seconds)

    lock = threading.Lock()
    served, errors, mixed = [], [0], [0]
    barrier = threading.Barrier(clients)

    def client(c):
        with httpx.Client(timeout=max(60.0, 4 * seconds)) as http:
            barrier.wait()
            end = time.perf_counter() + seconds
            k = c
            while time.perf_counter() < end:
                i, names = jobs[k % len(jobs)]
                k += 1
                start = time.perf_counter()
                try:
                    r = http.post(
                        f"{url}/api/detect",
                        files=[("image", (f"image{i}.png", images[i], "image/png"))],
                        data={"vocabulary": ",".join(names), "threshold": str(threshold)},
                    )
                    ok = r.status_code == 200
                    answer = r.json() if ok else None
                except httpx.HTTPError:
                    ok, answer = False, None
                took = time.perf_counter() - start
                with lock:
                    if not ok:
                        errors[0] += 1
                        continue
                    served.append(took)
                    got = _key(answer["images"][0]["detections"])
                    if answer["vocabulary"] != names or got != expected[(i, tuple(names))]:
                        mixed[0] += 1

    workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    server_summary = dict(_summary(served, seconds), errors=errors[0], mixed_up=mixed[0])
    ratio = server_summary["requests_per_s"] / max(direct_summary["requests_per_s"], 1e-9)
    return {
        "clients": clients,
        "seconds": seconds,
        "images": len(images),
        "vocabularies": [list(v) for v in vocabularies],
        "threshold": threshold,
        "server": server_summary,
        "direct": direct_summary,
        "server_vs_direct": round(ratio, 3),
    }


def benchmark_serve(setup: BenchmarkSetup) -> dict:
    """The ``serve`` task of ``tools/benchmark.py``: the benchmark's ViLD model (random weights)
    behind the API on 127.0.0.1, :func:`run_load` with two vocabularies over its photos
    (quick: 4 clients x 5 s; else 8 clients x 30 s)."""
    predictor = ViLDPredictor(load_config(setup.config_file, setup.opts))
    images = []
    for bgr in setup.images:
        buffer = io.BytesIO()
        Image.fromarray(bgr[:, :, ::-1]).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    clients, seconds = (4, 5.0) if setup.quick else (8, 30.0)
    service = DetectionService(predictor, samples={})
    with ServerThread(build_app(service, page=False)) as server:
        report = run_load(
            server.url,
            predictor,
            images,
            VOCABULARIES,
            clients=clients,
            seconds=seconds,
            threshold=0.05,
        )
    return {"serve": report}
