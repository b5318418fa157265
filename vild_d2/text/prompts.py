"""Class-name processing and prompt filling for the ViLD text classifier.

Follows the official ViLD code: names are normalised, filled into each prompt template, and
prompts that start with "a"/"the" get the prefix "This is ". The name rules (read as CLIP's
tokenizer reads them, control characters refused) and the prompt filling are the deployment
contract's (``vild_d2_runtime.contract``), shared with the runtime; this module adds the
template files.
"""

import logging
from pathlib import Path
from typing import List, Optional

from vild_d2_runtime.contract import article, fill_prompts, process_name

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
