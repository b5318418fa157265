"""One line for what stops a tool before it starts (a bad config file, bad weights, a bad
dataset file), shared by the tools: the user gets the file and the reason, exit 2, no
traceback."""

from typing import Optional

import yaml

from vild_d2.checkpoint import IncompatibleCheckpointError

__all__ = ["STARTUP_ERRORS", "startup_error_line"]

# What a bad config, vocabulary or checkpoint raises while the model is being made. Anything
# else is a bug and keeps its traceback.
STARTUP_ERRORS = (
    ValueError,
    FileNotFoundError,
    KeyError,
    AssertionError,
    IncompatibleCheckpointError,
    yaml.YAMLError,
)


def startup_error_line(error: BaseException, config_file: str = "") -> Optional[str]:
    """``error`` as one line ("error: ..."), or None if it is not a startup error."""
    if not isinstance(error, STARTUP_ERRORS):
        return None
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        where = getattr(mark, "name", "") or config_file or "the config file"
        if where.startswith("<"):  # yaml names a stream it was given as a string "<unicode ...>"
            where = config_file or "the config file"
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        why = f"{context}, {problem}" if context else problem
        return f"error: {where}: not valid YAML{at}: {why}"
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    # One line: a multi-line message (a list of tensors) is joined, not cut.
    line = ""
    for part in (x.strip() for x in message.splitlines() if x.strip()):
        line += ("" if not line else " " if line.endswith(":") else "; ") + part
    return f"error: {line}"
