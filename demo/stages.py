"""Cached stages of subprocess commands, run in turn or side by side: the machinery behind
demo/shapes_pipeline.py (``make demo``, ``make ablation``).

A stage runs the project's tools in subprocesses; ``<out>/stages/<name>.json`` records a key made
of its commands, the configs they read and the keys of the stages it depends on. A stage whose
key and outputs are unchanged is skipped; a changed one reruns. Branches of stages can run side
by side, the machine's cores split between them.
"""

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from vild_d2.fileio import atomic_write

__all__ = ["Branch", "StageRunner", "config_chain", "file_key", "quote"]


@dataclass
class Branch:
    """How the stages of one :meth:`StageRunner.side_by_side` branch run."""

    log_file: Optional[Path] = None  # None: the terminal
    threads_file: Optional[Path] = None  # the branch's current share of the cores (None: all)


class StageRunner:
    """Runs cached stages (:meth:`_stage`) under ``out`` with the tools of the checkout
    ``repo``, in the environment ``env``; ``log`` prints the stage lines."""

    def __init__(self, out: Path, repo: Path, env: Dict[str, str], log=None):
        self.out, self.repo, self.env = Path(out), Path(repo), env
        # Flushed: the stage lines must interleave with the tools' own output in a log file.
        self.log = log or functools.partial(print, flush=True)
        self.keys: Dict[str, str] = {}
        self.timings: Dict[str, float] = {}
        self._branch = threading.local()  # the side_by_side branch a thread runs, if any
        self.cores = os.cpu_count() or 1

    def side_by_side(self, *branches: Sequence[Callable[[], None]], cores: int = 0):
        """
        Run each branch (a list of stage methods, in order) in its own thread, at the same
        time, the cores split between them (``cores`` = 0: all of this machine's). When a
        branch ends, its cores go to the branches still running: a tool that reads
        ``$VILD_D2_THREADS_FILE`` (the teacher, ``demo/tiny_clip.py``) takes them mid-run. Two
        processes of one thread each use 2 cores fully, which a second torch thread does not
        (docs/SHAPES.md "Stage times"). The first branch writes to the terminal, the others to
        ``<output>/stages/<first stage>.log``. With one core, the branches run in turn.
        """
        cores = cores or self.cores
        if cores < 2 or len(branches) < 2:
            for stage in (s for b in branches for s in b):
                stage()
            return
        logs = self.out / "stages"
        logs.mkdir(parents=True, exist_ok=True)

        names = [b[0].__name__.replace("run_", "") for b in branches]
        threads_files = [logs / f"{n}.threads" for n in names]
        running = set(range(len(branches)))
        lock = threading.Lock()

        def share_cores():  # under lock: the cores split between the branches still running
            for j in running:
                atomic_write(threads_files[j], [str(max(1, cores // len(running))).encode()])

        def run(i, stages):
            self._branch.value = Branch(
                log_file=None if i == 0 else logs / f"{names[i]}.log",
                threads_file=threads_files[i],
            )
            try:
                for stage in stages:
                    stage()
            finally:
                with lock:
                    running.discard(i)
                    share_cores()

        with lock:
            share_cores()

        with ThreadPoolExecutor(len(branches)) as pool:
            futures = [pool.submit(run, i, list(b)) for i, b in enumerate(branches)]
            errors = [f.exception() for f in futures]  # waits for every branch
        for error in errors:
            if error is not None:
                raise error

    def _stage(
        self,
        name: str,
        commands: List[List[str]],
        outputs: List[Path],
        after: Sequence[str] = (),
        clean: Sequence[Path] = (),
        configs: Sequence[str] = (),
        valid: Optional[Callable[[], bool]] = None,
        at_once: bool = False,
    ):
        """
        Run ``commands`` (in turn, or all at once with the cores split between them: shards)
        unless the stage's marker holds the same key and ``outputs`` exist
        (and ``valid()``, if given, holds). The key covers the commands, the contents of the
        ``configs`` they read (with their _BASE_ files) and the keys of the stages ``after``.
        Before running, ``clean`` paths are deleted: the tools resume what they find, and a
        store or training folder made for another key must not be resumed. Inside
        :meth:`side_by_side`, the commands get that branch's share of the cores and log file.
        """
        texts = [(self.repo / c).read_text() for c in config_chain(self.repo, configs)]
        key = hashlib.sha256(
            json.dumps([commands, texts, [self.keys[a] for a in after]]).encode()
        ).hexdigest()[:16]
        self.keys[name] = key
        marker = self.out / "stages" / f"{name}.json"
        if marker.is_file() and all(p.exists() for p in outputs) and (valid is None or valid()):
            try:
                done = json.loads(marker.read_text())
            except ValueError:
                done = {}
            if done.get("key") == key:
                self.log(f"[{name}] cached ({done.get('seconds', 0):.0f} s when it ran)")
                self.timings[name] = 0.0
                return
        self.log(f"[{name}] running")
        marker.unlink(missing_ok=True)
        for path in clean:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        branch = getattr(self._branch, "value", None) or Branch()
        # at_once: the commands start together (shards of one store), the cores split.
        groups = [list(commands)] if at_once else [[c] for c in commands]
        start = time.perf_counter()
        for group in groups:
            # The branch's share of the cores as its tools start (the teacher follows it later).
            share = int(branch.threads_file.read_text()) if branch.threads_file else 0
            threads = share or (self.cores if len(group) > 1 else 0)
            threads = max(1, threads // len(group)) if threads else 0
            env = dict(self.env, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
            if branch.threads_file is not None:  # not in the key: how a stage runs, not what
                env["VILD_D2_THREADS_FILE"] = str(branch.threads_file)
            running = []
            for i, cmd in enumerate(group):
                self.log("  + " + " ".join(quote(c) for c in cmd))
                log_file = branch.log_file or (
                    self.out / "stages" / f"{name}.{i}.log" if i else None
                )
                if log_file is not None:
                    self.log(f"    (its output: {log_file})")
                    log_file.parent.mkdir(parents=True, exist_ok=True)
                out = open(log_file, "ab") if log_file is not None else None
                proc = subprocess.Popen(
                    [sys.executable, *cmd],
                    cwd=self.repo,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT if out else None,
                )
                running.append((cmd, log_file, out, proc))
            failed = []
            for cmd, log_file, out, proc in running:  # every one ends before an error is raised
                code = proc.wait()
                if out is not None:
                    out.close()
                if code:
                    seen = f"; its output is in {log_file}" if log_file else ""
                    failed.append(f"exit {code}) running: {' '.join(cmd)}{seen}")
            if failed:
                raise RuntimeError(f"stage {name!r} failed ({failed[0]}")
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {name!r} finished but did not write {missing}")
        seconds = time.perf_counter() - start
        self.timings[name] = seconds
        atomic_write(marker, [json.dumps({"key": key, "seconds": seconds}).encode()])
        self.log(f"[{name}] done in {seconds:.0f} s")


def config_chain(repo: Path, configs: Sequence[str]) -> List[str]:
    """``configs`` and the _BASE_ files they inherit from, repo-relative."""
    out: List[str] = []
    todo = list(configs)
    while todo:
        path = todo.pop()
        out.append(path)
        base = re.search(r'^_BASE_:\s*"?([^"\n]+)"?', (repo / path).read_text(), re.M)
        if base:
            todo.append(os.path.normpath(os.path.join(os.path.dirname(path), base.group(1))))
    return out


def file_key(path: Path) -> str:
    """A short hash of a file's bytes (a stage key for a file given, not made)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def quote(arg: str) -> str:
    """``arg`` as the log shows a command."""
    return f"'{arg}'" if (" " in arg or "(" in arg) else arg
