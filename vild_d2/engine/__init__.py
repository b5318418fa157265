from .launch import launch
from .predictor import ViLDPredictor
from .trainer import Trainer, setup

__all__ = ["Trainer", "ViLDPredictor", "launch", "setup"]
