"""ViLD-text classifier: class names -> CLIP prompt-ensemble embeddings -> :class:`Vocabulary`."""

from .encoder import TextEncoder, clip_identity, load_clip, save_random_clip
from .prompts import DEFAULT_TEMPLATES_PATH, article, fill_prompts, load_templates, process_name
from .vocabulary import (
    Vocabulary,
    check_same_width,
    novel_mask,
    resolve_vocabulary,
    vocabulary_from_dataset,
    vocabulary_from_names,
)

__all__ = [
    "DEFAULT_TEMPLATES_PATH",
    "load_templates",
    "process_name",
    "article",
    "fill_prompts",
    "clip_identity",
    "load_clip",
    "TextEncoder",
    "save_random_clip",
    "Vocabulary",
    "novel_mask",
    "vocabulary_from_names",
    "vocabulary_from_dataset",
    "resolve_vocabulary",
    "check_same_width",
]
