"""Gin wiring: parse gin files and `--gin.NAME=VALUE` overrides into plain objects.

The library never reads gin itself; the CLI (and tests) call `parse_gin` and then take
the objects the files build, e.g. `model_config()` for the `MODEL_CONFIG` macro.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
from typing import Iterable

import gin

from t5x_lite import paths

# Repository root, so that `include 'gin_configs/models/flan_t5/small.gin'` works from anywhere.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_CONFIGS = os.path.join(REPO_ROOT, 'gin_configs')


def _gin_value(value: str) -> str:
  """A Python/gin literal or reference stays as it is; anything else becomes a string."""
  if value.startswith(('@', '%')):
    return value
  try:
    ast.literal_eval(value)
    return value
  except (ValueError, SyntaxError):
    return repr(value)


def binding(name_equals_value: str) -> str:
  """'TRAIN_STEPS=100' -> 'TRAIN_STEPS = 100'; 'MODEL_DIR=/tmp/x' -> "MODEL_DIR = '/tmp/x'"."""
  if '=' not in name_equals_value:
    raise ValueError(f'gin override {name_equals_value!r} must look like NAME=VALUE')
  name, value = name_equals_value.split('=', 1)
  return f'{name.strip()} = {_gin_value(value.strip())}'


def _register_remote_reader() -> None:
  """gin opens files with `open`; gs:// (and other URLs) go through etils.epath."""
  if not getattr(_register_remote_reader, 'done', False):
    gin.config.register_file_reader(lambda path: paths.open_file(path), paths.is_remote)
    _register_remote_reader.done = True


def _not_a_search_miss(record: logging.LogRecord) -> bool:
  return record.msg != 'Path not found: %s'


@contextlib.contextmanager
def _quiet_search_misses():
  """gin's package-resource reader logs 'ERROR Path not found' for every search path that
  lacks a file, before the path that has it (so `include 'gin_configs/...'` run outside the
  repository logged two errors per include). A file found nowhere still raises IOError."""
  root = logging.getLogger()
  root.addFilter(_not_a_search_miss)
  try:
    yield
  finally:
    root.removeFilter(_not_a_search_miss)


def parse_gin(files: Iterable[str] = (), bindings: Iterable[str] = ()) -> None:
  """Parse gin files (searched in the cwd, then the repository root) and NAME=VALUE bindings."""
  _register_remote_reader()
  for path in ('', REPO_ROOT):
    gin.add_config_file_search_path(path)
  with _quiet_search_misses():
    gin.parse_config_files_and_bindings(list(files), [binding(b) for b in bindings],
                                        finalize_config=False)


def macro(name: str):
  """The evaluated value of a gin macro (a `@configurable()` reference is called)."""
  value = gin.query_parameter(f'%{name}')
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn()
  return value


def model_config():
  """The `T5Config` built by the `MODEL_CONFIG` macro of the parsed gin files."""
  return macro('MODEL_CONFIG')


def mixture_name_or_object():
  """`MIXTURE_OR_TASK_NAME`: a registered name, or a Mixture/Task built by the gin files."""
  return macro('MIXTURE_OR_TASK_NAME')
