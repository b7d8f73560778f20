"""Data: tasks, mixtures, their registry, vocabularies and the grain pipelines.

Importing the package registers the built-in tasks and mixtures (`builtin`,
`builtin_heldout`), so a name lookup anywhere sees them; registry.py itself imports no task
definitions (seqio's pattern: the module that defines tasks registers them).
"""

from t5x_lite.data import builtin_tasks as _builtin_tasks

_builtin_tasks.register_all()
