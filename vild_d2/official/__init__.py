"""The official TensorFlow ViLD as a test reference: its checkpoint layout, seeded weights, and a
TensorFlow-free checkpoint reader. See docs/OFFICIAL.md.
"""

from .random_weights import CLASSIFIER_KEY, random_classifier, random_official_weights
from .variables import official_variables, resnet_variables

__all__ = [
    "CLASSIFIER_KEY",
    "official_variables",
    "random_classifier",
    "random_official_weights",
    "resnet_variables",
]
