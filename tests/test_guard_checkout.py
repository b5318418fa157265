"""The suite's guard (tests/guard_checkout.py) fails a run that writes into the checkout's
output/ or datasets/, and passes one that writes only under its temporary folders."""

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

WRITES = """
from pathlib import Path

def test_writes(tmp_path):
    (tmp_path / "fine.txt").write_text("temporary")
    {extra}
"""


@pytest.mark.parametrize(
    "extra,failed",
    [
        ("", False),
        ("Path('{root}/output/shapes').mkdir(parents=True)", True),
        ("(Path('{root}/datasets') / 'user.json').write_text('changed')", True),
    ],
)
def test_guard_fails_a_run_that_writes_into_the_checkout(pytester, monkeypatch, extra, failed):
    root = pytester.path / "checkout"
    (root / "datasets").mkdir(parents=True)
    (root / "datasets" / "user.json").write_text("the user's")
    monkeypatch.setenv("VILD_D2_GUARDED_ROOT", str(root))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    pytester.makepyfile(test_inner=WRITES.format(extra=extra.format(root=root)))
    result = pytester.runpytest_subprocess("-p", "guard_checkout")
    if failed:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(["*the test suite changed 1 path(s)*"])
    else:
        assert result.ret == pytest.ExitCode.OK
