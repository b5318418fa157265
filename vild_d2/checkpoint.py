"""A DetectionCheckpointer that also saves the model's test vocabulary."""

from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.parallel import DistributedDataParallel

from .text import Vocabulary

__all__ = ["ViLDCheckpointer"]

# Parameters renamed since checkpoints were first written: the text classifier's projection and
# background embedding moved from the box predictor into its own module (its ``cls_score``).
_RENAMED = {
    "box_predictor.projection.": "box_predictor.cls_score.projection.",
    "box_predictor.background": "box_predictor.cls_score.background",
}


class _VocabularyState:
    """Checkpointable view of a ViLD model's test vocabulary (names, embeddings, novel mask)."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return self.model.vocabulary.state_dict()

    def load_state_dict(self, state):
        self.model.set_vocabulary(Vocabulary.from_state_dict(state, where="checkpoint"))


class ViLDCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` whose checkpoints carry the test vocabulary under the key
    ``"vocabulary"``, like the optimizer's state: ``load(path)`` restores it (the model then
    detects what it detected when saved), while ``resume_or_load(path, resume=False)`` loads
    the weights only, so a config's ``MODEL.VILD.TEST_VOCABULARY`` stays in force (transfer).
    """

    def __init__(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
        module = model.module if isinstance(model, DistributedDataParallel) else model
        if hasattr(module, "set_vocabulary"):
            checkpointables.setdefault("vocabulary", _VocabularyState(module))
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        for key in list(state):
            for old, new in _RENAMED.items():
                if old in key:
                    state[key.replace(old, new)] = state.pop(key)
        return super()._load_model(checkpoint)
