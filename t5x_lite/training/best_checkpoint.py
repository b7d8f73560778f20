"""The best checkpoint by an eval metric (`TrainConfig.keep_best`), kept besides the latest
`max_to_keep`, and `--checkpoint=best|latest|STEP` for eval / infer / export.

orbax's own `best_fn` (BestN) ranks checkpoints by metrics given at save time, and counts the
best against `max_to_keep` instead of the latest. Here a step's checkpoint is saved before
its eval (a kill during a long eval loses no training), so the best step is chosen after
the eval, recorded in MODEL_DIR/best_checkpoint.json, and protected from orbax's garbage
collection by a preservation policy that reads it (`KeepSteps`, beside `LatestN`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
from typing import Mapping, Sequence

from orbax.checkpoint import checkpoint_managers

from t5x_lite import errors
from t5x_lite.rundir import paths, writers

BEST_FILE = 'best_checkpoint.json'


@dataclasses.dataclass
class KeepSteps:
  """An orbax PreservationPolicy: preserve the checkpoints of `steps` (a set that changes
  during the run: the current best)."""
  steps: set

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [c.step in self.steps for c in checkpoints]


def preservation_policy(max_to_keep: int | None, keep: KeepSteps):
  return checkpoint_managers.AnyPreservationPolicy(
      [checkpoint_managers.LatestN(n=max_to_keep), keep])


def read(model_dir: str) -> dict | None:
  """The run's best-checkpoint record ({'step', 'key', 'mode', 'value'}), or None."""
  path = paths.join(model_dir, BEST_FILE)
  if not paths.exists(path):
    return None
  with paths.open_file(path) as f:
    return json.load(f)


class BestCheckpoint:
  """Tracks the best value of one metrics.jsonl key ('max' or 'min') over a run's evals."""

  def __init__(self, model_dir: str, key: str, mode: str = 'max'):
    if mode not in ('max', 'min'):
      raise errors.UserError(f"keep_best_mode must be 'max' or 'min', got {mode!r}")
    self.model_dir, self.key, self.mode = model_dir, key, mode
    self.keep = KeepSteps(set())
    self.record = read(model_dir)
    if self.record and (self.record.get('key'), self.record.get('mode')) != (key, mode):
      logging.warning('keep_best changed from %s (%s) to %s (%s): the best is chosen anew',
                      self.record.get('key'), self.record.get('mode'), key, mode)
      self.record = None
    if self.record:
      self.keep.steps.add(int(self.record['step']))

  def check_key(self, known: Sequence[str]) -> None:
    """Before training: keep_best must name a key the evals write."""
    if self.key not in known:
      close = difflib.get_close_matches(self.key, known, n=3, cutoff=0.5)
      raise errors.UserError(
          f'keep_best={self.key!r} is not a metric the evals write'
          + (f' (did you mean {" or ".join(repr(c) for c in close)}?)' if close else '')
          + f'; they write e.g. {", ".join(known[:6])} ... ({len(known)} keys)')

  def resume_at(self, step: int) -> None:
    """A run resuming at `step` redoes the evals after it: forget a best recorded there."""
    if self.record and int(self.record['step']) > step:
      self._drop()

  def forget(self, steps) -> None:
    """Checkpoints `steps` were moved aside (a non-finite stop, guard.py): a best record
    naming one of them is dropped (`--checkpoint=best` would find no checkpoint)."""
    if self.record and int(self.record['step']) in steps:
      logging.warning('the best checkpoint so far (step %d, %s = %s) was moved aside: no '
                      'best is recorded', self.record['step'], self.key, self.record['value'])
      self._drop()

  def _drop(self) -> None:
    self.keep.steps.discard(int(self.record['step']))
    self.record = None
    paths.remove(paths.join(self.model_dir, BEST_FILE))

  def update(self, step: int, flat: Mapping[str, float]) -> bool:
    """Records `step` if its value of the key beats the best so far (ties keep the earlier
    step); returns whether it did. A NaN never wins."""
    if self.key not in flat:
      return False
    value = float(flat[self.key])
    if math.isnan(value):
      return False
    if self.record is not None:
      best = float(self.record['value'])
      if (value <= best) if self.mode == 'max' else (value >= best):
        return False
    self.keep.steps.clear()
    self.keep.steps.add(int(step))
    self.record = {'step': int(step), 'key': self.key, 'mode': self.mode, 'value': value}
    writers.write_text_atomic(paths.join(self.model_dir, BEST_FILE),
                              json.dumps(self.record, indent=2))
    return True


def resolve_step(model_dir: str, checkpoint: str | int | None) -> int | None:
  """`--checkpoint`: 'latest' or None -> None (the latest), 'best' -> the recorded best
  step, a number -> that step."""
  if checkpoint is None or checkpoint == 'latest':
    return None
  if checkpoint == 'best':
    record = read(model_dir)
    if record is None:
      raise errors.UserError(
          f'{model_dir} has no best checkpoint ({BEST_FILE}): train with '
          "--gin.loop.TrainConfig.keep_best='eval/<task>/<metric>' to record one")
    return int(record['step'])
  try:
    step = int(checkpoint)
  except ValueError:
    raise errors.UserError(f"--checkpoint must be 'best', 'latest' or a step, got "
                           f'{checkpoint!r}') from None
  if step < 0:
    raise errors.UserError(f'--checkpoint must be a step >= 0, got {step}')
  return step
