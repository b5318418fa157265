"""What ``tools/demo.py`` reads and writes (``tools/export_model.py`` reads its sample image
here too): where each output goes (never an input, never a file the run did not create unless
``--overwrite``), reading an image with an accurate reason when it cannot be read (its size
checked from the header before any pixel is decoded), and writing a picture atomically."""

import contextlib
import errno
import glob
import os
import signal
import stat
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from vild_d2.fileio import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "JSON_NAME",
    "LOG_NAME",
    "InputError",
    "expand_inputs",
    "file_key",
    "interrupts_deferred",
    "output_paths",
    "plan_outputs",
    "read_image",
    "write_picture",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
JSON_NAME, LOG_NAME = "detections.json", "detections.jsonl"


class InputError(Exception):
    """A bad input (unreadable, too large, unwritable picture): reported, the batch goes on."""


def expand_inputs(items):
    """Image paths from files, folders and glob patterns; errors for empty folders/patterns."""
    paths, errors = [], []
    for item in items:
        if os.path.isdir(item):
            try:
                found = sorted(
                    str(p) for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                )
            except OSError as e:  # e.g. no permission: this item fails, the others go on
                errors.append((item, f"cannot list this folder: {e.strerror}"))
                continue
            if not found:
                errors.append((item, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"))
            paths += found
        elif glob.has_magic(item):
            found = sorted(glob.glob(os.path.expanduser(item)))
            if not found:
                errors.append((item, "no file matches this pattern"))
            paths += found
        else:
            paths.append(item)
    return paths, errors


def file_key(path):
    """What identifies a file: (device, inode) if it exists (so a symlink or hard link to it
    is the same file), else its absolute path; links and '..' resolved first ("new/../x.png"
    is x.png once "new/" is made)."""
    path = os.path.realpath(path)
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return path


def _single_file(inputs: Sequence[str], output: str) -> bool:
    """``output`` names one file (one input, a picture/video suffix, not an existing folder)."""
    out = Path(output)
    return (
        len(inputs) == 1 and out.suffix.lower() in IMAGE_EXTENSIONS + (".mp4",) and not out.is_dir()
    )


def output_paths(inputs, output, suffix=None, reserved=()):
    """
    One output file per input, never an input nor another input's output: ``output`` itself
    for one input and an ``output`` with a picture/video suffix (and not an existing folder),
    else ``output/<input name>``. Inputs sharing a name: the first keeps it, the others take
    ``name-1``, ``name-2``, ... the first that is not taken by another output, not in
    ``reserved`` and not an input (a link to one); inputs are taken in order, so the names are
    the same on every run.

    Args:
        suffix: replaces the inputs' suffix (".mp4" for a video).
        reserved: names the outputs may not take in the folder (the JSON files).
    Raises:
        ValueError: an output would replace an input (``output`` is that input, or its folder),
            or ``output`` is a file where a folder is needed.
    """
    inputs_by_key = {}
    for path in inputs:
        inputs_by_key.setdefault(file_key(path), path)

    def refuse(inp):
        raise ValueError(
            f"--output {output} would replace the input {inp} with its picture; choose another "
            f"--output (a folder that holds no input, or another file name)"
        )

    if _single_file(inputs, output):
        single = Path(output).with_suffix(suffix) if suffix else Path(output)
        if file_key(single) in inputs_by_key:
            refuse(inputs[0])
        return [single]
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {output} is a file: give a folder for {len(inputs)} inputs")

    names = [Path(p).stem + suffix if suffix else Path(p).name for p in inputs]
    # Compared case-folded: on a case-insensitive filesystem X.png and x.png are one file.
    taken = {n.casefold() for n in reserved}
    picks = [None] * len(inputs)
    for i, (inp, name) in enumerate(zip(inputs, names)):  # each name's first input keeps it
        key = file_key(folder / name)
        if key == file_key(inp):
            refuse(inp)  # the input is in the output folder: its picture would replace it
        if name.casefold() not in taken and key not in inputs_by_key:
            taken.add(name.casefold())
            picks[i] = folder / name
    for i, name in enumerate(names):  # the others: the first free name-k
        k, stem, ext = 1, Path(name).stem, Path(name).suffix
        while picks[i] is None:
            candidate = f"{stem}-{k}{ext}"
            free = candidate.casefold() not in taken
            if free and file_key(folder / candidate) not in inputs_by_key:
                taken.add(candidate.casefold())
                picks[i] = folder / candidate
            k += 1
    return picks


def json_path_for(inputs: Sequence[str], output: str) -> Path:
    """Where --json writes: ``<output>/detections.json`` for a folder (whatever its name, e.g.
    ``out.v2``), ``<output stem>.json`` beside a single output file (``a/pic.png`` ->
    ``a/pic.json``): inside what the user named, or named after it."""
    if _single_file(inputs, output):
        return Path(output).with_suffix(".json")
    return Path(output) / JSON_NAME


def plan_outputs(
    inputs: Sequence[str], output: Optional[str], video: bool, json: bool, overwrite: bool
) -> Tuple[List[Optional[Path]], Optional[Path]]:
    """
    (picture path per input, JSON path or None). Every path lies in the folder the user named
    (or is the file named). Nothing the run did not create is replaced: a path that exists
    already is refused (a ``ValueError`` naming them) unless ``overwrite``; an input is never
    replaced, ``overwrite`` or not; an existing folder is never replaced.
    """
    if not output:
        return [None] * len(inputs), None
    outs = output_paths(inputs, output, ".mp4" if video else None, reserved=(JSON_NAME, LOG_NAME))
    json_path = json_path_for(inputs, output) if json else None
    extra = [json_path, json_path.with_suffix(".jsonl")] if json else []
    inputs_by_key = {file_key(p): p for p in inputs}
    for path in extra:
        if file_key(path) in inputs_by_key:
            raise ValueError(
                f"--json would replace the input {inputs_by_key[file_key(path)]} with {path}; "
                "choose another --output"
            )
    planned = [*outs, *extra]
    folders = [str(p) for p in planned if p.is_dir()]
    if folders:
        raise ValueError(f"{folders[0]} is a folder, where this run would write a file")
    existing = [str(p) for p in planned if os.path.lexists(p)]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if existing[5:] else "")
        raise ValueError(
            f"--output {output}: {len(existing)} file(s) this run would write exist already "
            f"({shown}); they were not made by this run and are left as they are: choose "
            "another --output, or pass --overwrite to replace them"
        )
    return outs, json_path


def _stat_reason(path: str) -> Optional[str]:
    """Why ``path`` is not a readable image file, from the filesystem alone (None: it may be)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (too many levels of symbolic links)"
        if e.errno == errno.ENOENT:
            if os.path.islink(path):
                return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
            return "file not found"
        if e.errno == errno.EACCES:
            return "permission denied"
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, pipe or socket)"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the file's header, no pixel decoded; InputError if not an image."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our limit, not PIL's "bomb"
    try:
        with Image.open(path) as image:
            return image.size
    except UnidentifiedImageError:
        raise InputError(
            "cannot read image: not a picture file (PNG, JPEG, BMP, TIFF, WebP), or its header "
            "is corrupt"
        ) from None
    except OSError as e:
        raise InputError(f"cannot read image: {e.strerror or e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_image(path: str, max_megapixels: float) -> np.ndarray:
    """
    The image as BGR uint8 (what ``cv2.imread`` gives; a 16-bit one as value // 257, the
    deployment contract's rule), or an :class:`InputError` with the
    reason: missing, a folder, empty, a link loop, no image, corrupt, or more pixels than
    ``max_megapixels`` (read from the header: a 20000 x 20000 PNG of 389 KB is refused
    before its 1.2 GB are decoded).
    """
    why = _stat_reason(path)
    if why is not None:
        raise InputError(why)
    w, h = image_size(path)
    if w * h > max_megapixels * 1e6:
        raise InputError(
            f"{w}x{h} px ({w * h / 1e6:.1f} megapixels), above --max-megapixels "
            f"{max_megapixels:g}: downscale it (the model sees it at about 1 megapixel anyway), "
            "or raise --max-megapixels if the memory allows (about 20 bytes a pixel)"
        )
    try:
        # ANYDEPTH keeps 16 bits, so that the conversion below is the contract's, not OpenCV's
        # (which rounds v / 256: one grey level off v // 257 on some values).
        image = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
        if image is not None and image.dtype not in (np.uint8, np.uint16):  # float EXR / HDR
            image = cv2.imread(path, cv2.IMREAD_COLOR)
    except cv2.error as e:  # OpenCV's own checks: its text is a C++ assertion, say it in words
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
            why = f"{w}x{h} px is over OpenCV's own limit of 2^30 pixels per image"
        else:
            why = f"OpenCV's reader failed in {_cv2_where(str(e))}"
        raise InputError(f"cannot decode the image: {why}") from None
    if image is None:
        raise InputError(
            f"cannot decode the image ({w}x{h} px in its header): corrupt or truncated?"
        )
    if image.dtype == np.uint16:  # the rule of runtime/vild_d2_runtime/contract.py, check_image
        image = (image // 257).astype(np.uint8)
    return image


@contextlib.contextmanager
def interrupts_deferred():
    """
    Ctrl-C (SIGINT) inside the block waits until the block is done, then raises
    ``KeyboardInterrupt``: an input's picture and its record are written both or neither. (The
    detection itself stays interruptible at once; only these few milliseconds of writing are
    deferred.) Outside the main thread, where Python delivers no signal, it does nothing.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # e.g. started with nohup or `&`
    ):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if received:
            raise KeyboardInterrupt


def write_picture(path: Path, bgr: np.ndarray, overwrite: bool) -> None:
    """Encode and write a picture atomically (a reader, a full disk or a kill never leaves half
    a file; a hard link to the replaced file keeps its old content). ``overwrite`` False: a
    file that appeared there since the run started is left alone (InputError)."""
    ok, data = cv2.imencode(path.suffix or ".png", bgr)
    if not ok:
        raise InputError(f"cannot encode a picture for {path}")
    try:
        written = atomic_write(path, [data.tobytes()], exclusive=not overwrite)
    except OSError as e:
        raise InputError(str(e)) from None
    if not written:
        raise InputError(f"{path} appeared during the run: left as it is (--overwrite replaces)")


def _cv2_where(message: str) -> str:
    """The function an OpenCV error names ("... in function 'x'"), else its source file."""
    if "in function '" in message:
        return message.split("in function '")[1].split("'")[0]
    return message.split(": error:")[0].rsplit("/", 1)[-1] or "its decoder"
