"""ViLD-text classifier: class names -> CLIP prompt-ensemble embeddings -> :class:`Vocabulary`."""

from ..clip_models import VIT_B_32, build_clip, clip_identity, load_clip
from .categories import BUILTIN_VOCABULARIES, BuiltinVocabulary, builtin_vocabulary
from .encoder import TextEncoder, build_text_encoder
from .prompts import DEFAULT_TEMPLATES_PATH, article, fill_prompts, load_templates, process_name
from .vocabulary import (
    Vocabulary,
    build_vocabularies,
    check_same_width,
    novel_mask,
    parse_names,
    resolve_vocabulary,
    vocabulary_from_dataset,
    vocabulary_from_names,
    vocabulary_specs,
)

__all__ = [
    "BUILTIN_VOCABULARIES",
    "BuiltinVocabulary",
    "builtin_vocabulary",
    "DEFAULT_TEMPLATES_PATH",
    "load_templates",
    "process_name",
    "article",
    "fill_prompts",
    "clip_identity",
    "load_clip",
    "TextEncoder",
    "build_text_encoder",
    "build_clip",
    "VIT_B_32",
    "Vocabulary",
    "novel_mask",
    "parse_names",
    "vocabulary_from_names",
    "vocabulary_from_dataset",
    "resolve_vocabulary",
    "check_same_width",
    "vocabulary_specs",
    "build_vocabularies",
]
