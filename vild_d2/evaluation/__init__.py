"""Evaluators for the open-vocabulary benchmarks (the others are detectron2's own)."""

from .coco_ovd_evaluation import COCOOpenVocabularyEvaluator

__all__ = ["COCOOpenVocabularyEvaluator"]
