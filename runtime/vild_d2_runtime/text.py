"""Class names -> ViLD classifier embeddings with the exported CLIP text tower
(``text_encoder.onnx``) and the prompt ensemble in numpy, cached per name in memory and
optionally on disk. Equals ``vild_d2.text.TextEncoder`` (tests/deploy/test_deploy_runtime.py)."""

import collections
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .graphs import open_graph
from .contract import TEXT_INPUTS, fill_prompts
from .tokenizer import Tokenizer, find_bpe_file

__all__ = ["TextEncoder", "l2_normalize"]

_EPS = 1e-12  # torch.nn.functional.normalize's


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (at least 1e-12), as torch's F.normalize."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


class TextEncoder:
    """
    Each name's embedding: its prompts (every template, ``vild_d2.text`` rules) through the
    text tower, each L2-normalised, averaged, L2-normalised again: (D,) float32. Names seen
    before come from memory (and from ``cache_dir`` across processes), so a vocabulary of known
    names costs a lookup.
    """

    def __init__(
        self,
        path: str,
        *,
        cache_dir: Optional[str] = None,
        batch_size: int = 256,
        threads: int = 0,
        memory_cache_size: int = 100_000,
        providers: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            path: ``text_encoder.onnx`` (CLIP's merges file is looked for beside it).
            cache_dir: embeddings also cached on disk here (one small file per name); None = in
                memory only.
            batch_size: prompts per run of the graph.
            threads: ONNX Runtime intra-op threads (0 = its default).
            memory_cache_size: names kept in memory (least recently used dropped first).
            providers: ONNX Runtime execution providers (default: the CPU's).
        """
        self.path = Path(path).expanduser()
        self.session, meta = open_graph(str(self.path), "text encoder", threads, providers)
        self.templates = list(meta["templates"])
        self.context_length = int(meta["context_length"])
        self.dim = int(meta["embedding_dim"])
        self.tokenizer = Tokenizer(str(find_bpe_file(str(self.path.parent))))
        self.batch_size = batch_size
        # The graph's bytes and the templates name the embedding space; a cache of another
        # encoder is never read.
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.key = hashlib.sha256(json.dumps([digest, self.templates]).encode()).hexdigest()[:16]
        self.cache_dir = Path(cache_dir).expanduser() / self.key if cache_dir else None
        self._memory: Dict[str, np.ndarray] = collections.OrderedDict()
        self._memory_size = memory_cache_size
        self.encoded_names = 0  # names that went through the graph (not from a cache)

    def encode(self, names: Sequence[str]) -> np.ndarray:
        """K names -> (K, D) float32, unit rows. Raises ValueError for no name or an empty one."""
        names = list(names)
        if not names:
            raise ValueError("no class names to encode (K = 0): give at least one")
        memory = self._memory
        try:  # all in memory: a gather (~0.3 ms for 1203 names), what a vocabulary switch costs
            known = [memory[n] for n in names]
        except KeyError:
            known = None
        if known is not None:
            if len(memory) > self._memory_size // 2:  # recency matters once eviction is near
                for n in names:
                    memory.move_to_end(n)
            return np.array(known)
        found = {n: self._cached(n) for n in dict.fromkeys(names)}
        missing = [n for n, e in found.items() if e is None]
        if missing:
            for name, emb in zip(missing, self._compute(missing)):
                found[name] = emb
                self._remember(name, emb)
        return np.array([found[n] for n in names])

    def _compute(self, names: Sequence[str]) -> np.ndarray:
        prompts = [fill_prompts(n, self.templates) for n in names]  # raises for an empty name
        owner = np.repeat(np.arange(len(names)), [len(p) for p in prompts])
        flat = [p for group in prompts for p in group]
        sums = np.zeros((len(names), self.dim), dtype=np.float64)
        for start in range(0, len(flat), self.batch_size):
            tokens = self.tokenizer(flat[start : start + self.batch_size], self.context_length)
            (out,) = self.session.run(None, {TEXT_INPUTS[0]: tokens})
            np.add.at(
                sums, owner[start : start + len(tokens)], l2_normalize(out.astype(np.float64))
            )
        counts = np.bincount(owner, minlength=len(names))[:, None]
        self.encoded_names += len(names)
        return l2_normalize(sums / counts).astype(np.float32)

    def _file(self, name: str) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{hashlib.sha256(name.encode('utf-8')).hexdigest()}.npy"

    def _cached(self, name: str) -> Optional[np.ndarray]:
        emb = self._memory.get(name)
        if emb is not None:
            self._memory.move_to_end(name)
            return emb
        path = self._file(name)
        if path is None or not path.is_file():
            return None
        try:
            emb = np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # a corrupt cache file is recomputed, never fatal
            return None
        if emb.shape != (self.dim,) or emb.dtype != np.float32:
            return None
        # NaN, infinite or not unit length (a damaged or foreign file): recomputed, and the
        # file replaced by the new embedding.
        if not np.isfinite(emb).all() or abs(float(np.linalg.norm(emb)) - 1.0) > 1e-3:
            return None
        self._remember(name, emb, write=False)
        return emb

    def _remember(self, name: str, emb: np.ndarray, write: bool = True) -> None:
        self._memory[name] = emb
        while len(self._memory) > self._memory_size:
            self._memory.popitem(last=False)
        path = self._file(name)
        if write and path is not None:
            # Written to a temporary name and renamed: a reader never sees half a file.
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb)
            os.replace(tmp, path)
