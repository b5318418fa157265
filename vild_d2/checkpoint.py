"""A DetectionCheckpointer that also saves the model's test vocabulary, and refuses to leave a
trained ViLD model's parameters silently unloaded."""

import logging
import os
from typing import List

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.parallel import DistributedDataParallel

from .fileio import atomic_torch_save, atomic_write
from .safe_load import UnsafeFileError, load_pickle, torch_load
from .text import Vocabulary

__all__ = ["ViLDCheckpointer", "IncompatibleCheckpointError", "rename_old_keys"]

logger = logging.getLogger(__name__)

# What to do about a weights file that is refused because it would run code.
_UNSAFE_HINT = (
    "use a checkpoint of tensors only (what training writes; a .pkl of numpy arrays in dicts "
    "as detectron2's model zoo has); re-save weights you trust as torch.save(state_dict)"
)
# Parameters renamed since checkpoints were first written: the text classifier's projection and
# background embedding moved from the box predictor into its own module (its ``cls_score``).
_RENAMED = {
    "box_predictor.projection.": "box_predictor.cls_score.projection.",
    "box_predictor.background": "box_predictor.cls_score.background",
}


def rename_old_keys(state: dict) -> dict:
    """``state`` (a state dict) with older checkpoints' parameter names (:data:`_RENAMED`)
    made current, in place; returns it."""
    for key in list(state):
        current = key
        for old, new in _RENAMED.items():
            current = current.replace(old, new)
        if current != key:
            state[current] = state.pop(key)
    return state


# A checkpoint that has these was trained with ViLD's text classifier: every parameter of a
# ViLD model must then come from it.
_VILD_KEYS = (
    "roi_heads.box_predictor.cls_score.projection.",
    "roi_heads.box_predictor.cls_score.background",
)
# Heads whose shape follows the number of classes: new when fine-tuning a detectron2 model on
# another dataset (e.g. COCO -> LVIS), the one shape change detectron2 users expect to skip.
_CLASS_HEADS = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_head.predictor.",
)


class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint that would leave parameters of the model untrained where that is a mistake."""


class _VocabularyState:
    """Checkpointable view of a ViLD model's test vocabulary (names, embeddings, novel mask)."""

    def __init__(self, model, checkpointer=None):
        self.model = model
        self.checkpointer = checkpointer  # names the file in errors

    def state_dict(self):
        return self.model.vocabulary.state_dict()

    def load_state_dict(self, state):
        # Checked as the weights are (NaN embeddings, names CLIP cannot tell apart): refused
        # with the file's name, not loaded to score every box NaN.
        path = getattr(self.checkpointer, "_path", "checkpoint")
        try:
            vocabulary = Vocabulary.from_state_dict(state, where=f"{path}: stored vocabulary")
        except ValueError as e:
            raise IncompatibleCheckpointError(str(e)) from None
        self.model.set_vocabulary(vocabulary)


class ViLDCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` whose checkpoints carry the test vocabulary under the key
    ``"vocabulary"``, like the optimizer's state: ``load(path)`` restores it (the model then
    detects what it detected when saved), while ``resume_or_load(path, resume=False)`` loads
    the weights only, so a config's ``MODEL.VILD.TEST_VOCABULARY`` stays in force (transfer).

    fvcore skips every tensor whose shape differs, every missing one and every unexpected one
    with a log line; here that is an :class:`IncompatibleCheckpointError` naming the file and
    the tensors when:

    * a tensor's shape differs, except, when training, detectron2's class-count heads of a
      checkpoint that is not ViLD's (fine-tuning a COCO model on another dataset: those heads
      are new);
    * the checkpoint is ViLD's (it has the text classifier) and any model parameter is missing,
      or it holds tensors the model does not have (another CLIP width, backbone depth or head);
    * the checkpoint has backbone weights but not all of the model's, or backbone weights the
      model does not have (another depth);
    * ``complete=True`` (evaluation, the predictor) and any model parameter is missing or any
      checkpoint tensor unused: an untrained tensor, or weights of another model, would make
      every number that follows meaningless;
    * always: a tensor of the checkpoint holds NaN or infinite values.

    An ImageNet backbone or a COCO detector as initial weights (``complete=False``, training)
    keeps working: the heads it lacks are new, as detectron2 users expect, and logged.
    ``partial=True`` (``MODEL.VILD.ALLOW_PARTIAL_WEIGHTS``, training only) logs what does not
    fit instead of refusing it, for a deliberate partial fine-tune; non-finite values are still
    an error.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        save_to_disk=None,
        complete=False,
        partial=False,
        **checkpointables,
    ):
        module = model.module if isinstance(model, DistributedDataParallel) else model
        if hasattr(module, "set_vocabulary"):
            checkpointables.setdefault("vocabulary", _VocabularyState(module, self))
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if complete and partial:
            raise ValueError("a checkpoint load is either complete (evaluation) or partial")
        self.complete = complete
        self.partial = partial
        self._path = "<checkpoint>"

    def _load_file(self, filename):
        """detectron2's formats, read without running code from the file: a ``.pkl`` (model
        zoo, Caffe2 / ImageNet initialisation) through :func:`vild_d2.safe_load.load_pickle`
        (numpy arrays in dicts), anything else with ``torch.load(weights_only=True)``."""
        self._path = filename  # for the errors of _load_model
        try:
            if filename.endswith(".pkl"):
                return self._load_pkl(filename)
            loaded = torch_load(filename, hint=_UNSAFE_HINT)
        except UnsafeFileError as e:
            raise IncompatibleCheckpointError(str(e)) from None
        except Exception as e:  # torch.load / pickle on other bytes: open-ended errors
            raise IncompatibleCheckpointError(
                f"{filename} is not a checkpoint (torch.load / pickle could not read it: "
                f"{type(e).__name__}: {e}); MODEL.WEIGHTS must be a .pth written by training or "
                "a detectron2 model-zoo .pkl"
            ) from e
        if not isinstance(loaded, dict):
            raise IncompatibleCheckpointError(
                f"{filename} is not a checkpoint: it holds a {type(loaded).__name__}, not a dict "
                "of tensors"
            )
        if filename.endswith(".pyth"):  # pycls: weights under "model_state"
            if "model_state" not in loaded:
                raise IncompatibleCheckpointError(
                    f"{filename} is not a pycls checkpoint: it has no 'model_state'"
                )
            state = {
                k: v
                for k, v in loaded["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return loaded if "model" in loaded else {"model": loaded}

    def _load_pkl(self, filename):
        """A detectron2 model-zoo ``.pkl`` ({"model": ..., "__author__": ...}) as it is, or a
        Caffe2 / Detectron one (its "blobs", or the dict itself) with detectron2's name
        matching, as detectron2's ``_load_file`` reads them."""
        data = load_pickle(filename, hint=_UNSAFE_HINT)
        if not isinstance(data, dict):
            raise TypeError(f"a pickled {type(data).__name__}, not a dict of arrays")
        if "model" in data and "__author__" in data:
            logger.info("Reading a file from '%s'", data["__author__"])
            return data
        blobs = data.get("blobs", data)  # detection models keep theirs under "blobs"
        blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}

    def save(self, name, **kwargs):
        """As fvcore's ``Checkpointer.save`` (model, checkpointables, ``kwargs``), written
        atomically: through a temporary file in the same folder, renamed once complete, and
        only then named in ``last_checkpoint``. A crash or a full disk mid-write leaves the
        previous file (if any) and ``last_checkpoint`` as they were."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a file name, not a path")
        logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """``last_checkpoint`` (what ``resume`` reads), replaced atomically."""
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, [last_filename_basename.encode("utf-8")])

    def _load_model(self, checkpoint):
        state = rename_old_keys(checkpoint["model"])
        keys = {k[len("module.") :] if k.startswith("module.") else k for k in state}
        self._check_finite(state)
        incompatible = super()._load_model(checkpoint)
        self._check(keys, incompatible)
        return incompatible

    def _check_finite(self, state) -> None:
        """Refuse a checkpoint whose tensors hold NaN or inf (a diverged run saved as is): it
        would load without a word and detect nothing."""
        bad = []
        for name, value in state.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                value = torch.from_numpy(value)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                finite = torch.isfinite(value)
                if not bool(finite.all()):
                    bad.append(f"{name}: {int((~finite).sum())} of {value.numel()} not finite")
        if bad:
            shown = "\n  ".join(bad[:12])
            more = f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else ""
            raise IncompatibleCheckpointError(
                f"{self._path} holds NaN or infinite values (a diverged run?) in {len(bad)} "
                f"tensor(s):\n  {shown}{more}\nUse a checkpoint saved before training diverged."
            )

    def _check(self, keys, incompatible):
        is_vild = any(k.startswith(_VILD_KEYS) for k in keys)
        has_backbone = any(k.startswith("backbone.") for k in keys)
        parameters = {n for n, _ in self.model.named_parameters()}
        parameters = {n[len("module.") :] if n.startswith("module.") else n for n in parameters}
        problems: List[str] = []
        for name, shape_ckpt, shape_model in incompatible.incorrect_shapes:
            if is_vild or self.complete or not name.startswith(_CLASS_HEADS):
                problems.append(
                    f"{name}: {tuple(shape_ckpt)} in the checkpoint, "
                    f"{tuple(shape_model)} in the model"
                )
        missing = [k for k in incompatible.missing_keys if k in parameters]
        shape_skipped = {name for name, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in missing if k not in shape_skipped]
        unexpected = list(incompatible.unexpected_keys)
        if is_vild or self.complete:
            problems += [f"{k}: not in the checkpoint" for k in missing]
            problems += [f"{k}: in the checkpoint, not in the model" for k in unexpected]
        elif has_backbone:
            problems += [
                f"{k}: not in the checkpoint (another backbone?)"
                for k in missing
                if k.startswith("backbone.")
            ]
            problems += [
                f"{k}: in the checkpoint, not in the model (another backbone?)"
                for k in unexpected
                if k.startswith("backbone.")
            ]
        if problems and self.partial:
            logger.warning(
                "%s: partial load (MODEL.VILD.ALLOW_PARTIAL_WEIGHTS): %d tensor(s) do not fit "
                "and are left as initialised:\n  %s",
                self._path,
                len(problems),
                "\n  ".join(problems[:50]),
            )
            return
        if problems:
            shown = "\n  ".join(problems[:12])
            more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
            why = (
                "it was trained with ViLD, so every parameter must load"
                if is_vild
                else "evaluation needs every parameter trained"
                if self.complete
                else "its backbone does not match the config's"
            )
            raise IncompatibleCheckpointError(
                f"{self._path} does not fit this model ({why}); {len(problems)} tensor(s):\n  "
                f"{shown}{more}\nUse the config the checkpoint was trained with (CLIP model / "
                "embedding width, MODEL.RESNETS.DEPTH, box head), or another checkpoint; to "
                "fine-tune from part of it on purpose, set MODEL.VILD.ALLOW_PARTIAL_WEIGHTS True."
            )
