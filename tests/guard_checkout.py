"""A pytest plugin: the suite writes only under temporary folders. The checkout's output/ and
datasets/ (where a user's runs and data live) must be the same after the run as before; if not,
the run fails, naming what changed. ``$VILD_D2_GUARDED_ROOT`` moves the guarded root (for the
guard's own test)."""

import os
from pathlib import Path

import pytest

GUARDED = ("output", "datasets")


def _root() -> Path:
    return Path(os.environ.get("VILD_D2_GUARDED_ROOT") or Path(__file__).resolve().parents[1])


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime_ns)} of everything under the guarded folders."""
    files = {}
    for folder in GUARDED:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                files[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return files


def pytest_sessionstart(session):
    session.config.stash[_KEY] = snapshot(_root())


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_KEY, None)
    if before is None:
        return
    after = snapshot(_root())
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        message = (
            f"the test suite changed {len(changed)} path(s) under the checkout's "
            f"{' and '.join(GUARDED)} (tests must write only under temporary folders): "
            + ", ".join(changed[:10])
        )
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("ERROR: " + message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_KEY = pytest.StashKey[dict]()
