"""Mixtures of tasks and their mixing-rate functions (seqio's Mixture, no TensorFlow).

A `Mixture` samples tasks (or sub-mixtures) by rate and carries a separate loss weight per
task (the λ_i of L = Σ_i λ_i L_i). Mixtures nest.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from t5x_lite.data import registry
from t5x_lite.data.tasks import Task


# --- mixing rates ---------------------------------------------------------------------------

def _examples_proportional_rate(task: Task | Mixture, maximum: int | None, temperature: float,
                                scale: float, split: str) -> float:
  n = scale * task.num_examples(split)   # a sub-mixture: the total of its tasks
  if maximum is not None:
    n = min(n, maximum)
  return float(n) ** (1.0 / temperature)


def examples_proportional(maximum: int | None = None, temperature: float = 1.0,
                          scale: float = 1.0, split: str = 'train'
                          ) -> Callable[[Task | Mixture], float]:
  """FLAN/seqio rate (seqio/utils.py `mixing_rate_num_examples` with its
  `num_input_examples` fallback): (min(scale * num_examples, maximum)) ** (1 / temperature).
  On a sub-mixture, num_examples is seqio's `Mixture.num_input_examples`: the sum over its
  leaf tasks. A partial of a module-level function, so mixtures stay picklable."""
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  return functools.partial(_examples_proportional_rate, maximum=maximum,
                           temperature=temperature, scale=scale, split=split)


Rate = Union[float, Callable[[Union[Task, 'Mixture']], float]]
MixtureItem = Union[str, Task, 'Mixture', tuple]


class Mixture:
  """Tasks (or mixtures) sampled by rate. Items are names, objects or (item, rate) pairs;
  items without a rate get `default_rate` (a number or a function of the task).

  A sub-mixture's rate is shared among its tasks in proportion to their own normalised rates,
  as seqio's `Mixture.get_rate` (dataset_providers.py) does. seqio requires that rate to be a
  number (`_get_submixture_rate`); here a function rate is called with the sub-mixture itself,
  so `examples_proportional` rates it by its total example count (`num_examples`).
  """

  def __init__(self, name: str, tasks: Sequence[MixtureItem], default_rate: Rate = 1.0,
               loss_weights: Mapping[str, float] | None = None, description: str = ''):
    if not tasks:
      raise ValueError(f'mixture {name!r} has no tasks')
    self.name, self.items, self.default_rate = name, list(tasks), default_rate
    self._loss_weights = dict(loss_weights or {})
    self.description = description

  def _resolved(self) -> list[tuple[Task | 'Mixture', Rate]]:
    out = []
    for item in self.items:
      obj, rate = item if isinstance(item, tuple) else (item, self.default_rate)
      out.append((registry.get(obj) if isinstance(obj, str) else obj, rate))
    return out

  def tasks_and_rates(self) -> list[tuple[Task, float]]:
    """Every leaf task once, with rates normalised to sum to 1 (a sub-mixture's rate is
    shared among its tasks in proportion to their own rates)."""
    totals: dict[str, float] = collections.OrderedDict()
    by_name: dict[str, Task] = {}
    for obj, rate in self._resolved():
      if isinstance(obj, Mixture):
        r = float(rate(obj) if callable(rate) else rate)
        for task, sub in obj.tasks_and_rates():
          totals[task.name] = totals.get(task.name, 0.0) + r * sub
          by_name[task.name] = task
      else:
        r = float(rate(obj) if callable(rate) else rate)
        totals[obj.name] = totals.get(obj.name, 0.0) + r
        by_name[obj.name] = obj
    total = sum(totals.values())
    if total <= 0 or any(r < 0 for r in totals.values()):
      raise ValueError(f'mixture {self.name!r}: rates must be >= 0 with a positive sum, got '
                       f'{dict(totals)}')
    return [(by_name[n], r / total) for n, r in totals.items()]

  @property
  def tasks(self) -> list[Task]:
    """Every leaf task once, in order of first appearance (the order of tasks_and_rates)."""
    leaves: dict[str, Task] = {}
    for obj, _ in self._resolved():
      for task in obj.tasks if isinstance(obj, Mixture) else [obj]:
        leaves.setdefault(task.name, task)
    return list(leaves.values())

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(sorted({s for t in self.tasks for s in t.splits}))

  def num_examples(self, split: str) -> int:
    """seqio's `Mixture.num_input_examples`: the sum over the leaf tasks that have `split`."""
    return sum(t.num_examples(split) for t in self.tasks if split in t.splits)

  def loss_weight(self, task_name: str) -> float:
    """λ of a task: this mixture's setting, else a sub-mixture's, else 1."""
    if task_name in self._loss_weights:
      return float(self._loss_weights[task_name])
    for obj, _ in self._resolved():
      if isinstance(obj, Mixture) and task_name in {t.name for t in obj.tasks}:
        return obj.loss_weight(task_name)
    return 1.0

  def loss_weights(self) -> np.ndarray:
    """λ per task, in the order of `tasks` (the index used in `decoder_task_ids`)."""
    return np.array([self.loss_weight(t.name) for t in self.tasks], np.float32)

  def __repr__(self):
    return f'Mixture({self.name!r}, {[t.name for t in self.tasks]})'


def get_mixture(name_or_obj: str | Task | Mixture) -> Mixture:
  """A mixture by name; a task becomes a mixture of itself."""
  obj = registry.get(name_or_obj) if isinstance(name_or_obj, str) else name_or_obj
  return obj if isinstance(obj, Mixture) else Mixture(obj.name, [obj])
