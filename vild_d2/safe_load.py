"""Reading files a user hands over (weights, proposals) without running code from them.

A pickle names the functions that rebuild its objects, and unpickling calls them: a ``.pkl``
(or a ``.pth`` read with ``torch.load(weights_only=False)``) can run anything. Here a pickle may
only rebuild data: numpy arrays and scalars, numbers, strings, bytes, lists, tuples, dicts (and
``OrderedDict``, which detectron2's own files use). Anything else is an
:class:`UnsafeFileError` naming the file and the object, before that object is made.
"""

import codecs
import collections
import pickle
import re
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

__all__ = ["UnsafeFileError", "load_pickle", "torch_load", "torch_refusal"]


class UnsafeFileError(ValueError):
    """A file that would run code (or build non-data objects) when loaded; never loaded."""


def _latin1_encode(text, encoding="latin1"):
    # Pickles of bytes at protocol <= 2 rebuild them as _codecs.encode(str, "latin1"); any
    # other codec is not what a pickler writes, so it is refused like any other object.
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeFileError(f"_codecs.encode with the codec {encoding!r}")
    return codecs.encode(text, encoding)


def _data_globals() -> Dict[Tuple[str, str], Any]:
    """(module, name) -> the object, for everything a pickle of plain data may name. numpy 2
    writes ``numpy._core``, numpy 1 (and Python 2 pickles) ``numpy.core``: both are admitted."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric

    admitted = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        admitted[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        admitted[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        admitted[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return admitted


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file, admitted: Dict[Tuple[str, str], Any]):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays
        self._admitted = admitted

    def find_class(self, module, name):
        try:
            return self._admitted[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise UnsafeFileError(f"a persistent id {str(pid)[:40]!r}")


def _refusal(path, what: str, hint: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path}: refused: this pickle builds {what}, not just data (numpy arrays, numbers, "
        "strings, lists, dicts); loading it could run code, so vild_d2 does not load it"
        + (f"; {hint}" if hint else "")
    )


def load_pickle(path, *, hint: str = "", admit: Iterable[Tuple[str, str, Any]] = ()) -> Any:
    """
    Unpickle ``path``, admitting only plain data (module docstring).

    Args:
        path: the file.
        hint: what the user can do instead, added to a refusal.
        admit: more (module, name, object) a pickle may name, each safe to call with any
            arguments (e.g. detectron2's ``BoxMode``, an ``IntEnum``).

    Raises:
        UnsafeFileError: the pickle names anything else (nothing it names is called).
        Other errors of :mod:`pickle` / numpy on bytes that are not a pickle.
    """
    admitted = _data_globals()
    admitted.update({(m, n): obj for m, n, obj in admit})
    with open(path, "rb") as f:
        try:
            return _DataUnpickler(f, admitted).load()
        except UnsafeFileError as e:
            raise _refusal(path, str(e), hint) from None


# torch's weights-only refusal names the global it refused, after a paragraph advising to
# retry with weights_only=False, which would run the file's code.
_TORCH_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_refusal(path, error: BaseException, hint: str = "") -> Optional[UnsafeFileError]:
    """The :class:`UnsafeFileError` to raise instead of ``error`` when ``error`` is
    ``torch.load``'s weights-only refusal of ``path`` (None for any other error): one line,
    naming the file and the object, without torch's advice to retry with
    ``weights_only=False``."""
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "weights only load failed" not in (
        text.lower()
    ):
        return None
    found = _TORCH_GLOBAL.search(text)
    return _refusal(path, found.group(1) if found else "a Python object", hint)


def torch_load(path, *, hint: str = "", **kwargs) -> Any:
    """
    ``torch.load(path, weights_only=True, map_location="cpu")``: tensors, numbers, strings,
    containers, and here numpy arrays too (as in :func:`load_pickle`). ``weights_only`` is
    passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off.

    Raises:
        UnsafeFileError: the file holds other Python objects (:func:`torch_refusal`).
        Other errors of ``torch.load`` on bytes that are not a torch file.
    """
    import torch

    kwargs.setdefault("map_location", "cpu")
    numpy_data = [obj for (m, _), obj in _data_globals().items() if m.startswith("numpy")]
    try:
        with torch.serialization.safe_globals(numpy_data):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        refused = torch_refusal(path, e, hint)
        if refused is None:
            raise
        raise refused from None
