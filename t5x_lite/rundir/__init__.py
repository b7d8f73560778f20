"""The run directory: paths derived from names that never leave their root (paths.py,
names.py), this launch's provenance (provenance.py), metrics and events (writers.py), and the
check of a run's config.gin before `eval` reads it (run_config.py)."""
