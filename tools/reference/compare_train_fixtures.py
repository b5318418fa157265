"""TF against TF: two training fixtures of the same config (tools/official_reference.py --mode
train), written with other thread counts, compared variable by variable on the gradients both
store in full (every 1-D variable and the predictor kernels; FORMAT.md "Training fixture").
How far the official graph moves from itself under another float32 reduction order: the
resolution of the reference for each variable.

    python tools/reference/compare_train_fixtures.py A/train_vild_ensemble.npz \\
        B/train_vild_ensemble.npz [--show fpn/p4-bn/beta]
"""

import argparse
from typing import Dict

import numpy as np


def full_gradients(path: str) -> Dict[str, np.ndarray]:
    """{variable: float64 gradient} of the variables a fixture stores in full."""
    ref = np.load(path, allow_pickle=False)
    sizes = dict(zip((str(n) for n in ref["var_names"]), ref["var_sizes"].tolist()))
    out, offset = {}, 0
    for n in ref["full_names"]:
        size = sizes[str(n)]
        out[str(n)] = ref["full_grad"][offset : offset + size].astype(np.float64)
        offset += size
    return out


def compare(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> Dict[str, tuple]:
    """{variable: (relative L2 of b - a to a, cosine)} over the variables both hold."""
    out = {}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        if nx == 0 or ny == 0:
            continue
        out[name] = (float(np.linalg.norm(y - x) / nx), float(x @ y / (nx * ny)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--show", nargs="*", default=[], help="variables to print in any case")
    p.add_argument("--top", type=int, default=10, help="the worst this many")
    args = p.parse_args(argv)
    figures = compare(full_gradients(args.first), full_gradients(args.second))
    rel = np.array([f[0] for f in figures.values()])
    print(f"{len(figures)} variables; rel L2 median {np.median(rel):.2e}, max {rel.max():.2e}")
    worst = sorted(figures.items(), key=lambda kv: -kv[1][0])[: args.top]
    for name, (r, c) in [*worst, *((n, figures[n]) for n in args.show if n in figures)]:
        print(f"  {name}: rel L2 {r:.2e}, cosine {c:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
