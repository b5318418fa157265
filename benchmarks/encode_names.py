"""Worker of the ``vocabulary`` task (:func:`benchmarks.vocabulary.vocabulary_scaling`): build a
vocabulary of N made-up names with a CLIP checkpoint, in a process of its own so that its peak
memory is its own. Linux only (the peak is read from /proc).

    python -m benchmarks.encode_names CLIP_PATH N

prints ``SECONDS PEAK_MIB``: the encoding time (CLIP loaded before the timing) and the
process's peak resident memory (VmHWM, CLIP and torch included).
"""

import re
import sys
import time


def main(argv=None) -> None:
    clip_path, n = (argv or sys.argv[1:])[:2]
    n = int(n)
    import vild_d2  # noqa: F401  (first: compat bridges)
    from vild_d2.text import TextEncoder

    encoder = TextEncoder(clip_path, cache_dir=None)
    _ = encoder.model  # loaded before the timing
    start = time.perf_counter()
    encoder.encode([f"class number {i}" for i in range(n)])
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        peak_kib = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    print(seconds, peak_kib / 1024)


if __name__ == "__main__":
    main()
