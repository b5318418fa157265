"""Class-name processing and prompt filling for the ViLD text classifier.

Follows the official ViLD code: names are normalised, filled into each prompt template, and
prompts that start with "a"/"the" get the prefix "This is ".
"""

import logging
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["DEFAULT_TEMPLATES_PATH", "load_templates", "process_name", "article", "fill_prompts"]

logger = logging.getLogger(__name__)

# The 63 ViLD prompt templates; "{}" = class name, "{article}" = "a"/"an".
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_TEMPLATES_PATH = _ASSETS / "vild_prompt_templates.txt"


def load_templates(path: Optional[str] = None) -> List[str]:
    """Read prompt templates, one per line (blank lines skipped). None or "" = the 63 ViLD ones."""
    path = Path(path).expanduser() if path else DEFAULT_TEMPLATES_PATH
    if not path.is_file():
        raise FileNotFoundError(f"prompt templates file not found: {path}")
    templates = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if "{}" not in line:
            raise ValueError(f"{path}:{lineno}: prompt template has no '{{}}' (the name): {line!r}")
        templates.append(line)
    if not templates:
        raise ValueError(f"prompt templates file has no templates: {path}")
    return templates


def process_name(name: str) -> str:
    """'traffic_light' -> 'traffic light', 'a/b.' -> 'a or b' (lowercase, trailing dots removed)."""
    return name.replace("_", " ").replace("/", " or ").lower().strip().rstrip(".")


def article(name: str) -> str:
    """'an' if the processed name starts with a vowel, else 'a'."""
    return "an" if process_name(name).startswith(tuple("aeiou")) else "a"


def fill_prompts(name: str, templates: Sequence[str]) -> List[str]:
    """Fill every template with the processed ``name``; returns len(templates) prompts.

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
