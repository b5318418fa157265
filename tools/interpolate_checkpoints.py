#!/usr/bin/env python
"""Weight-space interpolation of two checkpoints of one model (WiSE-FT): the starting model and
the same model fine-tuned from it.

    python tools/interpolate_checkpoints.py --start start/model_final.pth \\
        --finetuned finetuned/model_final.pth --alpha 0.5 --output wise_0.5.pth

writes ``theta = (1 - alpha) * theta_start + alpha * theta_finetuned`` for every floating-point
tensor of the models (alpha 0: the start, 1: the fine-tuned model), in detectron2's checkpoint
format (``{"model": state dict, ...}``): ``tools/train_net.py ... MODEL.WEIGHTS <output>`` and
the demo, server and exporter read it as any checkpoint. The rest comes from the fine-tuned
checkpoint, unchanged: integer and boolean tensors (counters such as BatchNorm's
``num_batches_tracked``), its ``"iteration"``, and its test vocabulary (``"vocabulary"``: the
classes it was evaluated on, e.g. your dataset's). Its optimizer and trainer state is left out:
it belongs to the fine-tuned weights, not to these. How to choose alpha on your own held-out
data: docs/OWN_DATA.md, "Keeping the open vocabulary".

Refused with one line (exit 2) and nothing written: alpha outside [0, 1]; a file that is
missing or not a checkpoint; checkpoints of different architectures (another set of tensors, or
another shape or kind of one); vocabularies encoded by different CLIP models (another CLIP
identity or width, or the class names both share embedded differently), whose region
embeddings live in different spaces. Different class lists are expected (a fine-tune on new
classes) and are no error.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import vild_d2  # noqa: F401  (first: applies compat bridges)
from vild_d2.checkpoint import rename_old_keys
from vild_d2.fileio import atomic_open
from vild_d2.safe_load import UnsafeFileError, load_pickle, torch_load
from vild_d2.text import Vocabulary

__all__ = ["InterpolationError", "check_alpha", "interpolate", "read_checkpoint", "main"]

_HINT = "give a checkpoint written by tools/train_net.py (model_final.pth)"
_SHOWN = 8  # tensors named in an error, then a count


class InterpolationError(ValueError):
    """Two checkpoints, or an alpha, that cannot be interpolated: one line for the user."""


def read_checkpoint(path, flag: str) -> Dict:
    """``path`` as a detectron2 checkpoint ``{"model": {name: tensor}, ...}``, read without
    running code from it (tensors and plain data only); a bare state dict is wrapped, numpy
    arrays (a model-zoo ``.pkl``) become tensors. ``flag`` names the file in errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise InterpolationError(f"{flag} {path}: {what}")
    try:
        if path.suffix == ".pkl":
            loaded = load_pickle(path, hint=_HINT)
        else:
            loaded = torch_load(path, hint=_HINT)
    except UnsafeFileError as e:
        raise InterpolationError(f"{flag} {e}") from None
    except Exception as e:  # torch.load / pickle on other bytes: open-ended errors
        raise InterpolationError(
            f"{flag} {path} is not a checkpoint (it cannot be read: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); {_HINT}"
        ) from None
    if not isinstance(loaded, dict):
        raise InterpolationError(
            f"{flag} {path} is not a checkpoint: it holds a {type(loaded).__name__}, not a dict"
        )
    checkpoint = dict(loaded) if "model" in loaded else {"model": loaded}
    model = checkpoint["model"]
    if not isinstance(model, dict) or not model:
        raise InterpolationError(f"{flag} {path}: its 'model' is not a dict of tensors; {_HINT}")
    state = {}
    for name, value in model.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise InterpolationError(
                f"{flag} {path}: model entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        state[name[len("module.") :] if name.startswith("module.") else name] = value
    checkpoint["model"] = rename_old_keys(state)  # older checkpoints' names, as when loading
    checkpoint["_path"] = str(path)
    return checkpoint


def _listed(items: List[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


def _check_same_tensors(start: Dict, finetuned: Dict) -> None:
    """The same architecture: the same tensor names, shapes and kinds (float or not)."""
    a, b = start["model"], finetuned["model"]
    problems = [f"{k}: only in --start" for k in sorted(a.keys() - b.keys())]
    problems += [f"{k}: only in --finetuned" for k in sorted(b.keys() - a.keys())]
    for k in sorted(a.keys() & b.keys()):
        if a[k].shape != b[k].shape:
            problems.append(
                f"{k}: {tuple(a[k].shape)} in --start, {tuple(b[k].shape)} in --finetuned"
            )
        elif a[k].is_floating_point() != b[k].is_floating_point():
            problems.append(f"{k}: {a[k].dtype} in --start, {b[k].dtype} in --finetuned")
    if problems:
        raise InterpolationError(
            f"{start['_path']} and {finetuned['_path']} are checkpoints of different "
            f"architectures ({len(problems)} tensor(s) differ: {_listed(problems)}); interpolate "
            "a model with one fine-tuned from it, trained with the same config (variant, CLIP "
            "width, backbone, heads)"
        )
    for ckpt, flag in ((start, "--start"), (finetuned, "--finetuned")):
        bad = [
            k
            for k, v in ckpt["model"].items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            raise InterpolationError(
                f"{flag} {ckpt['_path']} holds NaN or infinite values (a diverged run?) in "
                f"{len(bad)} tensor(s): {_listed(bad)}"
            )


def _vocabulary(ckpt: Dict, flag: str) -> Optional[Vocabulary]:
    stored = ckpt.get("vocabulary")
    if stored is None:  # a model without a text classifier (an RPN, a supervised baseline)
        return None
    try:
        return Vocabulary.from_state_dict(stored, where=f"{flag} {ckpt['_path']}: vocabulary")
    except ValueError as e:
        raise InterpolationError(str(e)) from None


def _check_same_text_space(start: Dict, finetuned: Dict) -> None:
    """The two models were trained against the same CLIP: the vocabularies their checkpoints
    store have one width, and were encoded by the same CLIP (its identity, a name or the
    file's sha256) or, where the identities differ (a name here, a local copy there), embed the
    class names they share alike. Different class lists (the start's dataset, the fine-tune's)
    are expected."""
    a, b = _vocabulary(start, "--start"), _vocabulary(finetuned, "--finetuned")
    if a is None or b is None:
        return
    where = (
        f"{start['_path']} (CLIP {a.clip_model or 'unknown'}) and "
        f"{finetuned['_path']} (CLIP {b.clip_model or 'unknown'})"
    )
    why = "so their region embeddings live in different spaces and cannot be mixed"
    if a.dim != b.dim:
        raise InterpolationError(
            f"different vocabularies: {where} store {a.dim}-d and {b.dim}-d class embeddings "
            f"(another CLIP), {why}"
        )
    if a.clip_model and a.clip_model == b.clip_model:
        return
    index = {n: i for i, n in enumerate(b.names)}
    shared = [(i, index[n], n) for i, n in enumerate(a.names) if n in index]
    if shared:
        ea = a.embeddings[[i for i, _, _ in shared]]
        eb = b.embeddings[[j for _, j, _ in shared]]
        differ = [n for (_, _, n), d in zip(shared, (ea - eb).abs().amax(dim=1)) if d > 1e-3]
        if not differ:
            return  # the same text encoder, shown by its outputs, whatever its name
        raise InterpolationError(
            f"different vocabularies: {where} embed the class names they share differently "
            f"({len(differ)} of {len(shared)}: {_listed(differ)}): they were trained against "
            f"different CLIP models, {why}. Fine-tune from --start with its CLIP "
            "(MODEL.VILD.CLIP_MODEL)"
        )
    if a.clip_model and b.clip_model:
        raise InterpolationError(
            f"different vocabularies: {where}: their class embeddings come from different CLIP "
            f"models, {why}. Fine-tune from --start with its CLIP (MODEL.VILD.CLIP_MODEL)"
        )


def check_alpha(alpha) -> None:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise InterpolationError(
            f"--alpha {alpha}: must be a number in [0, 1] (0 = the --start checkpoint, 1 = the "
            "--finetuned one)"
        )


def interpolate(start: Dict, finetuned: Dict, alpha: float) -> Tuple[Dict, List[str]]:
    """The checkpoint ``(1 - alpha) * start + alpha * finetuned`` (float tensors, computed in
    float64, stored in the fine-tuned tensor's dtype) and the names of the tensors taken from
    ``finetuned`` as they are (integer / boolean ones). ``start`` and ``finetuned`` are
    :func:`read_checkpoint`'s dicts."""
    check_alpha(alpha)
    _check_same_tensors(start, finetuned)
    _check_same_text_space(start, finetuned)
    model, kept = {}, []
    for name, b in finetuned["model"].items():
        if b.is_floating_point():
            a = start["model"][name]
            mixed = (1 - alpha) * a.double() + alpha * b.double()
            model[name] = mixed.to(b.dtype)
        else:  # counters and flags: an average means nothing; the fine-tuned model's
            model[name] = b.clone()
            kept.append(name)
    out = {"model": model}
    for key in ("vocabulary", "iteration"):
        if key in finetuned:
            out[key] = finetuned[key]
    out["interpolation"] = {
        "start": start["_path"],
        "finetuned": finetuned["_path"],
        "alpha": float(alpha),
    }
    return out, kept


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--start", required=True, help="the starting checkpoint (.pth)")
    p.add_argument("--finetuned", required=True, help="the checkpoint fine-tuned from --start")
    p.add_argument(
        "--alpha", required=True, type=float, help="in [0, 1]: 0 = --start, 1 = --finetuned"
    )
    p.add_argument("--output", required=True, help="the interpolated checkpoint (.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output).expanduser()
    try:
        check_alpha(args.alpha)
        if output.is_dir():
            raise InterpolationError(f"--output {output} is a folder; it must be a file (.pth)")
        if output.exists() and not args.overwrite:
            raise InterpolationError(
                f"--output {output} already exists: choose another name, or pass --overwrite"
            )
        start = read_checkpoint(args.start, "--start")
        finetuned = read_checkpoint(args.finetuned, "--finetuned")
        checkpoint, kept = interpolate(start, finetuned, args.alpha)
        with atomic_open(output) as f:  # whole or not at all
            torch.save(checkpoint, f)
    except (InterpolationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(checkpoint["model"])
    print(
        f"alpha={args.alpha:g}: {n - len(kept)} float tensors interpolated, {len(kept)} "
        f"integer/boolean taken from --finetuned -> wrote {output.resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
