"""Atomic file writes, shared by the text-embedding cache, vocabularies, derived dataset files
and the distillation store: a reader (another process, a resumed run) never sees half a file."""

import contextlib
import errno
import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable

__all__ = ["atomic_open", "atomic_torch_save", "atomic_write", "cache_root", "file_sha256"]

# A full disk or quota: what to do about it is worth saying.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsync'ed
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_temporary(path: Path):
    """(fd, name) of a new hidden file next to ``path``. Created by os.open with mode 0o666, so
    the umask (and a default ACL) applies as for any new file; tempfile.mkstemp would make it
    0600 and the renamed file unreadable to the rest of a group sharing the folder."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {path}")


def atomic_write(path, parts: Iterable[bytes], exclusive: bool = False, hint: str = "") -> bool:
    """
    Write ``parts`` to ``path`` through a unique hidden temporary file in the same folder
    (``.<name>.*.tmp``), fsync'ed, then renamed over ``path``. A crash or an exception while
    writing leaves no file at ``path`` and removes the temporary one; writers that start
    together (processes or threads) never share a temporary file. The file's mode follows the
    umask, as for ``open(path, "w")``.

    Args:
        path: the file to write; its folder is created.
        parts: the bytes, in order.
        exclusive: never replace an existing ``path`` (the first writer wins).
        hint: what to do when the write fails, added to the error (e.g. "re-run to resume").

    Returns:
        False if ``exclusive`` and ``path`` already existed (nothing written), else True.

    Raises:
        OSError: with the errno of the failure and a message naming ``path`` (a full disk
            otherwise says only "No space left on device").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
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
    except OSError as e:
        raise _naming(e, path, hint) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def _naming(e: OSError, path: Path, hint: str) -> OSError:
    """``e`` (same type and errno) with a message that names ``path`` and what to do."""
    what = e.strerror or str(e)
    if not hint and e.errno in _NO_SPACE:
        hint = "free space on its filesystem (or write elsewhere) and retry"
    message = f"cannot write {path}: {what}" + (f"; {hint}" if hint else "")
    # OSError(errno, ...) makes the subclass of the errno (PermissionError, ...), as raised.
    return OSError(message) if e.errno is None else OSError(e.errno, message)


def cache_root() -> Path:
    """The package's cache folder: ``$VILD_D2_CACHE``, default ``~/.cache/vild_d2``. Text
    embeddings go to ``<it>/text``, derived dataset files to ``<it>/datasets``."""
    return Path(os.path.expanduser(os.getenv("VILD_D2_CACHE") or "~/.cache/vild_d2"))


@contextlib.contextmanager
def atomic_open(path, hint: str = ""):
    """
    A binary file to write ``path`` with, as :func:`atomic_write` writes it: the data goes to a
    hidden temporary file in the same folder, which replaces ``path`` once the ``with`` block
    ends without an exception (fsync'ed first). An exception inside the block, or a failed
    write, leaves ``path`` as it was and removes the temporary file. For writers that stream
    (``torch.save`` into the file) rather than hold every byte in memory first.

    Raises:
        OSError: as :func:`atomic_write`, naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _naming(e, path, hint) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path, hint: str = "") -> None:
    """``torch.save(obj, path)`` through :func:`atomic_open` (readers never see a partial
    file; a failure leaves ``path`` as it was). torch is imported here, not at module level,
    so the file helpers stay light."""
    import torch

    with atomic_open(path, hint=hint) as f:
        torch.save(obj, f)


def file_sha256(path) -> str:
    """The sha256 (hex) of a file's bytes: what identifies its content wherever it lies. Cached
    per process by (path, size, mtime, inode), so a file is read once unless it changes."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=1 << 17)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
