"""The tools' one way to take settings.

Every tool with a config takes ``--config-file FILE``, config overrides as trailing ``KEY VALUE``
pairs (``--opts KEY VALUE ...`` is the same), and ``--dataset-file FILE`` (repeatable: YAML
dataset files, docs/OWN_DATA.md, added to ``MODEL.VILD.DATASET_FILES``). The tools' own flags
may stand anywhere, also after the overrides::

    python tools/demo.py --config-file c.yaml --input a.png MODEL.WEIGHTS m.pth --json

argparse alone cannot do that: a positional ``REMAINDER`` (detectron2's ``opts``) takes every
flag after the first override for a config key, so ``... SOLVER.MAX_ITER 5 --resume`` silently
lost ``--resume``. :func:`parse_args` splits the command line into flags and overrides first,
knowing how many values each flag takes, and hands argparse the flags alone (a flag it does
not know stays its error, exit 2).
"""

import argparse
import os
import re
import sys
from typing import List, Sequence, Tuple

__all__ = [
    "add_config_arguments",
    "add_dataset_file_argument",
    "looks_like_key",
    "parse_args",
    "split_overrides",
    "with_dataset_files",
]

_ALIAS = "_opts_alias"  # --opts: parsed by split_overrides, never by argparse
_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*")
_TOP_KEYS = None  # the config's top-level keys (MODEL, SOLVER, SEED, ...), read once


def add_dataset_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a YAML dataset file to register first (repeatable; docs/OWN_DATA.md)",
    )


def add_config_arguments(
    parser: argparse.ArgumentParser, config_help: str = "the config (YAML)"
) -> None:
    """``--config-file``, ``--dataset-file``, the trailing ``KEY VALUE`` overrides and their
    ``--opts`` alias; what ``parser`` has already (detectron2's default parser has
    ``--config-file`` and ``opts``) is kept."""
    dests = {action.dest for action in parser._actions}
    if "config_file" not in dests:
        parser.add_argument("--config-file", required=True, metavar="FILE", help=config_help)
    if "dataset_file" not in dests:
        add_dataset_file_argument(parser)
    if "opts" not in dests:
        parser.add_argument(
            "opts",
            nargs=argparse.REMAINDER,
            metavar="KEY VALUE",
            help="config overrides, e.g. MODEL.WEIGHTS model.pth MODEL.DEVICE cpu; the flags "
            "may come before, between or after them",
        )
    parser.add_argument(
        "--opts",
        dest=_ALIAS,
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="the same overrides, after --opts",
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] = None) -> argparse.Namespace:
    """``parser``'s flags wherever they stand; ``args.opts``: the ``KEY VALUE`` overrides in
    the order given (trailing, after ``--opts``, or between flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags, overrides = split_overrides(parser, argv)
    args = parser.parse_args(flags)
    if len(overrides) % 2:
        parser.error(
            f"the config override {overrides[-1]} has no value (overrides are KEY VALUE pairs, "
            "e.g. MODEL.WEIGHTS model.pth)"
        )
    args.opts = overrides
    if hasattr(args, _ALIAS):
        delattr(args, _ALIAS)
    return args


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Tuple[list, list]:
    """(the flags with their values, the ``KEY VALUE`` overrides). A config key never starts
    with "-", so at a key's place a "--" word is a flag; a value is taken as it is ("SEED -1").
    A flag that takes several values (``--input a.png b.png``) ends at a config key
    (:func:`looks_like_key`)."""
    options = {s: a for a in parser._actions for s in a.option_strings}
    flags, overrides, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token in ("--opts", "--"):  # the alias (and argparse's end of the flags): skipped
            i += 1
            continue
        if not token.startswith("-") or token == "-":
            overrides += argv[i : i + 2]  # a key and its value, whatever the value looks like
            i += 2
            continue
        action, explicit = _resolve(token, options, parser.allow_abbrev)
        n = 0 if action is None or explicit else _values(action, argv[i + 1 :])
        flags += argv[i : i + 1 + n]
        i += 1 + n
    return flags, overrides


def looks_like_key(token: str) -> bool:
    """An upper-case dotted name under one of the config's top-level keys (``MODEL.WEIGHTS``,
    ``SEED``) that is no existing file: ``IMG_0001.JPG`` and ``MODEL.png`` are files."""
    global _TOP_KEYS
    if not _KEY.fullmatch(token) or os.path.exists(token):
        return False
    if _TOP_KEYS is None:
        from vild_d2.config import add_vild_config  # detectron2's config, with the ViLD node
        from detectron2.config import get_cfg

        cfg = get_cfg()
        add_vild_config(cfg)
        _TOP_KEYS = frozenset(cfg.keys())
    return token.split(".")[0] in _TOP_KEYS


def with_dataset_files(config_file: str, opts: Sequence[str], dataset_files: Sequence[str]):
    """``opts`` + ``MODEL.VILD.DATASET_FILES``: the config's own (with ``opts``) and then the
    ``--dataset-file`` files, as absolute paths (the saved config names the same files from
    any folder). Without ``dataset_files``, ``opts`` as they are."""
    if not dataset_files:
        return list(opts)
    from vild_d2.config import load_config

    current = list(load_config(config_file, opts).MODEL.VILD.DATASET_FILES)
    for path in dataset_files:
        path = os.path.abspath(os.path.expanduser(path))
        if path not in current:
            current.append(path)
    return [*opts, "MODEL.VILD.DATASET_FILES", repr(tuple(current))]


def _resolve(token: str, options: dict, allow_abbrev: bool):
    """(the flag's action or None if unknown, whether its value is in the token: --x=v)."""
    name, explicit = token, False
    if token.startswith("--") and "=" in token:
        name, explicit = token.split("=", 1)[0], True
    if name in options:
        return options[name], explicit
    if allow_abbrev and name.startswith("--"):
        matches = {options[s] for s in options if s.startswith(name)}
        if len(matches) == 1:  # argparse takes a unique prefix for the flag
            return matches.pop(), explicit
    return None, explicit


def _values(action: argparse.Action, rest: List[str]) -> int:
    """How many of the words after ``action``'s flag are its values."""
    nargs = action.nargs
    if nargs is None:
        return min(1, len(rest))
    if isinstance(nargs, int):
        return min(nargs, len(rest))
    n = 0
    while n < len(rest) and not rest[n].startswith("-") and not looks_like_key(rest[n]):
        n += 1
        if nargs == argparse.OPTIONAL:
            break
    return n
