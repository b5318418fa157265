"""The ``--vocabulary`` / ``--custom-vocabulary`` pair of ``tools/demo.py`` and
``tools/export_model.py``."""

from typing import Union

from vild_d2.text import parse_names

__all__ = ["vocabulary_from_cli"]


def vocabulary_from_cli(vocabulary: str = "", custom: str = "") -> Union[str, list, None]:
    """
    The tools' ``--vocabulary`` / ``--custom-vocabulary`` pair as a spec for
    :meth:`vild_d2.ViLDPredictor.set_vocabulary`: "custom" (or no ``--vocabulary`` with custom
    names) -> the comma-separated names; another value is passed on (built-in name, file,
    dataset); neither -> None (keep the checkpoint's vocabulary).
    """
    if vocabulary == "custom" or (not vocabulary and custom):
        names = parse_names(custom or "")
        if not names:
            raise ValueError(
                'empty vocabulary: --vocabulary custom needs --custom-vocabulary "name1,name2,..."'
            )
        return names
    if custom:
        raise ValueError(
            f"--custom-vocabulary is only used with --vocabulary custom (got {vocabulary!r})"
        )
    return vocabulary or None
