"""CLIP text encoder for the ViLD-text classifier: prompt ensembles with an on-disk cache."""

import hashlib
import json
import logging
from pathlib import Path
from typing import List, Optional, Sequence

import clip
import torch
import torch.nn.functional as F
from clip.model import CLIP
from tqdm import tqdm

from ..clip_models import Device, clip_identity, load_clip
from ..fileio import atomic_torch_save, cache_root
from .prompts import fill_prompts, load_templates, process_name
from .tokens import check_distinguishable

__all__ = ["TextEncoder", "build_text_encoder"]

logger = logging.getLogger(__name__)


class TextEncoder:
    """Encodes class names into ViLD-text classifier embeddings with CLIP's text tower.

    Each class embedding is the ensemble over prompts (all templates x the name and its
    synonyms): L2-normalise every prompt embedding, average, L2-normalise again. CLIP is loaded
    lazily, only when an :meth:`encode` call misses the cache.
    """

    def __init__(
        self,
        clip_model: str,
        *,
        templates: Optional[Sequence[str]] = None,
        cache_dir: Optional[str] = "auto",
        device: Device = "cpu",
        batch_size: int = 1024,
    ):
        """
        Args:
            clip_model: a ``clip.available_models()`` name or a local CLIP checkpoint path.
            templates: prompt templates ("{}" = name, "{article}" = a/an); None = the 63 ViLD ones.
            cache_dir: embeddings are cached under ``<cache_dir>/text/``; "auto" =
                :func:`vild_d2.fileio.cache_root` ($VILD_D2_CACHE or ~/.cache/vild_d2); None or
                "" = no cache.
            device: where CLIP runs; results are always returned on the CPU.
            batch_size: prompts per CLIP forward.
        """
        self.clip_model = clip_model
        self.templates = list(templates) if templates is not None else load_templates()
        if cache_dir == "auto":
            cache_dir = str(cache_root())
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.device = device
        self.batch_size = batch_size
        self._model: Optional[CLIP] = None
        self._identity: Optional[str] = None
        # Names of the last encode() whose prompts CLIP truncates (reported as a warning).
        self.truncated: List[str] = []

    @property
    def is_loaded(self) -> bool:
        """Whether CLIP has been loaded (cache hits never load it)."""
        return self._model is not None

    @property
    def model(self) -> CLIP:
        """The CLIP model, loaded on first use."""
        if self._model is None:
            logger.info("Loading CLIP %s on %s", self.clip_model, self.device)
            self._model, self._identity = load_clip(self.clip_model, self.device)
        return self._model

    @property
    def identity(self) -> str:
        """Identity of the CLIP weights (see :func:`clip_identity`); loads nothing."""
        if self._identity is None:
            self._identity = clip_identity(self.clip_model)
        return self._identity

    def cache_path(
        self, names: Sequence[str], synonyms: Optional[Sequence[Sequence[str]]] = None
    ) -> Optional[Path]:
        """The cache file for these inputs (None without a cache dir)."""
        if self.cache_dir is None:
            return None
        key = json.dumps(
            [
                self.identity,
                self.templates,
                list(names),
                None if synonyms is None else [list(s) for s in synonyms],
            ]
        )
        return self.cache_dir / "text" / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()}.pt"

    def encode(
        self, names: Sequence[str], synonyms: Optional[Sequence[Sequence[str]]] = None
    ) -> torch.Tensor:
        """
        Args:
            names: K class names.
            synonyms: optional K lists of extra names per class, averaged into its embedding.

        Returns:
            Tensor (K, D) float32 on CPU, unit-norm rows; D = the CLIP text width.
        """
        names = list(names)
        if not names:
            raise ValueError("no class names to encode")
        if synonyms is not None and len(synonyms) != len(names):
            raise ValueError(f"got {len(synonyms)} synonym lists for {len(names)} class names")
        context_length = self._model.context_length if self._model is not None else 77
        self.truncated = check_distinguishable(names, self.templates, synonyms, context_length)

        path = self.cache_path(names, synonyms)
        if path is not None and path.is_file():
            cached = self._read_cache(path, len(names))
            if cached is not None:
                logger.info("Loaded %d text embeddings from cache %s", len(names), path)
                return cached

        embeddings = self._compute(names, synonyms)
        if path is not None:
            atomic_torch_save(embeddings, path)
        return embeddings

    def _compute(
        self, names: List[str], synonyms: Optional[Sequence[Sequence[str]]]
    ) -> torch.Tensor:
        # Prompts are made and encoded a batch at a time and summed per class as they come, so
        # memory is bounded by the batch and the (K, D) sums, not by K x 63 prompts (a 21k-name
        # vocabulary is 1.3M prompts).
        variants = [
            _variants(n, synonyms[k] if synonyms is not None else ()) for k, n in enumerate(names)
        ]
        total = sum(len(v) for v in variants) * len(self.templates)
        logger.info(
            "Encoding %d classes (%d prompts) with CLIP %s", len(names), total, self.identity
        )
        model = self.model
        sums = counts = None
        bar = tqdm(
            total=total,
            desc="text embeddings",
            unit="prompt",
            mininterval=2.0,
            disable=total < 20 * self.batch_size,
        )
        with torch.no_grad(), bar:
            for owner, prompts in _prompt_batches(variants, self.templates, self.batch_size):
                # The model's own context length (77 for OpenAI's CLIPs; small ones may use less).
                tokens = clip.tokenize(prompts, context_length=model.context_length, truncate=True)
                out = F.normalize(model.encode_text(tokens.to(self.device)).float(), dim=-1).cpu()
                if sums is None:
                    sums = out.new_zeros(len(names), out.shape[1])
                    counts = torch.zeros(len(names), 1)
                # Mean over each class's prompts: sum now, divide once at the end.
                sums.index_add_(0, owner, out)
                counts.index_add_(0, owner, torch.ones(len(owner), 1))
                bar.update(len(prompts))
        return F.normalize(sums / counts, dim=-1)

    @staticmethod
    def _read_cache(path: Path, num_classes: int) -> Optional[torch.Tensor]:
        """The cached (K, D) tensor, or None (with a warning) if the file is unusable."""
        try:
            emb = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a bad cache is never fatal; torch.load's errors are open-ended
            logger.warning("Ignoring corrupt text-embedding cache %s (%s); recomputing", path, e)
            return None
        if not (isinstance(emb, torch.Tensor) and emb.dim() == 2 and len(emb) == num_classes):
            logger.warning("Ignoring text-embedding cache %s of unexpected content", path)
            return None
        return emb.float()


def build_text_encoder(cfg) -> TextEncoder:
    """The CLIP text encoder described by ``cfg.MODEL.VILD`` (CLIP itself loads lazily)."""
    vild = cfg.MODEL.VILD
    return TextEncoder(
        vild.CLIP_MODEL,
        templates=load_templates(vild.PROMPT_TEMPLATES or None),
        cache_dir=vild.EMBEDDING_CACHE_DIR or None,
        device=cfg.MODEL.DEVICE,
    )


def _variants(name: str, synonyms: Sequence[str]) -> List[str]:
    """The name and its synonyms, without ones that process to the same text (so no name is
    weighted twice, e.g. LVIS synonym lists usually repeat the name)."""
    seen, out = set(), []
    for n in [name, *synonyms]:
        key = process_name(n)
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


def _prompt_batches(variants: List[List[str]], templates: List[str], batch_size: int):
    """Yield (owner (B,) int64 class indices, B prompts) over every class's names x templates,
    in order, B <= batch_size."""
    owner: List[int] = []
    prompts: List[str] = []
    for k, names in enumerate(variants):
        for name in names:
            for prompt in fill_prompts(name, templates):
                owner.append(k)
                prompts.append(prompt)
                if len(prompts) == batch_size:
                    yield torch.tensor(owner), prompts
                    owner, prompts = [], []
    if prompts:
        yield torch.tensor(owner), prompts
