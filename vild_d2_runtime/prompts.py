"""Class names as CLIP reads them, and ViLD's prompt filling: the one rule of vild_d2 and the
runtime (``vild_d2.text`` imports it from here; nothing here needs PyTorch).

CLIP's tokenizer (the ``clip`` package's ``simple_tokenizer``) reads a text through ftfy's
``fix_text`` (Unicode NFC, fullwidth letters as ASCII, ligatures split, most control
characters dropped), HTML unescaping, runs of whitespace as one space, and lower case.
:func:`process_name` reads a class name that way before ViLD's own rules, so names that CLIP
reads alike ("red  star" and "red star", composed and decomposed "café", "ｃａｔ" and "cat",
"ﬁsh" and "fish") give the same prompts, hence the same embedding, and
:mod:`vild_d2_runtime.names` refuses two of them in one vocabulary. A name with a control
character (e.g. "\\x00", which CLIP drops without a word) is refused.
"""

import functools
import re
import unicodedata
from typing import List, Sequence

from .tokenizer import _clean

__all__ = ["check_name_characters", "process_name", "article", "fill_prompts", "parse_names"]


def check_name_characters(name: str) -> None:
    """Raise ValueError, naming the name and the character, for a control character (a tab
    counts as a space) or a lone surrogate: characters no one types on purpose, that CLIP drops
    or cannot read."""
    if not isinstance(name, str):
        raise ValueError(f"class name {name!r} is a {type(name).__name__}, not text")
    for i, ch in enumerate(name):
        kind = unicodedata.category(ch)
        if (kind == "Cc" and ch != "\t") or kind == "Cs":
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise ValueError(
                f"class name {shown!r} has a control character (U+{ord(ch):04X} at position "
                f"{i + 1}): remove it"
            )


@functools.lru_cache(maxsize=1 << 16)
def process_name(name: str) -> str:
    """The name as CLIP reads it (see the module's docstring), then ViLD's rules: '_' as a
    space, '/' as ' or ', trailing dots removed. 'Traffic_light' -> 'traffic light', 'a/b.' ->
    'a or b', 'ｃａｔ' -> 'cat', 'red  star' -> 'red star'. ValueError for a control
    character."""
    check_name_characters(name)
    text = _clean(name).replace("_", " ").replace("/", " or ")
    return " ".join(text.split()).rstrip(".").rstrip()


def article(name: str) -> str:
    """'an' if the processed name starts with a vowel, else 'a'."""
    return "an" if process_name(name).startswith(tuple("aeiou")) else "a"


def fill_prompts(name: str, templates: Sequence[str]) -> List[str]:
    """
    Fill every template with the processed ``name`` ("{}" = name, "{article}" = a/an); returns
    len(templates) prompts.

    As in the official ViLD code, a filled prompt starting with "a" or "the" gets the prefix
    "This is ". The test is a plain, case-sensitive ``str.startswith``, so prompts starting
    with e.g. "art" or "another" are prefixed too, and "A photo" is not.
    """
    processed = process_name(name)
    if not processed:
        raise ValueError(f"class name {name!r} is empty after processing")
    art = article(name)
    prompts = [t.format(processed, article=art) for t in templates]
    return ["This is " + p if p.startswith(("a", "the")) else p for p in prompts]


def parse_names(text: str) -> List[str]:
    """Typed class names, the one rule of every entry point (tools, predictor, server, the
    runtime): ``"red star, blue cross"`` (commas or new lines) -> ``["red star", "blue cross"]``.

    Returns [] for a text with no name at all (the caller says whether that is allowed).

    Raises:
        ValueError: an empty item between names ("red star,,blue cross"), naming it.
    """
    items = [n.strip() for n in re.split(r"[,\n]", (text or "").strip())]
    if not any(items):
        return []
    empty = [i + 1 for i, n in enumerate(items) if not n]
    if empty:
        raise ValueError(
            f"empty class name (item {empty[0]} of {len(items)}) in {text[:200]!r}: remove the "
            "extra comma"
        )
    return items
