"""Reading a config file: YAML's safe loader for it and its ``_BASE_`` files, and the relative
paths it names found from any folder (:func:`vild_d2.config.load_config` calls both)."""

import functools
import re
from pathlib import Path

import yaml
from detectron2.config import CfgNode as CN

__all__ = ["PATH_KEYS", "find_relative_paths", "merge_config_file"]


def merge_config_file(cfg: CN, config_file: str) -> None:
    """``cfg.merge_from_file(config_file)`` with YAML's safe loader for the file and every
    ``_BASE_`` (detectron2 allows ``yaml.unsafe_load``, where a ``!!python/...`` tag runs code
    while the file is read). Everything else is detectron2's: ``_BASE_`` resolved relative to
    the file, lists of bases, version upgrades.

    Raises:
        ValueError: a tag YAML's safe loader does not know, naming the file, line and tag.
    """
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = mark.name if mark is not None and not mark.name.startswith("<") else config_file
        at = f" line {mark.line + 1}" if mark is not None else ""
        tag = re.search(r"tag '([^']*)'", str(e.problem))
        tag = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else "a tag"
        raise ValueError(
            f"{where}:{at}: refused the YAML tag {tag}: a config holds plain values only (a "
            "python tag would run code while the file is read)"
        ) from None
    except (AttributeError, TypeError) as e:  # fvcore on a file that is not a mapping
        raise ValueError(
            f"{config_file} (or a _BASE_ of it) is not a config: a YAML file of KEY: value "
            f"lines is expected, not a Python file, a list or an empty file ({e})"
        ) from None


# The keys that name files or folders a run reads (or a cache it adds to): a relative path in a
# config file is looked up from the config's folder upward when it is not there from the
# current folder (see find_relative_paths).
PATH_KEYS = (
    "MODEL.WEIGHTS",
    "MODEL.VILD.CLIP_MODEL",
    "MODEL.VILD.EMBEDDING_CACHE_DIR",
    "MODEL.VILD.TRAIN_VOCABULARY",
    "MODEL.VILD.TEST_VOCABULARY",
    "MODEL.VILD.PROMPT_TEMPLATES",
    "MODEL.VILD.DATASET_FILES",
    "MODEL.VILD.DISTILL.STORES",
    "MODEL.VILD.SELF_DISTILL.START_WEIGHTS",
)


def find_relative_paths(cfg: CN, config_file: str) -> None:
    """
    The relative paths of :data:`PATH_KEYS` that a config file holds, as the repository's
    configs write them (``output/shapes/teacher/tiny_clip.pt``: from the repository's root),
    work from any folder: one that does not exist from the current folder but does from the
    config file's folder or one above it becomes that absolute path. Anything else (a path
    found from the current folder or found nowhere, a CLIP name such as ``ViT-B/32``, a
    dataset name, "auto") is left as it is.
    """
    folders = Path(config_file).expanduser().resolve().parents

    def found(value):
        if not isinstance(value, str) or value in ("", "auto") or Path(value).is_absolute():
            return value
        try:
            if Path(value).exists():
                return value
            return next((str(f / value) for f in folders if (f / value).exists()), value)
        except (OSError, ValueError):  # a name no file system takes: the range check says
            return value

    for key in PATH_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = functools.reduce(getattr, parent.split("."), cfg)
        value = node[leaf]
        is_tuple = isinstance(value, tuple)
        node[leaf] = tuple(found(v) for v in value) if is_tuple else found(value)
