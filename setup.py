"""vild_d2: ViLD open-vocabulary detection as a Detectron2 extension.

detectron2 is deliberately not in install_requires: there is no official detectron2 package on
PyPI. Install it first (a source build, or `python tools/install_detectron2.py`); see README.
"""
from setuptools import find_packages, setup

setup(
    name="vild_d2",
    version="0.1.0",
    description="ViLD (open-vocabulary detection via vision and language distillation) for Detectron2",
    packages=find_packages(include=["vild_d2", "vild_d2.*"]),
    package_data={"vild_d2": ["assets/*", "official/assets/*"]},
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.10",
        "torchvision",
        "clip-anytorch>=2.5",
        "lvis>=0.5.3",
        "fvcore>=0.1.5,<0.1.6",
        "opencv-python-headless",
        "pycocotools>=2.0.2",
    ],
)
