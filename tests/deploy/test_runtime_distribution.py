"""The runtime as its own distribution (runtime/pyproject.toml, ``vild-d2-runtime``): pip builds
its wheel offline from the checkout's runtime/ folder, writing nothing there; the wheel requires
none of torch, torchvision, detectron2 or clip, and holds only the package's modules and its
metadata (no tests). vild_d2's wheel (setup.py) requires it instead of shipping it, and its
build writes nothing into the source folder either."""

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import List, Set, Tuple


ROOT = Path(__file__).resolve().parents[2]
RUNTIME_DIST = ROOT / "runtime"
# Not one of these may be required: the runtime runs an exported model without PyTorch.
FORBIDDEN = {"torch", "torchvision", "detectron2", "clip", "clip-anytorch", "vild-d2"}


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503): "opencv_python>=4" -> ...."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*[A-Za-z0-9._-]+", requirement).group().strip())


def source_files(folder: Path) -> Set[str]:
    """Every file and folder under ``folder``, relative; __pycache__ left out (a test process
    importing the package at the same time may write it)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames + filenames:
            out.add(str((Path(dirpath) / name).relative_to(folder)))
    return out


def build_wheel(source: Path, out: Path) -> Tuple[Path, List[str]]:
    """(the wheel ``pip wheel`` builds from ``source`` into ``out``, the paths the build added
    to ``source``). Offline: no index, no build isolation (the backend comes from this
    environment, requirements.lock), no cache; pip's temporary files under ``out``."""
    before = source_files(source)
    tmp = out / "tmp"
    tmp.mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(tmp), PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--no-cache-dir", "-q", "-w", str(out / "wheels"), str(source)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"pip wheel {source} failed:\n{run.stdout}\n{run.stderr}"
    wheels = sorted((out / "wheels").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], sorted(source_files(source) - before)


def test_the_runtime_wheel_is_torch_free_and_leaves_the_checkout_alone(tmp_path):
    project = tomllib.loads((RUNTIME_DIST / "pyproject.toml").read_text())["project"]
    wheel, added = build_wheel(RUNTIME_DIST, tmp_path)
    assert not added, f"building the wheel wrote into runtime/: {added}"

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"vild_d2_runtime-{project['version']}.dist-info"
        metadata = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()

    assert metadata["Name"] == "vild-d2-runtime" == project["name"]
    assert metadata["Version"] == project["version"]
    requires = {_name(r) for r in metadata.get_all("Requires-Dist") or []}
    assert not requires & FORBIDDEN, f"the runtime wheel requires {sorted(requires & FORBIDDEN)}"
    # What pyproject.toml declares (tests/test_package_layout.py: what the package imports).
    assert requires == {_name(r) for r in project["dependencies"]}, requires

    # The package's modules, every one of them, and the metadata: no tests, no other files.
    modules = {f"vild_d2_runtime/{p.name}" for p in (RUNTIME_DIST / "vild_d2_runtime").glob("*.py")}
    assert {n for n in names if not n.startswith(f"{info}/")} == modules
    assert not [n for n in names if "test" in n.lower()], names

    # The console script points at the command line's main().
    assert re.search(r"^vild-d2-runtime\s*=\s*vild_d2_runtime\.__main__:main$", entry_points, re.M)
    from vild_d2_runtime.__main__ import main

    assert callable(main)


def test_vild_d2s_wheel_requires_the_runtime_and_leaves_its_source_alone(tmp_path):
    """setup.py's build goes to a temporary folder (setuptools' default is build/ and
    vild_d2.egg-info/ in the checkout). Built from a copy of the sources, so that an old
    build/ in the checkout or a concurrent edit cannot hide or fake a write."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT / "vild_d2", source / "vild_d2", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, source / name)
    wheel, added = build_wheel(source, tmp_path / "out")
    assert not added, f"building vild_d2's wheel wrote into its source folder: {added}"

    runtime = tomllib.loads((RUNTIME_DIST / "pyproject.toml").read_text())["project"]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(zf.read(info).decode())
    requires = metadata.get_all("Requires-Dist") or []
    assert f"{runtime['name']}=={runtime['version']}" in requires, requires
    assert not [n for n in names if n.startswith("vild_d2_runtime/")], "vild_d2 ships the runtime"
    assert "vild_d2/__init__.py" in names
