"""Usage lines and docs name only config files that exist: every ``configs/...yaml`` path in
the README, docs, tools, demo, benchmarks, Makefile, setup.py and both packages is checked
(in code too; tests/test_package_layout.py checks every other repository path that comments
and docstrings name)."""

import re
from pathlib import Path
from typing import Iterable, List

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PATH = re.compile(r"(?<![\w./-])configs/[\w./-]+?\.yaml\b")
SCANNED = (
    "README.md",
    "Makefile",
    "setup.py",
    "docs/**/*.md",
    "tools/**/*.py",
    "demo/*.py",
    "benchmarks/*.py",
    "vild_d2/**/*.py",
    "runtime/**/*.py",
)


def config_paths(text: str) -> List[str]:
    """The ``configs/...yaml`` paths a text names (placeholders such as ``<name>`` or ``*``
    are not paths and do not match)."""
    return CONFIG_PATH.findall(text)


def missing_config_paths(root: Path, patterns: Iterable[str]) -> List[str]:
    """ "file:line: path" for each named config path that does not exist under ``root``."""
    missing = []
    for pattern in patterns:
        for file in sorted(root.glob(pattern)):
            for number, line in enumerate(file.read_text().splitlines(), 1):
                for path in config_paths(line):
                    if not (root / path).is_file():
                        missing.append(f"{file.relative_to(root)}:{number}: {path}")
    return missing


def test_named_config_files_exist():
    missing = missing_config_paths(ROOT, SCANNED)
    assert not missing, "config files named but absent:\n" + "\n".join(missing)


def test_the_check_finds_a_missing_path(tmp_path):
    """The check can fail: a usage line naming a config that is gone is reported."""
    (tmp_path / "configs/Shapes").mkdir(parents=True)
    (tmp_path / "configs/Shapes/vild.yaml").write_text("")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools/demo.py").write_text(
        '"""\n    python tools/demo.py --config-file configs/Toy/vild.yaml\n'
        "    python tools/demo.py --config-file configs/Shapes/vild.yaml\n"
        '    (any of configs/<dataset>/*.yaml)\n"""\n'
    )
    assert missing_config_paths(tmp_path, ["tools/*.py"]) == [
        "tools/demo.py:2: configs/Toy/vild.yaml"
    ]
