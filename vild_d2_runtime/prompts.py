"""ViLD's prompt filling (vild_d2.text.prompts' rules, without its package): class names are
normalised, filled into each template, and prompts starting with "a"/"the" get "This is "."""

import re
from typing import List, Sequence

__all__ = ["process_name", "article", "fill_prompts", "parse_names"]


def process_name(name: str) -> str:
    """'traffic_light' -> 'traffic light', 'a/b.' -> 'a or b' (lowercase, trailing dots removed)."""
    return name.replace("_", " ").replace("/", " or ").lower().strip().rstrip(".")


def article(name: str) -> str:
    """'an' if the processed name starts with a vowel, else 'a'."""
    return "an" if process_name(name).startswith(tuple("aeiou")) else "a"


def fill_prompts(name: str, templates: Sequence[str]) -> List[str]:
    """Every template filled with the processed ``name`` ("{}" = name, "{article}" = a/an)."""
    processed = process_name(name)
    if not processed:
        raise ValueError(f"class name {name!r} is empty after processing")
    art = article(name)
    prompts = [t.format(processed, article=art) for t in templates]
    # As the official ViLD code: a plain, case-sensitive startswith ("another" counts).
    return ["This is " + p if p.startswith(("a", "the")) else p for p in prompts]


def parse_names(text: str) -> List[str]:
    """Typed class names (the tools' rule): ``"red star, blue cross"`` (commas or new lines)
    -> ``["red star", "blue cross"]``; [] for no name; an empty item between names is an
    error."""
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
