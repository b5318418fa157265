"""What CLIP sees of a class name: its prompts as token ids, cut at CLIP's context length.

Two names whose prompts CLIP sees identically get identical embeddings: in one vocabulary they
split every score between them (0.5 / 0.5), whatever the image. :func:`check_distinguishable`
refuses such names, naming both, and reports names whose prompts CLIP truncates. The rule is
``vild_d2_runtime.names``' (the runtime applies the same one); here CLIP's own tokenizer counts
the tokens.
"""

import functools
import logging
from typing import List, Optional, Sequence

from clip.simple_tokenizer import SimpleTokenizer
from vild_d2_runtime import names as _names

__all__ = ["check_distinguishable"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()  # reads CLIP's BPE vocabulary (bundled with the clip package)


def check_distinguishable(
    names: Sequence[str],
    templates: Sequence[str],
    synonyms: Optional[Sequence[Sequence[str]]] = None,
    context_length: int = 77,
) -> List[str]:
    """
    Refuse names CLIP cannot tell apart: the same once read as CLIP reads them (case, ``_``,
    spaces, Unicode forms, a trailing ``.``), or whose every prompt is the same once cut at
    ``context_length`` tokens; and names with a control character.

    Returns:
        The names whose prompts CLIP truncates (logged as a warning).

    Raises:
        ValueError: naming both names of the first pair that would encode identically.
    """
    encode = _tokenizer().encode
    truncated = _names.check_distinguishable(names, templates, encode, synonyms, context_length)
    if truncated:
        logger.warning(_names.truncation_message(truncated, context_length))
    return truncated
