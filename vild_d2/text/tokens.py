"""What CLIP sees of a class name: its prompts as token ids, cut at CLIP's context length.

Two names whose prompts CLIP sees identically get identical embeddings: in one vocabulary they
split every score between them (0.5 / 0.5), whatever the image. :func:`check_distinguishable`
refuses such names, naming both, and reports names whose prompts CLIP truncates.
"""

import functools
import logging
from typing import Dict, List, Optional, Sequence, Tuple

from clip.simple_tokenizer import SimpleTokenizer

from .prompts import fill_prompts, process_name

__all__ = ["check_distinguishable"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()  # reads CLIP's BPE vocabulary (bundled with the clip package)


def _tokens(text: str) -> Tuple[int, ...]:
    return tuple(_tokenizer().encode(text))


@functools.lru_cache(maxsize=16)
def _template_overhead(templates: Tuple[str, ...]) -> int:
    """The most tokens a template adds around a one-token name (start/end tokens included)."""
    return max(len(_tokens(p)) for p in fill_prompts("x", templates)) - 1 + 2


def _short(name: str, n: int = 60) -> str:
    return repr(name if len(name) <= n else name[:n] + "...")


@functools.lru_cache(maxsize=1 << 16)
def _seen(name: str, templates: Tuple[str, ...], context_length: int) -> Tuple[object, bool]:
    """(what CLIP sees of ``name``'s prompts, whether any prompt is truncated)."""
    processed = process_name(name)
    if len(_tokens(processed)) + _template_overhead(templates) <= context_length:
        return processed, False  # no prompt reaches the limit: the processed name decides
    body = context_length - 2  # CLIP's start and end tokens
    prompts = [_tokens(p) for p in fill_prompts(name, templates)]
    return tuple(p[:body] for p in prompts), any(len(p) > body for p in prompts)


def check_distinguishable(
    names: Sequence[str],
    templates: Sequence[str],
    synonyms: Optional[Sequence[Sequence[str]]] = None,
    context_length: int = 77,
) -> List[str]:
    """
    Refuse names CLIP cannot tell apart: the same after name processing (case, ``_``, a
    trailing ``.``), or whose every prompt is the same once cut at ``context_length`` tokens.

    Returns:
        The names whose prompts CLIP truncates (logged as a warning).

    Raises:
        ValueError: naming both names of the first pair that would encode identically.
    """
    templates = tuple(templates)
    first: Dict[object, int] = {}
    truncated = []
    for k, name in enumerate(names):
        seen, cut = _seen(name, templates, context_length)
        if cut:
            truncated.append(name)
        key = (seen, tuple(process_name(s) for s in synonyms[k]) if synonyms else ())
        if key in first and names[first[key]] == name:
            raise ValueError(
                f"duplicate class name {_short(name)} (items {first[key] + 1} and {k + 1}): "
                "remove one"
            )
        if key in first:
            other = names[first[key]]
            why = (
                "CLIP's prompts are cut at its context length before they differ"
                if cut
                else "the names are the same once processed (lowercase, '_' as a space)"
            )
            raise ValueError(
                f"class names {_short(other)} (item {first[key] + 1}) and {_short(name)} "
                f"(item {k + 1}) "
                f"would encode identically ({why}): every score would be split between them. "
                "Remove one, or make them differ" + (" earlier in the name" if cut else "")
            )
        first[key] = k
    if truncated:
        shown = ", ".join(_short(n) for n in truncated[:5])
        logger.warning(
            "%d class name(s) are too long for CLIP's %d tokens: their prompts are truncated "
            "(CLIP sees only their beginning): %s",
            len(truncated),
            context_length,
            shown,
        )
    return truncated
