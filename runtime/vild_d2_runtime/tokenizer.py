"""CLIP's byte-pair-encoding tokenizer without PyTorch: the rules of the ``clip`` package's
``simple_tokenizer.py`` (ftfy + html clean-up, lower case, its word pattern, byte-level BPE on
its merges file), so that :meth:`Tokenizer.__call__` gives the ids of
``clip.tokenize(texts, context_length, truncate=True)`` (tests/deploy/test_deploy_runtime.py
checks).
"""

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import ftfy
import numpy as np
import regex

__all__ = ["BPE_FILE", "Tokenizer", "find_bpe_file"]

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's merges, shipped with the clip package
_NUM_MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary uses (the file has more)
_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def find_bpe_file(folder: Optional[str] = None) -> Path:
    """CLIP's merges file: in ``folder`` (where the exporter copies it, beside the text
    encoder), else the installed ``clip`` package's, found without importing it (importing
    ``clip`` imports torch)."""
    candidates = [Path(folder) / BPE_FILE] if folder else []
    if candidates and candidates[0].is_file():
        return candidates[0]
    try:
        spec = importlib.util.find_spec("clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / BPE_FILE for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"CLIP's {BPE_FILE} not found (looked in: {', '.join(map(str, candidates)) or 'nowhere'}); "
        "tools/export_model.py --vocabulary-input copies it beside text_encoder.onnx"
    )


@lru_cache()
def _bytes_to_unicode() -> Dict[int, str]:
    """CLIP's reversible map of the 256 byte values to printable characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """Texts -> (N, context_length) int64 token ids: start token, BPE ids, end token, zeros."""

    def __init__(self, bpe_path: Optional[str] = None):
        bpe_path = Path(bpe_path) if bpe_path else find_bpe_file()
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1 : _NUM_MERGES + 1]]
        vocab = list(_bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self._bpe_cache: Dict[str, Tuple[str, ...]] = {}

    def _bpe(self, token: str) -> Tuple[str, ...]:
        """One word's BPE pieces: merge the lowest-ranked adjacent pair until none is known."""
        cached = self._bpe_cache.get(token)
        if cached is not None:
            return cached
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            first, second = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._bpe_cache[token] = word
        return word

    def encode(self, text: str) -> List[int]:
        """One text's BPE ids (no start/end tokens)."""
        byte_map = _bytes_to_unicode()
        ids = []
        for word in _WORDS.findall(_clean(text)):
            word = "".join(byte_map[b] for b in word.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self._bpe(word)]
        return ids

    def __call__(self, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
        """(N, context_length) int64; a longer text is cut and ends with the end token, as
        ``clip.tokenize(..., truncate=True)`` does."""
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot][:context_length]
            ids[-1] = self.eot
            out[i, : len(ids)] = ids
        return out
