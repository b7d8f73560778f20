"""Values that change over training: a mixture's sampling rates and loss weights λ as
functions of the training step (curricula, staged fine-tuning), and task priorities.

A schedule maps a step (the 0-based index of the batch: the model's step before that batch's
update) to {name: value}. Names are those a mixture gives them meaning for (its items for
rates; tasks or items for λ); a name a stage leaves out has no value there (rate 0, or the
mixture's static λ). T5X and seqio have no schedules: rates and λ are fixed for a run; a
constant schedule is exactly that case.

In gin:
  schedules.Stages.stages = [(1000, {'builtin_denoise': 1, 'builtin': 3}), (None, {'builtin': 1})]
  schedules.Interpolate: start_step = 0, end_step = 2000, start = {...}, end = {...}
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from t5x_lite import validation


def _values(values: Mapping[str, float], where: str) -> dict[str, float]:
  if not isinstance(values, Mapping) or not values:
    raise validation.ConfigError(f'{where}: expected a non-empty {{name: value}} dict, got '
                                 f'{values!r}')
  out = {}
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise validation.ConfigError(f'{where}: the value of {name!r} must be a number >= 0, got '
                                   f'{value!r}')
    out[str(name)] = float(value)
  return out


@dataclasses.dataclass(frozen=True)
class Stages:
  """Piecewise constant: `stages` = [(until_step, {name: value}), ...]; stage k holds for the
  steps from the previous stage's until_step (0 for the first) up to, not including, its own.
  The last stage's until_step may be None: it then holds to the end of training (so does the
  last stage whatever its until_step)."""
  stages: Sequence[tuple[int | None, Mapping[str, float]]]

  def __post_init__(self):
    if not self.stages:
      raise validation.ConfigError('schedules.Stages needs at least one (until_step, values) '
                                   'stage.')
    parsed, previous = [], 0
    for k, stage in enumerate(self.stages):
      if not isinstance(stage, (tuple, list)) or len(stage) != 2:
        raise validation.ConfigError(f'schedules.Stages stage {k}: expected (until_step, '
                                     f'{{name: value}}), got {stage!r}')
      until, values = stage
      last = k == len(self.stages) - 1
      if until is None and not last:
        raise validation.ConfigError(f'schedules.Stages stage {k}: only the last stage may '
                                     'have until_step None.')
      if until is not None and (isinstance(until, bool) or not isinstance(until, int)
                                or until <= previous):
        raise validation.ConfigError(
            f'schedules.Stages stage {k}: until_step must be an int above the previous '
            f'stage\'s ({previous}), got {until!r}: stages go in step order.')
      parsed.append((until, _values(values, f'schedules.Stages stage {k}')))
      previous = until if until is not None else previous
    object.__setattr__(self, 'stages', tuple(parsed))

  def at(self, step: int) -> dict[str, float]:
    for until, values in self.stages:
      if until is None or step < until:
        return dict(values)
    return dict(self.stages[-1][1])

  def key_steps(self) -> list[int]:
    """Steps where some value starts: every value the schedule takes is taken at one."""
    return [0] + [until for until, _ in self.stages[:-1]]

  def names(self) -> set[str]:
    return {n for _, values in self.stages for n in values}


@dataclasses.dataclass(frozen=True)
class Interpolate:
  """Linear from `start` (at and before `start_step`) to `end` (at and after `end_step`):
  value(step) = start + (end - start) * (step - start_step) / (end_step - start_step). A name
  in only one of the two is 0 in the other."""
  start: Mapping[str, float]
  end: Mapping[str, float]
  start_step: int = 0
  end_step: int = 1

  def __post_init__(self):
    object.__setattr__(self, 'start', _values(self.start, 'schedules.Interpolate.start'))
    object.__setattr__(self, 'end', _values(self.end, 'schedules.Interpolate.end'))
    for key in ('start_step', 'end_step'):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise validation.ConfigError(f'schedules.Interpolate.{key} must be an int >= 0, got '
                                     f'{value!r}')
    if self.end_step <= self.start_step:
      raise validation.ConfigError(
          f'schedules.Interpolate: end_step ({self.end_step}) must be above start_step '
          f'({self.start_step}).')

  def at(self, step: int) -> dict[str, float]:
    t = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
    return {n: (1.0 - t) * self.start.get(n, 0.0) + t * self.end.get(n, 0.0)
            for n in sorted(self.names())}

  def key_steps(self) -> list[int]:
    return [self.start_step, self.end_step]

  def names(self) -> set[str]:
    return set(self.start) | set(self.end)


Schedule = Stages | Interpolate


def check_schedule(schedule, where: str) -> None:
  if not isinstance(schedule, (Stages, Interpolate)):
    raise validation.ConfigError(f'{where}: expected a schedules.Stages or '
                                 f'schedules.Interpolate, got {schedule!r}')


@dataclasses.dataclass(frozen=True)
class Priority:
  """Task groups in priority order (highest first), each with the smallest share of the
  batch's weighted tokens it must get: `groups` = [(names, floor), ...], names a task, an
  item of the mixture (a sub-mixture: all its tasks) or a list of them; 0 < floor < 1.

  The rule (applied to every batch, inside the train step, after the λ schedule): a group's
  weighted token mass is m_g = Σ over its tokens of (token weight · λ of the token's task),
  M the batch's total. Going from the LOWEST-priority group to the highest, a group with
  tokens whose share m_g / M is below its floor f has the λ of all its tasks multiplied by
  f (M - m_g) / ((1 - f) m_g), which makes its share exactly f. The top group's floor is
  therefore always met (when it has tokens in the batch); a lower group's is met unless a
  higher group's raise took its share. A group already at or above its floor, or absent from
  the batch, is left alone; λ is never lowered.
  """
  groups: Sequence[tuple[str | Sequence[str], float]]

  def __post_init__(self):
    parsed = []
    for k, group in enumerate(self.groups):
      if not isinstance(group, (tuple, list)) or len(group) != 2:
        raise validation.ConfigError(f'schedules.Priority group {k}: expected (names, floor), '
                                     f'got {group!r}')
      names, floor = group
      names = (names,) if isinstance(names, str) else tuple(names)
      if not names or not all(isinstance(n, str) for n in names):
        raise validation.ConfigError(f'schedules.Priority group {k}: names must be task or '
                                     f'mixture names, got {group[0]!r}')
      if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor < 1:
        raise validation.ConfigError(f'schedules.Priority group {k}: the floor must be in '
                                     f'(0, 1), got {floor!r}')
      parsed.append((names, float(floor)))
    if not parsed:
      raise validation.ConfigError('schedules.Priority needs at least one (names, floor) group.')
    object.__setattr__(self, 'groups', tuple(parsed))
