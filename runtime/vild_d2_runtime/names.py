"""Which class names one vocabulary may hold together: the one rule of vild_d2 and the runtime.

Two names whose prompts CLIP sees identically get identical embeddings: in one vocabulary they
split every score between them (0.90 -> 0.47 + 0.47), so at the usual thresholds the object
disappears, whatever the image. :func:`check_distinguishable` refuses such pairs, naming both:
names that are the same once read as CLIP reads them (:func:`name_key`: case, '_', runs of
spaces, Unicode forms, a trailing '.', spacing around punctuation), and long names whose every
prompt is the same once cut at CLIP's context length. It also reports the names whose prompts
CLIP truncates. Control characters are refused (:func:`.contract.check_name_characters`).
"""

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .contract import fill_prompts, process_name
from .tokenizer import _WORDS

__all__ = ["check_distinguishable", "check_unique", "name_key", "truncation_message"]

# Text -> its BPE token ids without start/end tokens: ``clip.simple_tokenizer.SimpleTokenizer
# ().encode`` or :meth:`vild_d2_runtime.Tokenizer.encode` (the same ids).
Encode = Callable[[str], Sequence[int]]


def name_key(name: str) -> str:
    """
    What CLIP reads of a class name: its processed text (:func:`.contract.process_name`) cut
    into CLIP's words (letter runs, digits, punctuation runs), joined by one space. CLIP's BPE
    tokens follow from the words alone, so two names with the same key get the same prompts'
    tokens: 'Red  Star' and 'red star', 'ｃａｔ' and 'cat', 'dog!' and 'dog !' have one key.

    Raises:
        ValueError: a control character in the name.
    """
    return " ".join(_WORDS.findall(process_name(name)))


def _short(name: str, n: int = 60) -> str:
    return repr(name if len(name) <= n else name[:n] + "...")


def _pair_error(names: Sequence[str], first: int, k: int, cut: bool = False) -> ValueError:
    """The error for names[first] and names[k], which CLIP would encode identically."""
    if names[first] == names[k]:
        return ValueError(
            f"duplicate class name {_short(names[k])} (items {first + 1} and {k + 1}): remove one"
        )
    why = (
        "CLIP's prompts are cut at its context length before they differ"
        if cut
        else "CLIP reads them as the same name: case, '_', spaces and Unicode forms such as "
        "fullwidth letters, ligatures or composed accents do not count"
    )
    return ValueError(
        f"class names {_short(names[first])} (item {first + 1}) and {_short(names[k])} "
        f"(item {k + 1}) would encode identically ({why}): every score would be split between "
        "them. Remove one, or make them differ" + (" earlier in the name" if cut else "")
    )


def check_unique(names: Sequence[str]) -> None:
    """Refuse (ValueError naming both) two names with one :func:`name_key`, and any control
    character; no templates needed (a vocabulary that already holds its embeddings)."""
    first: Dict[str, int] = {}
    for k, name in enumerate(names):
        key = name_key(name)
        if key in first:
            raise _pair_error(names, first[key], k)
        first[key] = k


@functools.lru_cache(maxsize=16)
def _template_overhead(templates: Tuple[str, ...], encode: Encode) -> int:
    """The most tokens a template adds around a one-token name (start/end tokens included)."""
    return max(len(encode(p)) for p in fill_prompts("x", templates)) - 1 + 2


@functools.lru_cache(maxsize=1 << 16)
def _seen(
    name: str, templates: Tuple[str, ...], context_length: int, encode: Encode
) -> Tuple[object, bool]:
    """(what CLIP sees of ``name``'s prompts, whether any prompt is truncated)."""
    processed = process_name(name)
    if len(encode(processed)) + _template_overhead(templates, encode) <= context_length:
        return name_key(name), False  # no prompt reaches the limit: the name's words decide
    body = context_length - 2  # CLIP's start and end tokens
    prompts = [tuple(encode(p)) for p in fill_prompts(name, templates)]
    return tuple(p[:body] for p in prompts), any(len(p) > body for p in prompts)


def check_distinguishable(
    names: Sequence[str],
    templates: Sequence[str],
    encode: Encode,
    synonyms: Optional[Sequence[Sequence[str]]] = None,
    context_length: int = 77,
) -> List[str]:
    """
    Refuse names CLIP cannot tell apart: the same once read as CLIP reads them
    (:func:`name_key`), or whose every prompt is the same once cut at ``context_length``
    tokens; and names with a control character.

    Args:
        names: K class names.
        templates: the prompt templates.
        encode: text -> CLIP's BPE ids (see :data:`Encode`).
        synonyms: K lists of extra names per class (a class's key includes them).
        context_length: CLIP's.

    Returns:
        The names whose prompts CLIP truncates (see :func:`truncation_message`).

    Raises:
        ValueError: naming both names of the first pair that would encode identically.
    """
    templates = tuple(templates)
    first: Dict[object, int] = {}
    truncated = []
    for k, name in enumerate(names):
        seen, cut = _seen(name, templates, context_length, encode)
        if cut:
            truncated.append(name)
        key = (seen, tuple(name_key(s) for s in synonyms[k]) if synonyms else ())
        if key in first:
            raise _pair_error(names, first[key], k, cut)
        first[key] = k
    return truncated


def truncation_message(truncated: Sequence[str], context_length: int = 77) -> str:
    """A one-line warning for the names :func:`check_distinguishable` found truncated."""
    shown = ", ".join(_short(n) for n in truncated[:5])
    return (
        f"{len(truncated)} class name(s) are too long for CLIP's {context_length} tokens: their "
        f"prompts are truncated (CLIP sees only their beginning): {shown}"
    )
