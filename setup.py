"""vild_d2: ViLD open-vocabulary detection as a Detectron2 extension.

detectron2 is deliberately not in install_requires: there is no official detectron2 package on
PyPI. Install it first (a source build, or `python tools/install_detectron2.py`); see README.

The runtime, ``vild_d2_runtime`` (an exported model without PyTorch: docs/DEPLOY.md), is its own
distribution, ``vild-d2-runtime``, in runtime/ (runtime/pyproject.toml); vild_d2 imports its
contract and requires it. It is not on PyPI: install both from the checkout, the runtime first
or in the same command (``pip install ./runtime .``; ``make install`` installs both editable).

``install_requires`` is what the core (everything but the extras' subpackages) imports; each
extra is what its subpackage adds (tests/test_package_layout.py checks both against the imports):

* ``vild_d2[serve]``: the web page and JSON API (``vild_d2.serve``, ``tools/serve.py``).
* ``vild_d2[export]``: ONNX export and running the exported model (``tools/export_model.py``).
* ``vild_d2[dev]``: the test suite, the linter and the benchmarks.

The exact versions the project is tested with are in requirements.lock.
"""

import atexit
import shutil
import tempfile

from setuptools import find_packages, setup

# setuptools writes its build tree and the egg-info into the source folder by default: here a
# temporary folder instead, removed when the build's process ends, so that `pip install .`
# leaves nothing in the checkout (and never packages a stale build/lib copy).
_SCRATCH = tempfile.mkdtemp(prefix="vild_d2-setuptools-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)

INSTALL_REQUIRES = [
    "vild-d2-runtime==0.1.0",  # runtime/: the exporter/runtime contract (vild_d2_runtime.contract)
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
    "dev": ["pytest>=8", "ruff==0.8.4", "httpx>=0.27", "selenium>=4.20", "scikit-image>=0.22"],
}

setup(
    name="vild_d2",
    version="0.1.0",
    description="ViLD (open-vocabulary detection by vision and language distillation), Detectron2",
    packages=find_packages(include=["vild_d2", "vild_d2.*"]),
    package_data={"vild_d2": ["assets/*", "official/checkpoint/assets/*"]},
    python_requires=">=3.8",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    options={"build": {"build_base": f"{_SCRATCH}/build"}, "egg_info": {"egg_base": _SCRATCH}},
)
