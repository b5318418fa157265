"""An official (TensorFlow) ViLD checkpoint -> a vild_d2 checkpoint file, with every check
before anything is written (``tools/convert_official_checkpoint.py`` is a thin call into
:func:`convert_official_checkpoint`).

Outputs, written together or not at all:

* ``output``: ``{"model": state_dict, "vocabulary": ..., "official": {...}}`` for
  ``MODEL.WEIGHTS``; the model takes its vocabulary from it without CLIP
  (:mod:`vild_d2.official.vocabulary`);
* ``<output stem>_vocabulary.pth``: the official frozen classifier as a saved vocabulary (for
  ``--vocabulary FILE`` / ``MODEL.VILD.*_VOCABULARY`` of any model of the same CLIP).
"""

import logging
import re
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from ...fileio import atomic_open
from .convert import convert_official_weights, official_vocabulary
from .tf_checkpoint import read_tf_checkpoint

__all__ = ["convert_official_checkpoint", "read_novel_classes", "TRAINING_ONLY"]

logger = logging.getLogger(__name__)

# Variables of a training checkpoint that are no model weights.
TRAINING_ONLY = re.compile(r"(^global_step$)|(/(Momentum|ExponentialMovingAverage|Adam\w*)$)")


def read_novel_classes(path: str, names: Sequence[str]) -> torch.Tensor:
    """
    The novel (rare) classes of the official classifier from a file: one entry per line (or
    comma-separated), each a class id 1..K (the official class numbers, LVIS category ids) or
    a class name; ``#`` starts a comment. Or a ``.npy`` of the official ``rare_mask_path``
    layout: K + 1 values (background first) or K, 1 = base, 0 = novel.

    Returns:
        (K,) bool, True = novel.
    Raises:
        ValueError: one line naming the file, the line and the value, and what is allowed.
    """
    k = len(names)
    path = str(Path(path).expanduser())
    if path.endswith(".npy"):
        try:
            mask = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the rare mask ({e})") from e
        if mask.ndim != 1 or len(mask) not in (k, k + 1) or not np.isin(mask, (0, 1)).all():
            raise ValueError(
                f"{path}: a rare mask must hold {k + 1} (background first) or {k} values, each "
                f"0 (novel) or 1 (base); got shape {list(mask.shape)}"
            )
        return torch.from_numpy(mask[len(mask) - k :] == 0)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the novel-class file ({e})") from e
    index = {n: i for i, n in enumerate(names)}
    novel = torch.zeros(k, dtype=torch.bool)
    count = 0
    for number, line in enumerate(text.splitlines(), 1):
        for item in (x.strip() for x in line.split("#", 1)[0].split(",")):
            if not item:
                continue
            if re.fullmatch(r"[+-]?\d+", item):
                if not 1 <= int(item) <= k:
                    raise ValueError(
                        f"{path}, line {number}: class id {item} is out of range "
                        f"1..{k} (the official class numbers)"
                    )
                novel[int(item) - 1] = True
            elif item in index:
                novel[index[item]] = True
            else:
                raise ValueError(
                    f"{path}, line {number}: {item!r} is neither a class id 1..{k} "
                    f"nor a class name of the vocabulary (e.g. {names[0]!r})"
                )
            count += 1
    if not count:
        raise ValueError(f"{path}: no class ids or names (one per line, or comma-separated)")
    return novel


def _converted(
    checkpoint: str,
    config_file: str,
    opts: Sequence[str],
    vocabulary: str,
    novel_classes: Optional[str],
    vocab_path: Path,
):
    """(checkpoint dict, vocabulary) of the conversion; raises ValueError / OSError."""
    from detectron2.modeling import build_model  # (here: vild_d2.official loads with the package)

    from ...config import load_config

    cfg = load_config(config_file, opts)
    depth, ensemble = cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.VILD.VARIANT == "ensemble"
    if cfg.MODEL.META_ARCHITECTURE != "OfficialViLDRCNN":
        raise ValueError(
            f"{config_file} is not an official-architecture config (META_ARCHITECTURE "
            "OfficialViLDRCNN): use configs/LVIS-OVD/official/"
        )
    novel = None
    if novel_classes:  # (checked before the checkpoint is read: a typo costs no minute)
        from ...text import builtin_vocabulary

        novel = read_novel_classes(novel_classes, builtin_vocabulary(vocabulary).names)
    tf_vars = read_tf_checkpoint(checkpoint)
    skipped = sorted(n for n in tf_vars if TRAINING_ONLY.search(n.split(":")[0]))
    if skipped:
        logger.info("Skipping %d training-only variables (%s ...)", len(skipped), skipped[:3])
    tf_vars = {n: v for n, v in tf_vars.items() if n not in set(skipped)}
    state, info = convert_official_weights(tf_vars, depth, ensemble)
    vocab = official_vocabulary(info["classifier"], vocabulary)
    if novel is not None:
        vocab.novel = novel
        vocab.source += f", novel classes from {novel_classes}"
    # Check that the config's model takes every tensor (built with this vocabulary: no CLIP).
    with tempfile.TemporaryDirectory() as tmp:
        vocab.save(f"{tmp}/vocabulary.pth")
        check_cfg = load_config(
            config_file,
            [
                *opts,
                "MODEL.WEIGHTS",
                "",
                "MODEL.VILD.TRAIN_VOCABULARY",
                f"{tmp}/vocabulary.pth",
                "MODEL.VILD.TEST_VOCABULARY",
                f"{tmp}/vocabulary.pth",
                "MODEL.DEVICE",
                "cpu",
            ],
        )
        model = build_model(check_cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ (e.g. --opts changed a width): one line
        sizes = [x.strip() for x in str(e).splitlines() if "size mismatch" in x]
        raise ValueError(
            f"the converted weights do not fit {config_file} (--opts {list(opts)}): "
            f"{len(sizes)} tensors of another shape, e.g. {'; '.join(sizes[:2])}"
        ) from e
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"the converted weights do not fit {config_file}: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}"
        )
    num_novel = int(vocab.novel.sum()) if vocab.novel is not None else 0
    data = {
        "model": state,
        "vocabulary": vocab.state_dict(),
        "official": {
            "checkpoint": str(checkpoint),
            "depth": depth,
            "ensemble": ensemble,
            "vocabulary_file": vocab_path.name,
            "novel": num_novel,
        },
    }
    logger.info(
        "Converted %d tensors (R%d%s), %d classes (%d novel)",
        len(state),
        depth,
        " ensemble" if ensemble else "",
        len(vocab),
        num_novel,
    )
    return data, vocab


def convert_official_checkpoint(
    checkpoint: str,
    config_file: str,
    output: str,
    opts: Sequence[str] = (),
    vocabulary: str = "lvis",
    novel_classes: Optional[str] = None,
) -> List[Path]:
    """
    Convert the TF checkpoint ``checkpoint`` (a prefix: ``<PREFIX>.index`` +
    ``<PREFIX>.data-*``) for the official config ``config_file`` (+ ``opts``) and write
    ``output`` and ``<output stem>_vocabulary.pth``: both, or neither.

    Args:
        vocabulary: the built-in names of the classifier's columns ("lvis": LVIS v1 in id
            order, rare = novel, as the official rare mask).
        novel_classes: a file of the novel classes instead (:func:`read_novel_classes`): what
            ViLD-ensemble weighs as novel.
    Returns:
        the two paths written.
    Raises:
        ValueError: bad input (config, checkpoint variables, vocabulary, novel classes), one
            line, nothing written. OSError: a file that cannot be read or written.
    """
    output = Path(output).expanduser()
    vocab_path = output.with_name(output.stem + "_vocabulary.pth")
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder: give the .pth file to write")
    data, vocab = _converted(
        checkpoint, config_file, list(opts), vocabulary, novel_classes, vocab_path
    )
    # Both files through temporary files; the vocabulary is renamed only once the model file
    # is complete, and removed again if the model's rename fails: never one without the other.
    vocab_written = False
    try:
        with atomic_open(output) as model_file:
            torch.save(data, model_file)
            with atomic_open(vocab_path) as vocab_file:
                torch.save(vocab.state_dict(), vocab_file)
            vocab_written = True
    except BaseException:
        if vocab_written:
            vocab_path.unlink(missing_ok=True)
        raise
    return [output, vocab_path]
