from .launch import launch
from .predictor import ViLDPredictor
from .trainer import Trainer, setup
from .training_data import get_training_dicts

__all__ = ["Trainer", "ViLDPredictor", "get_training_dicts", "launch", "setup"]
