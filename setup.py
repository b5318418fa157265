"""vild_d2: ViLD open-vocabulary detection as a Detectron2 extension.

detectron2 is deliberately not in install_requires: there is no official detectron2 package on
PyPI. Install it first (a source build, or `python tools/install_detectron2.py`); see README.

``install_requires`` is what the core (everything but the extras' subpackages) imports; each
extra is what its subpackage adds (tests/test_package_layout.py checks both against the imports):

* ``vild_d2[serve]``: the web page and JSON API (``vild_d2.serve``, ``tools/serve.py``).
* ``vild_d2[export]``: ONNX export and running the exported model (``tools/export_model.py``).
* ``vild_d2[runtime]``: what ``vild_d2_runtime`` (an exported model, no PyTorch) imports; a
  deployment without torch installs ``--no-deps`` and these (docs/DEPLOY.md).
* ``vild_d2[dev]``: the test suite, the linter and the benchmarks.

The exact versions the project is tested with are in requirements.lock.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.0",
    "torchvision>=0.15",
    "clip-anytorch>=2.5",
    "lvis>=0.5.3",
    "fvcore>=0.1.5,<0.1.6",
    "pycocotools>=2.0.2",
    "opencv-python-headless>=4.5",
    "numpy>=1.23",
    "pillow>=9.0",
    "PyYAML>=5.1",
    "tqdm>=4.29",
    "scikit-image>=0.22",  # its sample photos (vild_d2.data.images.sample_photo)
]

EXTRAS_REQUIRE = {
    "serve": [
        "gradio>=6.0,<7",
        "fastapi>=0.110",
        "starlette>=0.40",  # its multipart parser (max_part_size), checked as it arrives
        "uvicorn>=0.27",
        "scikit-image>=0.22",
    ],
    "export": ["onnx>=1.14", "onnxruntime>=1.16"],
    "runtime": ["numpy>=1.23", "onnxruntime>=1.16", "opencv-python-headless>=4.5", "ftfy", "regex"],
    "dev": ["pytest>=8", "ruff==0.8.4", "httpx>=0.27", "selenium>=4.20", "scikit-image>=0.22"],
}

setup(
    name="vild_d2",
    version="0.1.0",
    description="ViLD (open-vocabulary detection by vision and language distillation), Detectron2",
    packages=find_packages(include=["vild_d2", "vild_d2.*", "vild_d2_runtime"]),
    package_data={"vild_d2": ["assets/*", "official/checkpoint/assets/*"]},
    python_requires=">=3.8",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
