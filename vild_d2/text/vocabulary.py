"""A named set of class embeddings (the frozen ViLD-text classifier) and where to get one."""

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from vild_d2_runtime.names import name_key
from vild_d2_runtime.contract import parse_names

from ..fileio import atomic_torch_save
from ..safe_load import UnsafeFileError, torch_load
from .categories import BUILTIN_VOCABULARIES, builtin_vocabulary
from .encoder import TextEncoder

__all__ = [
    "FORMAT",
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

logger = logging.getLogger(__name__)

# Format tag stored in saved vocabulary files.
FORMAT = "vild_d2.vocabulary/1"


@dataclasses.dataclass
class Vocabulary:
    """K class names with their text embeddings.

    Attributes:
        names: K class names (unique).
        embeddings: (K, D) float32 class embeddings.
        novel: (K,) bool, True = novel class; None = unknown.
        clip_model: identity of the CLIP that made the embeddings ("" = unknown).
        source: where it came from, for messages (a file, a dataset, "names"); not saved.
    """

    names: List[str]
    embeddings: torch.Tensor
    novel: Optional[torch.Tensor] = None
    clip_model: str = ""
    source: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        self.names = list(self.names)
        if not self.names:
            raise ValueError("empty vocabulary: it needs at least one class name")
        dups = [n for n, c in collections.Counter(self.names).items() if c > 1]
        if dups:
            raise ValueError(f"duplicate class names in vocabulary: {dups}")
        k = len(self.names)
        self.embeddings = torch.as_tensor(self.embeddings)
        if self.embeddings.dim() != 2 or len(self.embeddings) != k:
            raise ValueError(
                f"embeddings must be (K, D) with K = {k} names, got shape "
                f"{tuple(self.embeddings.shape)}"
            )
        self.embeddings = self.embeddings.detach().float().cpu()
        bad = ~torch.isfinite(self.embeddings).all(dim=1)
        if bad.any():  # every score of the class would be NaN
            rows = bad.nonzero()[:, 0]
            shown = [self.names[i] for i in rows[:5].tolist()]
            raise ValueError(
                f"embeddings hold NaN or infinite values in {len(rows)} of {k} rows "
                f"(classes {shown}{' ...' if len(rows) > 5 else ''})"
            )
        self._check_same_to_clip()
        if self.novel is not None:
            self.novel = torch.as_tensor(self.novel, dtype=torch.bool).cpu()
            if self.novel.shape != (k,):
                raise ValueError(
                    f"novel mask must have shape ({k},) for {k} names, "
                    f"got {tuple(self.novel.shape)}"
                )

    def _check_same_to_clip(self) -> None:
        """Refuse control characters, and two names CLIP reads alike ('red  star' and 'red
        star') with the same embedding: they would split every score between them. (The same
        name with other synonyms has another embedding, and stays.)"""
        first: Dict[str, int] = {}
        for k, name in enumerate(self.names):
            key = name_key(name)  # ValueError for a control character
            j = first.setdefault(key, k)
            if j != k and torch.allclose(self.embeddings[j], self.embeddings[k], atol=1e-6):
                raise ValueError(
                    f"class names {self.names[j]!r:.60} (item {j + 1}) and {name!r:.60} (item "
                    f"{k + 1}) are the same name to CLIP (case, spaces and Unicode forms do not "
                    "count) and have the same embedding: every score would be split between "
                    "them; remove one"
                )

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        """D, the embedding width."""
        return self.embeddings.shape[1]

    def state_dict(self) -> Dict[str, Any]:
        """A plain dict (tensors, lists, strings) that :meth:`from_state_dict` reads back."""
        return {
            "format": FORMAT,
            "names": list(self.names),
            "embeddings": self.embeddings,
            "novel": self.novel,
            "clip_model": self.clip_model,
        }

    @classmethod
    def from_state_dict(cls, d: Any, where: str = "") -> "Vocabulary":
        """Inverse of :meth:`state_dict`; ``where`` (e.g. a file path) prefixes error messages."""
        prefix = f"{where}: " if where else ""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            tag = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{prefix}not a vocabulary ({FORMAT!r} expected, found {tag!r})")
        missing = {"names", "embeddings"} - d.keys()
        if missing:
            raise ValueError(f"{prefix}vocabulary is missing {sorted(missing)}")
        if not isinstance(d["embeddings"], torch.Tensor):
            raise ValueError(f"{prefix}vocabulary 'embeddings' is not a tensor")
        try:
            return cls(d["names"], d["embeddings"], d.get("novel"), d.get("clip_model", ""))
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from e

    def save(self, path: str) -> None:
        """Write to ``path`` (parent dirs created; atomic, so no partial file is ever seen)."""
        atomic_torch_save(self.state_dict(), Path(path).expanduser())

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        """Read a file written by :meth:`save`."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            d = torch_load(path)
        except UnsafeFileError:  # would run code: one line, no torch advice to retry
            raise
        except Exception as e:  # torch.load's errors on bad bytes are open-ended (IndexError...)
            raise ValueError(
                f"{path}: cannot read vocabulary (corrupt, truncated or not a torch file): {e}"
            ) from e
        return dataclasses.replace(cls.from_state_dict(d, where=str(path)), source=f"file {path}")

    def is_base_for(self, train_names: Sequence[str]) -> torch.Tensor:
        """(K,) bool, True = base class: ``~novel`` if known, else "name is in ``train_names``"
        as CLIP reads names (:func:`vild_d2_runtime.names.name_key`, the duplicate check's rule:
        "RED  Circle" is the base class "red circle", whose embedding it has)."""
        if self.novel is not None:
            return ~self.novel
        train = {name_key(n) for n in train_names}
        return torch.tensor([name_key(n) in train for n in self.names], dtype=torch.bool)


def novel_mask(names: Sequence[str], novel_names: Sequence[str]) -> torch.Tensor:
    """(K,) bool, True where ``names[k]`` is in ``novel_names`` (all of which must be in names)."""
    unknown = sorted(set(novel_names) - set(names))
    if unknown:
        raise ValueError(f"novel classes not among the class names: {unknown}")
    novel = set(novel_names)
    return torch.tensor([n in novel for n in names], dtype=torch.bool)


def vocabulary_from_names(
    names: Sequence[str],
    encoder: TextEncoder,
    novel: Optional[Union[Sequence[str], torch.Tensor]] = None,
    synonyms: Optional[Sequence[Sequence[str]]] = None,
) -> Vocabulary:
    """Encode ``names``; ``novel`` is a (K,) bool mask or a list of the novel names."""
    if novel is not None and not isinstance(novel, torch.Tensor):
        novel = novel_mask(names, novel)
    return Vocabulary(
        list(names),
        encoder.encode(names, synonyms),
        novel,
        encoder.identity,
        source=f"{len(names)} names encoded by CLIP {encoder.clip_model}",
    )


def vocabulary_from_dataset(
    dataset_name: str, encoder: TextEncoder, use_synonyms: bool = False
) -> Vocabulary:
    """Encode a registered dataset's class names: its metadata ``vocabulary_names`` if set (text
    names of the ``thing_classes``, e.g. VOC's readable ones), else its ``thing_classes``; novel
    classes from ``novel_classes`` (thing_classes names) if set, synonyms from ``class_synonyms``
    if ``use_synonyms``."""
    meta = MetadataCatalog.get(dataset_name)
    names = meta.get("thing_classes", None)
    if not names:
        raise ValueError(f"dataset {dataset_name!r} has no thing_classes in its metadata")
    novel_names = meta.get("novel_classes", None)
    text_names = meta.get("vocabulary_names", None)
    if text_names:
        if len(text_names) != len(names):
            raise ValueError(
                f"dataset {dataset_name!r}: {len(text_names)} vocabulary_names for "
                f"{len(names)} thing_classes"
            )
        if novel_names is not None:
            novel_names = novel_mask(names, novel_names)
        names = list(text_names)
    synonyms = None
    if use_synonyms:
        synonyms = meta.get("class_synonyms", None)
        if synonyms is None:
            # Not fatal: e.g. a COCO test vocabulary under an LVIS config with synonyms on.
            logger.warning("Dataset %r has no class_synonyms; using names only", dataset_name)
        elif len(synonyms) != len(names):
            raise ValueError(
                f"dataset {dataset_name!r}: {len(synonyms)} class_synonyms lists for "
                f"{len(names)} thing_classes"
            )
    vocab = vocabulary_from_names(names, encoder, novel=novel_names, synonyms=synonyms)
    return dataclasses.replace(vocab, source=f"dataset {dataset_name}")


def resolve_vocabulary(
    spec: Union[Vocabulary, Sequence[str], str], encoder: TextEncoder, use_synonyms: bool = False
) -> Vocabulary:
    """A vocabulary from a :class:`Vocabulary`, a list of names, a saved file (.pth/.pt), a
    registered dataset name or a built-in vocabulary name ("lvis", "coco", "coco_ov", "voc",
    "objects365")."""
    if isinstance(spec, Vocabulary):
        return spec
    if isinstance(spec, (list, tuple)):
        return vocabulary_from_names(spec, encoder)
    if not isinstance(spec, str):
        raise TypeError(f"cannot make a vocabulary from a {type(spec).__name__}")
    # A .pth/.pt spec is always meant as a file, so a missing one gets a file-not-found error.
    if Path(spec).expanduser().is_file() or spec.endswith((".pth", ".pt")):
        return Vocabulary.load(spec)
    if spec in DatasetCatalog.list():
        return vocabulary_from_dataset(spec, encoder, use_synonyms=use_synonyms)
    if spec in BUILTIN_VOCABULARIES:
        builtin = builtin_vocabulary(spec)
        synonyms = builtin.synonyms if use_synonyms else None
        vocab = vocabulary_from_names(builtin.names, encoder, builtin.novel, synonyms)
        return dataclasses.replace(vocab, source=f"built-in vocabulary {spec}")
    raise ValueError(
        f"vocabulary {spec!r} is neither a file, a registered dataset nor a built-in "
        f"vocabulary ({', '.join(BUILTIN_VOCABULARIES)})"
    )


def check_same_width(vocab: Vocabulary, dim: int, role: str, clip_model: str = "") -> None:
    """Raise if ``vocab`` cannot serve as the classifier of a model with ``dim``-d region
    embeddings. ``role`` says what the vocabulary is for (e.g. "test vocabulary"),
    ``clip_model`` the model's CLIP identity; the message names the vocabulary's source."""
    if vocab.dim != dim:
        source = f" ({vocab.source})" if vocab.source else ""
        raise ValueError(
            f"the {role}{source} has {vocab.dim}-d embeddings (made by CLIP "
            f"{vocab.clip_model or 'unknown'}), but this model's region embeddings are {dim}-d "
            f"(CLIP {clip_model or 'unknown'}): build the vocabulary with the model's CLIP "
            "(tools/build_text_classifier.py --clip <that CLIP>), or use a model trained with "
            "the vocabulary's CLIP"
        )


def vocabulary_specs(cfg) -> Tuple[str, str]:
    """(training, test) vocabulary specs of ``cfg`` with their dataset defaults filled in."""
    vild = cfg.MODEL.VILD
    train = vild.TRAIN_VOCABULARY or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "")
    test = vild.TEST_VOCABULARY or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "") or train
    if not train:
        raise ValueError(
            "MODEL.VILD.TRAIN_VOCABULARY is empty and DATASETS.TRAIN names no dataset: "
            "the model needs a training vocabulary (a saved vocabulary file or a dataset name)."
        )
    return train, test


def build_vocabularies(cfg, encoder: TextEncoder) -> Tuple[Vocabulary, Vocabulary]:
    """The config's (training, test) vocabularies, encoding names with CLIP if needed."""
    use_synonyms = cfg.MODEL.VILD.USE_SYNONYMS
    train_spec, test_spec = vocabulary_specs(cfg)
    train = resolve_vocabulary(train_spec, encoder, use_synonyms=use_synonyms)
    if test_spec == train_spec:
        return train, train
    return train, resolve_vocabulary(test_spec, encoder, use_synonyms=use_synonyms)
