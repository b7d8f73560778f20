"""Configuration values checked where they enter: types from the annotations, then ranges.

Every dataclass that gin binds (TrainConfig, OptimizerConfig, LossConfig, DecodingConfig,
T5Config) calls `check` in its `__post_init__`, so `--gin.TRAIN_STEPS=1O` (config.binding
takes a value that is not a Python literal as a string) or `CHECKPOINT_PERIOD=0` fail before
anything is built or trained, naming the field (and its gin macro), what it must be and what
it got, instead of a ZeroDivisionError after the first step or a TypeError inside jax.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import operator
import types
import typing
from typing import Any, Mapping

import numpy as np

from t5x_lite import errors


class ConfigError(errors.UserError, ValueError):
  """A configuration value of the wrong type or out of its range."""


_OPS = {'>': operator.gt, '>=': operator.ge, '<': operator.lt, '<=': operator.le}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_))


def _matches(value, hint) -> bool:
  """Whether `value` has the annotated type; what it cannot tell (callables' signatures,
  type variables) it accepts. Ints are numbers, bools are not."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, a) for a in args)
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, (bool, np.bool_))
  if hint is int:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if hint is float:
    return _is_number(value)
  if origin is collections.abc.Mapping or hint is collections.abc.Mapping or origin is dict:
    return isinstance(value, collections.abc.Mapping) and (not args or all(
        _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
  if origin in (collections.abc.Sequence, list, tuple):
    return isinstance(value, (list, tuple)) and (not args or all(
        _matches(v, args[0]) for v in value))
  if origin is collections.abc.Callable:
    return callable(value)
  if isinstance(hint, type):
    return isinstance(value, hint)
  return True


def _describe(hint) -> str:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    return ' or '.join(_describe(a) for a in args)
  if origin is collections.abc.Mapping or origin is dict:
    return (f'a dict of {_describe(args[0])} to {_describe(args[1])}' if args else 'a dict')
  names = {type(None): 'None', bool: 'True or False', int: 'an integer', float: 'a number',
           str: 'a string'}
  if hint in names:
    return names[hint]
  return f'a {getattr(hint, "__name__", hint)}'


def _in_range(value, rule) -> bool:
  if isinstance(rule, tuple):
    return value in rule
  if rule[0] in '([':
    low, high = (float(x) for x in rule[1:-1].split(','))
    return ((value > low if rule[0] == '(' else value >= low) and
            (value < high if rule[-1] == ')' else value <= high))
  op, bound = rule.split()
  return _OPS[op](value, float(bound))


def _describe_rule(rule) -> str:
  if isinstance(rule, tuple):
    return f'one of {", ".join(map(repr, rule))}'
  return f'in {rule}' if rule[0] in '([' else rule


def field_name(obj, field: str, macros: Mapping[str, str] | None = None) -> str:
  """'TRAIN_STEPS (loop.TrainConfig.train_steps)': the gin names a user sets it by."""
  cls = type(obj)
  qualified = f'{cls.__module__.rsplit(".", 1)[-1]}.{cls.__name__}.{field}'
  macro = (macros or {}).get(field)
  return f'{macro} ({qualified})' if macro else qualified


def check(obj, ranges: Mapping[str, Any] | None = None,
          macros: Mapping[str, str] | None = None) -> None:
  """Raise ConfigError unless every field of dataclass `obj` has its annotated type (floats
  finite) and lies in `ranges[field]`: '> 0', '>= 1', '(0, 1]', '[0, 1)' or a tuple of
  allowed values; a rule applies to each value of a dict field and skips None."""
  hints = _hints(type(obj))
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    hint = hints.get(field.name, Any)
    if not _matches(value, hint):
      note = (' (gin takes a value that is not a Python literal as a string: check it for '
              'typos)' if isinstance(value, str) else '')
      raise ConfigError(f'{field_name(obj, field.name, macros)} must be {_describe(hint)}, '
                        f'got {value!r}{note}.')
    values = value.values() if isinstance(value, collections.abc.Mapping) else [value]
    for v in values:
      if _is_number(v) and not math.isfinite(v):
        raise ConfigError(f'{field_name(obj, field.name, macros)} must be finite, got {v!r}.')
    rule = (ranges or {}).get(field.name)
    if rule is not None and value is not None and not all(_in_range(v, rule) for v in values):
      every = 'every value of ' if isinstance(value, collections.abc.Mapping) else ''
      raise ConfigError(f'{every}{field_name(obj, field.name, macros)} must be '
                        f'{_describe_rule(rule)}, got {value!r}.')
