"""What the tools in ``tools/`` share on the command line: the one way to pass settings
(``args``: ``--config-file``, trailing ``KEY VALUE`` overrides or ``--opts``,
``--dataset-file``), one-line startup errors (``errors``), the demo's files (``demo_files``),
the ``--vocabulary`` pair (``vocabulary``) and the precompute tools' flags (``precompute``).

Not part of the ``vild_d2`` wheel: the tools find it beside them (a script's folder is first on
``sys.path``); the tests through pytest.ini's ``pythonpath``.
"""
