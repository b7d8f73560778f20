"""The name -> Task / Mixture registry (seqio's TaskRegistry and MixtureRegistry in one).

A leaf module: it imports no task definitions. Modules that define tasks register them
(builtin_tasks.register_all, file_tasks); the `t5x_lite.data` package registers the
built-in tasks when it is imported, so every name lookup sees them.
"""

from __future__ import annotations

import difflib
from typing import Any

from t5x_lite import errors

_REGISTRY: dict[str, Any] = {}


class UnknownNameError(errors.UserError, KeyError):
  """A task or mixture name nothing registered (a KeyError, as a dict lookup would be)."""

  def __str__(self):   # KeyError's str() is the repr of its argument
    return str(self.args[0])


class DuplicateNameError(errors.UserError, ValueError):
  """A second task or mixture under a name already registered."""


def register(obj, overwrite: bool = False):
  """Register a Task or Mixture under its name; returns it."""
  if obj.name in _REGISTRY and not overwrite and _REGISTRY[obj.name] is not obj:
    raise DuplicateNameError(f'{obj.name!r} is already registered; pass overwrite=True to '
                             'replace it')
  _REGISTRY[obj.name] = obj
  return obj


def remove(name: str) -> None:
  _REGISTRY.pop(name, None)


def registered() -> dict[str, Any]:
  return dict(_REGISTRY)


def get(name: str):
  """The Task or Mixture registered as `name`."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f' Did you mean {close}?' if close else ''
    raise UnknownNameError(f'unknown task or mixture {name!r}.{hint} Registered: '
                   f'{sorted(_REGISTRY)}')
  return _REGISTRY[name]
