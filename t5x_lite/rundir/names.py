"""Names that become paths: tasks, mixtures, eval sets and splits.

A run directory's config.gin may come from someone else, and these names end up in file
names (eval/<step>/<set>/predictions/<task>.jsonl, the SentencePiece cache's
spm_<mixture>_*.model). So a name is checked where it is made, with seqio's rule for task
names (seqio/dataset_providers.py `_VALID_TASK_NAME_REGEX = r"^[\\w\\d\\.\\:_#]+$"`) plus `-`:
no `/`, no `\\`, no spaces; never empty, `.` or anything containing `..`. Every path made
from a name is also joined with `paths.under`, which refuses a result outside its root.
"""

from __future__ import annotations

import re

from t5x_lite import errors

RULE = r'^[\w\d\.\:_#-]+$'
_CHAR = re.compile(r'[\w\d\.\:_#-]')


class BadName(errors.UserError, ValueError):
  """A task, mixture, eval-set or split name that could not be a file name."""


def check(kind: str, name) -> str:
  """`name` if it follows RULE (seqio's + `-`) and is not `.`/`..`-like; else BadName naming
  the first bad character. `kind` says what it names ('task', 'mixture', ...)."""
  if not isinstance(name, str) or not name:
    raise BadName(f'a {kind} name must be a non-empty string, got {name!r}')
  bad = next((c for c in name if not _CHAR.fullmatch(c)), None)
  if bad is not None:
    raise BadName(f'{kind} name {name!r} has the character {bad!r}: names may hold letters, '
                  f'digits and . : _ # - only (seqio\'s task-name rule {RULE}), since they '
                  'become file names')
  if name == '.' or '..' in name:
    raise BadName(f'{kind} name {name!r} may not be "." or contain "..": it becomes a file '
                  'name')
  return name
