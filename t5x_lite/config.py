"""Gin wiring: parse gin files and `--gin.NAME=VALUE` overrides into plain objects.

The library never reads gin itself; the CLI (and tests) call `parse_gin` and then take
the objects the files build, e.g. `model_config()` for the `MODEL_CONFIG` macro. A mistake
in a gin file or flag (a missing file, a syntax error, an unknown configurable or
parameter, a binding nothing reads) is an `errors.UserError` naming the file, line and fix.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import inspect
import logging
import os
import re
import sys
from typing import Any, Iterable

import gin
from gin import config_parser

from t5x_lite import errors
from t5x_lite.rundir import paths

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
    raise errors.UserError(f'--gin.{name_equals_value}: a gin override looks like '
                           '--gin.NAME=VALUE')
  name, value = name_equals_value.split('=', 1)
  return f'{name.strip()} = {_gin_value(value.strip())}'


def binding_value(name_equals_value: str):
  """The Python value of a `NAME=VALUE` override (a gin reference stays a string)."""
  value = _gin_value(name_equals_value.split('=', 1)[1].strip())
  return value if value.startswith(('@', '%')) else ast.literal_eval(value)


def _register_readers() -> None:
  """gin opens files with `open`; gs:// (and other URLs) go through etils.epath. gin's
  package-resource reader crashes (TypeError: spec.origin is None) on a path whose first
  directory imports as a namespace package, e.g. a missing `gin_configs/x.gin` run from the
  repository root: such a package holds no gin file, so the check answers False."""
  if getattr(_register_readers, 'done', False):
    return
  gin.config.register_file_reader(lambda path: paths.open_file(path),
                                  lambda path: paths.is_remote(path) and paths.exists(path))

  def safe(exists):
    def check(path):
      try:
        return exists(path)
      except TypeError:
        return False
    return check
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  readers[:] = [(reader, safe(exists)) for reader, exists in readers]
  _register_readers.done = True


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


def _close(name: str, candidates: Iterable[str]) -> str:
  matches = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
  return f' (did you mean {" or ".join(matches)}?)' if matches else ''


def _parameters(selector: str) -> list[str]:
  configurable = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
  try:
    return list(inspect.signature(configurable.wrapped).parameters)
  except (AttributeError, TypeError, ValueError):
    return []


def _configurables() -> list[str]:
  """Short names (`loop.TrainConfig`) of the registered configurables."""
  return ['.'.join(name.split('.')[-2:])
          for name, _ in gin.config._REGISTRY.items()]  # pylint: disable=protected-access


def _import_hint(selector: str) -> str:
  """': ... add `from t5x_lite import decoding`' for 'decoding.DecodingConfig', when a loaded
  t5x_lite module of that name defines it."""
  module, _, name = selector.rpartition('.')
  found = sorted(m for m, obj in list(sys.modules.items())
                 if m.startswith('t5x_lite.') and m.endswith('.' + module) and hasattr(obj, name))
  statement = ('`from {} import {}`'.format(*found[0].rsplit('.', 1)) if found else
               'its import (e.g. `from t5x_lite.models import t5`)')
  return f': no gin file imports it; add {statement} to a gin file you pass'


# gin appends where a statement failed: '\n  In file "F", line N\n    TEXT' (or 'In bindings
# string line N'); gin/utils.py, try_with_location.
_LOCATION = re.compile(r'\n  In (?:file "(?P<file>[^"]*)",|bindings string) line (?P<line>\d+)'
                       r'\n    (?P<text>[^\n]*)')


def _message(e: BaseException, flag: str) -> str | None:
  """One line for gin's own error about a gin file or binding (`flag`: the override being
  parsed); None for anything else: a bug, or an error raised by code that a gin file
  imports, keeps its traceback."""
  if isinstance(e, SyntaxError):   # gin's parser: SyntaxError(msg, (file, line, col, text))
    if (e.filename or '').endswith('.py'):
      return None
    where = f'{e.filename}:{e.lineno}' if e.filename else flag
    return f'{where}: gin syntax error: {e.msg} in {(e.text or "").strip()!r}'
  text = str(e)
  found = _LOCATION.search(text)
  where = (f'{found["file"]}:{found["line"]}: ' if found and found['file'] else
           f'{flag}: ' if flag else '')
  statement = found['text'].strip() if found else ''
  first = text.split('\n', 1)[0]
  if isinstance(e, OSError) and (m := re.match(r'Unable to open file: (.*?)\. Searched', first)):
    return (f'{where}gin file {m[1]} not found (searched the current directory and '
            f'{REPO_ROOT}); check the path')
  if isinstance(e, ValueError):
    if m := re.match(r"Configurable '(.+)' doesn't have a parameter named '(.+)'\.", first):
      return f'{where}{m[1]} has no parameter {m[2]!r}{_close(m[2], _parameters(m[1]))}'
    if m := re.match(r"No configurable matching (?:reference )?'@?([^'(]+)", first):
      return f'{where}no configurable {m[1]}' + (
          _close(m[1], _configurables()) or _import_hint(m[1]))
  if isinstance(e, AttributeError) and (
      m := re.match(r"Couldn't resolve selector (\S+); (?:<module '([^']+)'.*?|(.+?)) has no "
                    r'attribute (\w+)\.', first)):
    module = sys.modules.get(m[2] or '')
    names = [n for n in dir(module) if not n.startswith('_')] if module else []
    return f'{where}{m[1]}: {m[2] or m[3]} has no {m[4]}{_close(m[4], names)}'
  if isinstance(e, NameError) and (m := re.match(r"'(.+)' was not provided by an import", first)):
    return (f'{where}{m[1]} is not imported: add the import that defines it (e.g. `from '
            't5x_lite.models import t5`) after `from __gin__ import dynamic_registration`')
  if isinstance(e, ModuleNotFoundError) and (m := re.match(r"No module named '(.+)'", first)):
    imported = re.match(r'(?:from|import)\s+([\w.]+)', statement)
    if imported and (imported[1] + '.').startswith(m[1] + '.'):
      return f'{where}cannot import {m[1]} ({statement!r}): is it installed and on PYTHONPATH?'
  return None


@contextlib.contextmanager
def user_errors(flag: str = ''):
  """gin's errors about a file or binding -> a one-line `UserError`; anything else
  propagates unchanged."""
  try:
    yield
  except (SyntaxError, OSError, ValueError, AttributeError, NameError, ImportError) as e:
    message = _message(e, flag)
    if message is None:
      raise
    raise errors.UserError(message) from e


def _add_search_paths() -> None:
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  for path in ('', REPO_ROOT):
    if path not in prefixes:
      gin.add_config_file_search_path(path)


def parse_gin(files: Iterable[str] = (), bindings: Iterable[str] = (), *,
              fixed: Iterable[str] = (), reads: Iterable[str] | None = None) -> None:
  """Parse gin files (searched in the cwd, then the repository root), then the command's own
  `fixed` NAME=VALUE bindings (from its flags, e.g. MODEL_DIR), then the user's `bindings`.

  `reads`: the macros the caller reads (e.g. MODEL_CONFIG, TRAIN); a binding of `bindings`
  that none of them reaches is a misspelling or a no-op, and an error with close matches.
  """
  _register_readers()
  _add_search_paths()
  with _quiet_search_misses():
    for path in files:
      with user_errors():
        gin.parse_config_file(path)
  bindings = list(bindings)
  for b in list(fixed) + bindings:
    with user_errors(f'--gin.{b}'):
      gin.parse_config(binding(b))
  if reads is not None:
    check_reads(bindings, reads)


def _reached(reads: Iterable[str]) -> set[tuple[str, str]]:
  """The config keys ((scope, 'gin.macro') of a macro, ('', selector) of a configurable)
  that the `reads` macros reach through their values' `%MACRO` and `@configurable` refs."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  todo = [(name, 'gin.macro') for name in reads]
  seen = set()
  while todo:
    key = todo.pop()
    if key in seen:
      continue
    seen.add(key)
    for (scope, selector), params in config.items():
      # a macro is one key; a configurable's bindings count in every scope
      if ((scope, selector) != key) if key[1] == 'gin.macro' else (selector != key[1]):
        continue
      for value in gin.config._iterate_flattened_values(params):  # pylint: disable=protected-access
        if isinstance(value, gin.config.ConfigurableReference):
          if value.configurable.selector == 'gin.macro':
            todo.append(('/'.join(value.scopes), 'gin.macro'))
          else:
            todo.append(('', value.configurable.selector))
  return seen


def check_reads(bindings: Iterable[str], reads: Iterable[str]) -> None:
  """Every `--gin.NAME=VALUE` must be read by the configuration the command uses: a
  `--gin.TRAIN_STEP=3` (nothing reads TRAIN_STEP) would otherwise train the default."""
  reads = list(reads)
  reached = _reached(reads)
  macros = [scope for scope, selector in reached if selector == 'gin.macro']
  for name in sorted(macros):   # `NAME = %gin.REQUIRED` left unset reaches the code as is
    value = gin.config._CONFIG.get((name, 'gin.macro'), {}).get('value')  # pylint: disable=W0212
    if (isinstance(value, gin.config.ConfigurableReference) and
        value.scoped_selector == 'gin.REQUIRED/gin.constant'):
      raise errors.UserError(f'the gin files leave {name} = %gin.REQUIRED: set it with '
                             f'--gin.{name}=... or a gin file that defines it')
  for b in bindings:
    name = b.split('=', 1)[0].strip()
    _, selector, arg = config_parser.parse_binding_key(name)
    if not arg:
      if (name, 'gin.macro') not in reached:
        raise errors.UserError(
            f'--gin.{b}: no configuration reads the macro {name}{_close(name, macros)}; this '
            f'command reads {", ".join(reads)} and the macros they reference')
      continue
    configurable = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    if configurable is not None and ('', configurable.selector) not in reached:
      raise errors.UserError(
          f'--gin.{b}: {selector} is not used by the configuration this command reads '
          f'({", ".join(reads)}), so the binding would change nothing')


_MISSING = object()


def macro(name: str, default=_MISSING):
  """The evaluated value of a gin macro (a `@configurable()` reference is called); a macro
  the gin files do not define is `default`, or an error naming it."""
  try:
    value = gin.query_parameter(f'%{name}')
  except ValueError as e:
    if default is not _MISSING:
      return default
    raise errors.UserError(f'the gin files define no {name} macro: add the gin file that sets '
                           f'it (--gin_file=...) or --gin.{name}=...') from e
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn()
  return value


def operative_config(model: Any) -> str:
  """What `train` writes to MODEL_DIR/config.gin: gin's operative config (every parameter
  used) plus the entry-point macros it omits, so that `eval` can rebuild the run from it
  (`model`: the run's model config, of whatever family)."""
  cls = type(model)
  return (gin.operative_config_str() + '\n# Entry points\nMODEL_CONFIG = '
          f'@{cls.__module__.rpartition(".")[2]}.{cls.__name__}()\nTRAIN = @loop.TrainConfig()\n')


def model_config():
  """The model config (its family's config class) built by the `MODEL_CONFIG` macro of the parsed
  gin files."""
  return macro('MODEL_CONFIG')


def mixture_name_or_object():
  """`MIXTURE_OR_TASK_NAME`: a registered name, or a Mixture/Task built by the gin files."""
  return macro('MIXTURE_OR_TASK_NAME')
