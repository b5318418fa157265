"""A converted official checkpoint's own vocabulary, used without CLIP.

``tools/convert_official_checkpoint.py`` stores the official frozen classifier in the checkpoint
(``{"model", "vocabulary", "official"}``). The official configs name LVIS v1 datasets as their
vocabularies, which :class:`vild_d2.text.TextEncoder` would encode with CLIP ViT-B/32 (a
download) before the weights are even read. :class:`StoredEmbeddingsEncoder` answers every name
the checkpoint holds from its stored rows; only names it does not hold load CLIP.
"""

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ..clip_models import clip_identity
from ..text import TextEncoder, Vocabulary, build_text_encoder

__all__ = ["StoredEmbeddingsEncoder", "checkpoint_vocabulary", "official_text_encoder"]

logger = logging.getLogger(__name__)


def checkpoint_vocabulary(path: str) -> Optional[Vocabulary]:
    """The vocabulary stored in a converted official checkpoint (a ``.pth`` with an
    ``"official"`` entry), or None for anything else: another checkpoint, a missing or
    unreadable file (the checkpointer reports those when it loads the weights)."""
    if not path or not Path(path).expanduser().is_file():
        return None
    try:  # mmap: the 200-260 MB of weights are not read here, only the small vocabulary
        data = torch.load(Path(path).expanduser(), map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a zip-format torch file (.pkl, a TF prefix, garbage): not ours
        return None
    if not isinstance(data, dict) or "official" not in data or "vocabulary" not in data:
        return None
    try:
        vocab = Vocabulary.from_state_dict(data["vocabulary"], where=str(path))
    except ValueError:
        return None
    return Vocabulary(
        vocab.names,
        vocab.embeddings.clone(),
        vocab.novel,
        vocab.clip_model,
        source=f"checkpoint {path}",
    )


class StoredEmbeddingsEncoder(TextEncoder):
    """A :class:`TextEncoder` that takes the embedding of every name ``stored`` holds from it,
    and encodes only the other names with CLIP (loaded for them alone). Used only when
    ``stored`` was made by the encoder's own CLIP (same identity): rows of two CLIPs do not
    mix."""

    def __init__(self, clip_model: str, stored: Vocabulary, **kwargs):
        super().__init__(clip_model, **kwargs)
        self.stored = stored
        self._rows: Dict[str, int] = {n: i for i, n in enumerate(stored.names)}

    def encode(
        self, names: Sequence[str], synonyms: Optional[Sequence[Sequence[str]]] = None
    ) -> torch.Tensor:
        """As :meth:`TextEncoder.encode`. Names with synonyms are always encoded (the stored
        rows were made from the names alone)."""
        names = list(names)
        if synonyms is not None or not names:
            return self._encode_with_clip(names, synonyms)
        missing = [n for n in names if n not in self._rows]
        if not missing:
            logger.info("%d class embeddings taken from %s", len(names), self.stored.source)
            return self.stored.embeddings[[self._rows[n] for n in names]].clone()
        out = torch.zeros(len(names), self.stored.dim)
        encoded = dict(zip(missing, self._encode_with_clip(missing, None)))
        for k, name in enumerate(names):
            out[k] = encoded[name] if name in encoded else self.stored.embeddings[self._rows[name]]
        return out

    def _encode_with_clip(self, names, synonyms) -> torch.Tensor:
        try:
            return super().encode(names, synonyms)
        except RuntimeError as e:  # a named CLIP that cannot be downloaded: say which names
            shown = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
            raise ValueError(
                f"{len(names)} class names are not in {self.stored.source} ({shown}): encoding "
                f"them needs CLIP {self.clip_model}, which could not be loaded: {e}"
            ) from e


def official_text_encoder(cfg) -> TextEncoder:
    """The text encoder of an official config: a :class:`StoredEmbeddingsEncoder` over the
    vocabulary of ``MODEL.WEIGHTS`` when it is a converted official checkpoint made with
    ``MODEL.VILD.CLIP_MODEL``'s CLIP, else the config's plain CLIP encoder."""
    encoder = build_text_encoder(cfg)
    stored = checkpoint_vocabulary(cfg.MODEL.WEIGHTS)
    if stored is None:
        return encoder
    try:
        same_clip = stored.clip_model == clip_identity(cfg.MODEL.VILD.CLIP_MODEL)
    except FileNotFoundError:  # a CLIP path that does not exist: the plain encoder says so
        same_clip = False
    if not same_clip:
        logger.info(
            "Not using the vocabulary of %s: made by CLIP %s, the config's CLIP is %s",
            cfg.MODEL.WEIGHTS,
            stored.clip_model,
            cfg.MODEL.VILD.CLIP_MODEL,
        )
        return encoder
    return StoredEmbeddingsEncoder(
        encoder.clip_model,
        stored,
        templates=encoder.templates,
        cache_dir=encoder.cache_dir,
        device=encoder.device,
        batch_size=encoder.batch_size,
    )
