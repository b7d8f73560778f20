"""A run directory's `config.gin`, read without running any code that it names.

`t5x-lite eval` rebuilds a run from MODEL_DIR/config.gin, the operative config that `train`
wrote. gin's dynamic registration lets a gin file import any module and call anything it
reaches (`import os` with `@os.system()`, or `@config.os.system()` through a module's
attributes), so whoever can write a run directory (a shared bucket, a downloaded run) could
run code as the user. The file is therefore checked statement by statement, with gin's own
parser and resolver, before gin parses it: it may import only t5x_lite's modules, include
nothing, and bind or reference only t5x_lite's dataclasses (configs: data) and the
`BUILDERS` that gin_configs/ call. Anything else is refused (`UnsafeRunConfig`); a user who
trusts the file (e.g. a run that imported their own task module) passes it with
`--gin_file`, which is read with full gin like every gin file of their own.
"""

from __future__ import annotations

import dataclasses
import io

import gin
from gin import config_parser

from t5x_lite import config, errors
from t5x_lite.rundir import paths

# The functions (not dataclasses) that gin_configs/ call: tests/reliability checks that every
# reference in gin_configs/ is allowed, so a new one must be listed here.
BUILDERS = frozenset({
    't5x_lite.data.file_tasks.file_task', 't5x_lite.data.file_tasks.file_mixture',
    't5x_lite.data.spm_training.mixture_vocabulary',
    't5x_lite.data.mixtures.Mixture'})   # a scheduled mixture (schedules.py) built in gin
_GIN_BUILTINS = (gin.config.macro, gin.config.singleton,
                 gin.config._retrieve_constant)  # pylint: disable=protected-access


class UnsafeRunConfig(errors.UserError):
  """A run's config.gin names code outside t5x_lite's configs."""


class _Recorder(config_parser.ParserDelegate):
  """Collects `@references` instead of resolving them (gin's delegate would register them)."""

  def __init__(self):
    self.references = []

  def configurable_reference(self, scoped_configurable_name, evaluate):
    self.references.append(scoped_configurable_name)
    return scoped_configurable_name

  def macro(self, macro_name):
    return macro_name


def allowed(obj) -> bool:
  """A t5x_lite dataclass, a listed builder, or gin's macro/constant/singleton."""
  if any(obj is builtin for builtin in _GIN_BUILTINS):
    return True
  module = getattr(obj, '__module__', None) or ''
  if isinstance(obj, type) and dataclasses.is_dataclass(obj):
    return module.split('.')[0] == 't5x_lite'
  return f'{module}.{getattr(obj, "__qualname__", "")}' in BUILDERS


def _resolve(context, selector: str):
  """What gin would bind `selector` to: through the file's imports with dynamic registration
  (gin.config.ParseContext.get_configurable), else a registered configurable."""
  if context._dynamic_registration:  # pylint: disable=protected-access
    return context._resolve_selector(selector)[1][-1]  # pylint: disable=protected-access
  configurable = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
  if configurable is None:
    raise NameError(selector)
  return configurable.wrapped


def check(path: str, text: str) -> None:
  """Refuses `text` (the content of `path`) unless it names only t5x_lite's configs."""
  def refuse(statement, what):
    raise UnsafeRunConfig(
        f'{path}:{statement.location.line_num}: refused: {what}. eval reads a run\'s '
        'config.gin as data and runs no code that it names (only t5x_lite\'s configs). If '
        f'you trust this file (e.g. your run imported your own task module), pass it '
        f'yourself: --gin_file={path} (your gin files are read with full gin)')

  recorder = _Recorder()
  context = gin.config.ParseContext()
  source = io.StringIO(text)
  source.name = path
  with config.user_errors():
    for statement in config_parser.ConfigParser(source, recorder):
      selectors, recorder.references = recorder.references, []
      if isinstance(statement, config_parser.IncludeStatement):
        refuse(statement, f'it includes {statement.filename}')
      if isinstance(statement, config_parser.ImportStatement):
        gin_feature = statement.is_from and statement.module.startswith('__gin__.')
        if not gin_feature and statement.module.split('.')[0] != 't5x_lite':
          refuse(statement, f'it imports {statement.module}, which is not part of t5x_lite')
        try:
          context.process_import(statement)
        except ImportError as e:
          raise errors.UserError(f'{path}:{statement.location.line_num}: cannot import '
                                 f'{statement.module} ({e})') from e
        continue
      if isinstance(statement, config_parser.BlockDeclaration) or statement.arg_name:
        selectors.append(statement.selector)   # the configurable being bound (not a macro)
      for scoped in selectors:
        selector = scoped.rsplit('/', 1)[-1]
        try:
          obj = _resolve(context, selector)
        except (NameError, AttributeError):
          refuse(statement, f'{selector} does not resolve through its t5x_lite imports')
        if not allowed(obj):
          refuse(statement, f'{selector} is {getattr(obj, "__module__", None)}.'
                 f'{getattr(obj, "__qualname__", type(obj).__name__)}, not a t5x_lite config')


def parse(model_dir: str, gin_files: list[str]) -> None:
  """Parses MODEL_DIR/config.gin, checked, before the user's own `gin_files` (which may
  override it). Listed among `gin_files` it is the user's and is skipped here. Missing, it is
  an error unless `gin_files` are given (e.g. a converted model_dir: model.gin + run files)."""
  path = paths.join(model_dir, 'config.gin')
  if any(paths.absolute(f) == path for f in gin_files):
    return
  if not paths.exists(path):
    if gin_files:
      return
    raise errors.UserError(
        f'{path} not found: is {model_dir} a run directory (`t5x-lite train` writes config.gin '
        'there)? Otherwise pass the run\'s gin files: --gin_file=MODEL.gin '
        '--gin_file=gin_configs/runs/finetune.gin --gin_file=MIXTURE.gin')
  with paths.open_file(path) as f:
    text = f.read()
  check(path, text)
  source = io.StringIO(text)   # the very text that was checked, not a second read
  source.name = path
  with config.user_errors():
    gin.parse_config(source)
