"""The ``vocabulary`` task: building the text classifier cold (the LVIS names x the prompt
templates through CLIP), switching ViLD's vocabulary from the disk cache and in memory, and how
the cost of a build scales with its number of names."""

import os
import statistics
import time
from typing import Sequence

import clip
import torch

from vild_d2.text import (
    VIT_B_32,
    TextEncoder,
    build_clip,
    builtin_vocabulary,
    fill_prompts,
    load_templates,
)

from .common import median_ms, run_python, sync
from .models import TINY_CLIP_LABEL, BenchmarkSetup

__all__ = ["benchmark_vocabulary", "vocabulary_scaling"]


def time_cold_encoding(encoder: TextEncoder, names: Sequence[str], num_names: int) -> float:
    """Milliseconds to encode all ``names`` with ``encoder`` (tokenising included), measured on
    the first ``num_names`` and scaled linearly; CLIP is loaded before the timing."""
    _ = encoder.model  # loads CLIP
    start = time.perf_counter()
    encoder.encode(names[:num_names])
    return (time.perf_counter() - start) * 1000 * len(names) / num_names


def time_cached_switch(vild, specs: Sequence, rounds: int) -> float:
    """Median milliseconds of ``vild.set_vocabulary`` between ``specs`` once each is in the
    disk cache (the first builds fill it)."""
    for spec in specs:
        vild.set_vocabulary(spec)
    times = []
    for spec in list(specs) * rounds:
        start = time.perf_counter()
        vild.set_vocabulary(spec)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_vit_b_32_text(names: Sequence[str], templates, device: str, num_names: int = 4) -> dict:
    """ViT-B/32's text tower (random weights): tokenise + encode ``num_names`` names' prompts,
    scaled linearly to all ``names`` (the whole set takes about an hour on a CPU)."""
    torch.manual_seed(0)
    model = build_clip(**VIT_B_32).to(device).eval()
    prompts = [p for n in names[:num_names] for p in fill_prompts(n, templates)]
    with torch.no_grad():
        model.encode_text(clip.tokenize(prompts[:8]).to(device))  # warm-up
        sync(device)
        start = time.perf_counter()
        model.encode_text(clip.tokenize(prompts).to(device))
        sync(device)
    seconds = time.perf_counter() - start
    return {
        "cold_1203_vit_b_32_scaled": 1000 * seconds * len(names) / num_names,
        "cold_1203_vit_b_32_note": f"measured on {num_names} names ({len(prompts)} prompts), "
        f"scaled linearly to {len(names)}; random weights",
    }


def vocabulary_scaling(clip_path: str, sizes: Sequence[int]) -> dict:
    """
    Building vocabularies of ``sizes`` names (x the 63 templates), each in a fresh process
    (:mod:`benchmarks.encode_names`) so that its peak memory is its own:
    ``{n: {"names_per_s", "peak_mib"}}`` (peak = the process's VmHWM, Linux only; CLIP and
    torch included). Cost per name should be flat and the peak should not grow with n
    (prompts are made and encoded a batch at a time).
    """
    out = {}
    for n in sizes:
        stdout = run_python(
            "-m", "benchmarks.encode_names", clip_path, str(n), what=f"encoding {n} names"
        )
        seconds, peak = map(float, stdout.split()[-2:])
        out[str(n)] = {"names_per_s": n / seconds, "peak_mib": peak}
    return out


def benchmark_vocabulary(setup: BenchmarkSetup) -> dict:
    """
    Building the text classifier: the 1203 LVIS names x the 63 prompt templates encoded cold
    with the tiny CLIP (quick: 60 names, scaled) and, unless skipped, ViT-B/32's text tower;
    switching ViLD's vocabulary from the disk cache (``lvis`` <-> ``coco``; quick: 10 names <->
    ``voc``) and in memory. ViLD's vocabulary is restored afterwards.
    """
    vild = setup.vild
    names = builtin_vocabulary("lvis").names
    templates = load_templates()
    # The model's own cache: the full run's cold build is then the model's first "lvis".
    cache_dir = vild.text_encoder.cache_dir
    encoder = TextEncoder(
        setup.clip_path, templates=templates, cache_dir=str(cache_dir), device=setup.device
    )
    num_names = 60 if setup.quick else len(names)
    pair = [names[:10], "voc"] if setup.quick else ["lvis", "coco"]
    original = vild.vocabulary
    try:
        cold = time_cold_encoding(encoder, names, num_names)
        cached = time_cached_switch(vild, pair, rounds=3 if setup.quick else 10)
        # ViLDPredictor's in-memory LRU hit: only the classifier's buffers change.
        last = vild.vocabulary
        in_memory = median_ms(lambda: vild.set_vocabulary(last), runs=20)
    finally:
        vild.set_vocabulary(original)
    extra = {"cold_1203_clip": TINY_CLIP_LABEL}
    if num_names < len(names):
        extra["cold_1203_scaled_from_names"] = num_names
    extra["cached_switch_between"] = ["10 names" if setup.quick else "lvis", pair[1]]
    extra["cached_switch_in_memory"] = in_memory
    if setup.use_vit:
        extra.update(time_vit_b_32_text(names, templates, setup.device))
    if os.path.exists("/proc/self/status"):  # peak memory is read from Linux's /proc
        sizes = (50, 200) if setup.quick else (1000, 10000)
        extra["build_scaling_tiny_clip"] = vocabulary_scaling(setup.clip_path, sizes)
    return {
        "vocabulary_ms": {"cold_1203": cold, "cached_switch": cached},
        "vocabulary_extra": extra,
    }
