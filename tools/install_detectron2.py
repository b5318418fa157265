#!/usr/bin/env python
"""Make sure the running interpreter has detectron2.

* If detectron2 already imports (for example a source build with its compiled CUDA ops), it is
  kept untouched.
* Otherwise detectron2 0.6 is installed as pure Python from the registry sdist
  ``pb1-detectron2==0.6`` (its ``detectron2/`` sources equal the official v0.6 tag). That sdist
  ships without ``detectron2/layers/csrc``, so its setup.py cannot build the C++ extension: we
  unpack it in a temporary folder, empty its extension list, drop its unrelated ``black`` pin and
  install the result. Nothing installed is edited afterwards; the few runtime gaps of such an
  install are bridged by :mod:`vild_d2.compat`.

Usage: python tools/install_detectron2.py
"""

import hashlib
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# (text in the sdist's setup.py, replacement); each must occur exactly once.
SETUP_EDITS = [
    ("ext_modules=get_extensions(),", "ext_modules=[],"),
    ('"black==21.4b2",', ""),
    ('cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},', ""),
]


def _pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def main():
    if importlib.util.find_spec("detectron2") is not None:
        import detectron2

        compiled = importlib.util.find_spec("detectron2._C") is not None
        print(
            f"detectron2 {detectron2.__version__} already installed at "
            f"{Path(detectron2.__file__).parent} ({'with' if compiled else 'without'} compiled "
            "ops); keeping it."
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # --no-build-isolation: the sdist's setup.py imports torch just to compute metadata.
        _pip(
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            SDIST,
            "-d",
            str(tmp),
        )
        (archive,) = tmp.glob("*.tar.gz")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            sys.exit(f"{archive.name}: sha256 {digest} != expected {SDIST_SHA256}; refusing it.")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (src,) = [p for p in tmp.iterdir() if p.is_dir()]
        setup_py = src / "setup.py"
        text = setup_py.read_text()
        for old, new in SETUP_EDITS:
            if text.count(old) != 1:
                sys.exit(f"{setup_py}: expected exactly one {old!r}; the sdist changed.")
            text = text.replace(old, new)
        setup_py.write_text(text)
        _pip("install", "-q", "--no-deps", "--no-build-isolation", str(src))
    print("installed detectron2 0.6 (pure Python, no compiled ops)")


if __name__ == "__main__":
    main()
