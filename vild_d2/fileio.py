"""Atomic file writes, shared by the text-embedding cache, vocabularies, derived dataset files
and the distillation store: a reader (another process, a resumed run) never sees half a file."""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

__all__ = ["atomic_write"]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsync'ed
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, parts: Iterable[bytes], exclusive: bool = False) -> bool:
    """
    Write ``parts`` to ``path`` through a unique hidden temporary file in the same folder
    (``.<name>.*.tmp``), fsync'ed, then renamed over ``path``. A crash or an exception while
    writing leaves no file at ``path`` and removes the temporary one; writers that start
    together (processes or threads) never share a temporary file.

    Args:
        path: the file to write; its folder is created.
        parts: the bytes, in order.
        exclusive: never replace an existing ``path`` (the first writer wins).

    Returns:
        False if ``exclusive`` and ``path`` already existed (nothing written), else True.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # atomic, and fails if path exists
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links
                if path.exists():
                    return False
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return True
