"""ViLD-text's classifier: region embeddings scored against frozen CLIP text embeddings.

Shape shorthand: N = RoIs, C = box-head feature channels, D = CLIP embedding width,
K = classes of the active vocabulary (training or test), K+1 = with background (last column).
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..text import Vocabulary, check_same_width

__all__ = ["TextClassifier", "cosine_logits", "NORM_EPS"]

logger = logging.getLogger(__name__)

NORM_EPS = 1e-8


def cosine_logits(embeddings, classifier, temperature):
    """
    Args:
        embeddings: (N, D) region embeddings, already L2-normalised.
        classifier: (K, D) class embeddings, any norm (each row is divided by its norm here).
        temperature: logits = cosine / temperature.
    Returns:
        (N, K) logits.
    """
    classifier = F.normalize(classifier.to(embeddings.dtype), dim=1, eps=NORM_EPS)
    return embeddings @ classifier.t() / temperature


class TextClassifier(nn.Module):
    """
    The ``cls_score`` of :class:`ViLDOutputLayers`: ``Linear(C, D)`` projection + L2 norm gives
    the region embedding, scored by cosine / T against the frozen text embeddings of the active
    vocabulary plus one learned background embedding (last column).

    It keeps two vocabularies: the training one (base classes; its rows are indexed by
    ``gt_classes``) is used in ``train()`` mode, the test one in ``eval()`` mode;
    :meth:`set_vocabulary` swaps the latter. Both are non-persistent buffers: the learned
    weights (projection, background) do not depend on the vocabulary, and
    :class:`vild_d2.ViLDCheckpointer` stores the test vocabulary beside them.
    """

    def __init__(
        self,
        input_size: int,
        train_vocabulary: Vocabulary,
        test_vocabulary: Optional[Vocabulary] = None,
        temperature: float = 0.01,
    ):
        """
        Args:
            input_size: C.
            train_vocabulary: (K_train, D) base classes.
            test_vocabulary: (K_test, D); None = the training vocabulary.
            temperature: T (0.01, i.e. logits = cosine x 100).
        """
        super().__init__()
        dim = train_vocabulary.dim
        self.projection = nn.Linear(input_size, dim)
        # Learned background embedding, N(0, 0.01) as in the official code.
        self.background = nn.Parameter(torch.randn(dim) * 0.01)
        self.temperature = temperature
        self.train_vocabulary = train_vocabulary
        self.register_buffer("train_embeddings", train_vocabulary.embeddings.float(), False)
        self.register_buffer("test_embeddings", torch.empty(0, dim), False)
        self.register_buffer("test_is_base", torch.empty(0, dtype=torch.bool), False)
        self.set_vocabulary(test_vocabulary or train_vocabulary)

    @property
    def embed_dim(self) -> int:
        return self.background.shape[0]

    def set_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Use ``vocabulary`` (K', D) at test time; D must match this model's embedding width."""
        ours = self.train_vocabulary.clip_model
        check_same_width(vocabulary, self.embed_dim, "test vocabulary", ours)
        if vocabulary.clip_model and ours and vocabulary.clip_model != ours:
            logger.warning(
                f"The new vocabulary was encoded by CLIP {vocabulary.clip_model}, this model's "
                f"training vocabulary by {ours}: same width, but possibly another embedding space."
            )
        self.test_vocabulary = vocabulary
        # Assigning to a registered buffer keeps it a buffer (with the new shape); follow the
        # model's device and dtype (e.g. after model.half()).
        bg = self.background
        self.test_embeddings = vocabulary.embeddings.to(device=bg.device, dtype=bg.dtype)
        is_base = vocabulary.is_base_for(self.train_vocabulary.names).bool()
        self.test_is_base = is_base.to(bg.device)

    def class_embeddings(self) -> torch.Tensor:
        """(K+1, D) active class embeddings with the background last (rows not normalised)."""
        embeddings = self.train_embeddings if self.training else self.test_embeddings
        return torch.cat([embeddings.to(self.background.dtype), self.background[None]], dim=0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) box features -> (N, D) L2-normalised region embeddings."""
        return F.normalize(self.projection(x.flatten(1)), dim=1, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) box features -> (N, K+1) logits, background last."""
        return cosine_logits(self.embed(x), self.class_embeddings(), self.temperature)

    def image_probs(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) image-branch embeddings -> (N, K) softmax over the test classes (no bg)."""
        return cosine_logits(image_embeddings, self.test_embeddings, self.temperature).softmax(-1)
