"""Mixtures of tasks and their mixing-rate functions (seqio's Mixture, no TensorFlow).

A `Mixture` samples tasks (or sub-mixtures) by rate and carries a separate loss weight per
task (the λ_i of L = Σ_i λ_i L_i). Mixtures nest. Rates and λ may follow schedules over the
training step, and task groups may have priorities (schedules.py). Rates: numbers, functions of
an item (`examples_proportional`) or `unimax` (unimax.py), which needs all items' sizes at once.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from t5x_lite import validation
from t5x_lite.rundir import names
from t5x_lite.data import registry, schedules
from t5x_lite.data.tasks import Task
from t5x_lite.data.unimax import UniMax


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
    raise validation.ConfigError(f'temperature must be > 0, got {temperature}')
  return functools.partial(_examples_proportional_rate, maximum=maximum,
                           temperature=temperature, scale=scale, split=split)


unimax = UniMax
"""`unimax(budget, max_epochs, sizes=None)`: UniMax rates (Chung et al. 2023, Algorithm 1), the
budget spread uniformly over the items, each capped at `max_epochs` passes over its data
(unimax.py). A dataclass, not a function of one item: the mixture evaluates it over all the
items that have it, e.g. `default_rate=unimax(budget=100_000, max_epochs=4)`."""

Rate = Union[float, Callable[[Union[Task, 'Mixture']], float], UniMax]
MixtureItem = Union[str, Task, 'Mixture', tuple]


class Mixture:
  """Tasks (or mixtures) sampled by rate. Items are names, objects or (item, rate) pairs;
  items without a rate get `default_rate` (a number or a function of the task).

  A sub-mixture's rate is shared among its tasks in proportion to their own normalised rates,
  as seqio's `Mixture.get_rate` (dataset_providers.py) does. seqio requires that rate to be a
  number (`_get_submixture_rate`); here a function rate is called with the sub-mixture itself,
  so `examples_proportional` rates it by its total example count (`num_examples`). A `unimax`
  rate is evaluated once over all the items that have it (its allocation per item), as
  UniMax's Algorithm 1 needs every sibling's size.

  `rate_schedule` (schedules.Stages / Interpolate over the names of this mixture's items)
  replaces the items' rates at every step: an item a stage leaves out gets rate 0 there.
  `loss_weight_schedule` (over task or item names) replaces λ where it names a task (an item
  name sets all its tasks); elsewhere `loss_weights` holds. `priority` (schedules.Priority)
  raises the λ of prioritised groups batch by batch.
  """

  def __init__(self, name: str, tasks: Sequence[MixtureItem], default_rate: Rate = 1.0,
               loss_weights: Mapping[str, float] | None = None, description: str = '',
               rate_schedule: schedules.Schedule | None = None,
               loss_weight_schedule: schedules.Schedule | None = None,
               priority: schedules.Priority | None = None):
    names.check('mixture', name)
    if not tasks:
      raise validation.ConfigError(f'mixture {name!r} has no tasks')
    self.name, self.items, self.default_rate = name, list(tasks), default_rate
    self._loss_weights = dict(loss_weights or {})
    self.description = description
    self.rate_schedule, self.loss_weight_schedule = rate_schedule, loss_weight_schedule
    self.priority = priority
    if rate_schedule is not None:
      schedules.check_schedule(rate_schedule, f'mixture {name!r} rate_schedule')
    if loss_weight_schedule is not None:
      schedules.check_schedule(loss_weight_schedule, f'mixture {name!r} loss_weight_schedule')
    if priority is not None and not isinstance(priority, schedules.Priority):
      raise validation.ConfigError(f'mixture {name!r}: priority must be a schedules.Priority, '
                                   f'got {priority!r}')

  def _resolved(self) -> list[tuple[Task | 'Mixture', Rate]]:
    out = []
    for item in self.items:
      obj, rate = item if isinstance(item, tuple) else (item, self.default_rate)
      out.append((registry.get(obj) if isinstance(obj, str) else obj, rate))
    return out

  def tasks_and_rates(self, step: int | None = None) -> list[tuple[Task, float]]:
    """Every leaf task once, with rates normalised to sum to 1 (a sub-mixture's rate is
    shared among its tasks in proportion to their own rates). With a rate schedule, the
    rates of `step` (required then)."""
    totals: dict[str, float] = collections.OrderedDict()
    by_name: dict[str, Task] = {}
    items = self._resolved()
    if self.rate_schedule is not None:
      if step is None:
        raise ValueError(f'mixture {self.name!r} has a rate schedule: pass the step')  # internal
      scheduled = self.rate_schedule.at(step)
      items = [(obj, scheduled.get(obj.name, 0.0)) for obj, _ in items]
    for (obj, _), r in zip(items, _item_rates(items)):
      if isinstance(obj, Mixture):
        for task, sub in obj.tasks_and_rates():
          totals[task.name] = totals.get(task.name, 0.0) + r * sub
          by_name[task.name] = task
      else:
        totals[obj.name] = totals.get(obj.name, 0.0) + r
        by_name[obj.name] = obj
    total = sum(totals.values())
    if total <= 0 or any(r < 0 for r in totals.values()):
      at = f' at step {step}' if self.rate_schedule is not None else ''
      raise validation.ConfigError(f'mixture {self.name!r}: rates must be >= 0 with a positive '
                                   f'sum{at}, got {dict(totals)}')
    return [(by_name[n], r / total) for n, r in totals.items()]

  def rates_at(self, step: int) -> np.ndarray:
    """Normalised sampling rate of each task (the order of `tasks`) at training step `step`
    (the 0-based index of the batch)."""
    return np.array([r for _, r in self.tasks_and_rates(step)], np.float64)

  @property
  def scheduled(self) -> bool:
    """Whether the rates change over training (the pipeline then mixes by step)."""
    return self.rate_schedule is not None

  def check_schedules(self) -> None:
    """Every scheduled name is one this mixture knows, and every step has a positive rate:
    clear errors before a run starts rather than at the step that needs them."""
    items = [obj.name for obj, _ in self._resolved()]
    tasks = [t.name for t in self.tasks]
    for schedule, known, what in ((self.rate_schedule, items, 'items'),
                                  (self.loss_weight_schedule, items + tasks, 'tasks or items')):
      if schedule is None:
        continue
      unknown = sorted(schedule.names() - set(known))
      if unknown:
        raise validation.ConfigError(
            f'mixture {self.name!r}: the schedule names {unknown}, which are not its {what} '
            f'({sorted(set(known))}).')
    if self.rate_schedule is not None:
      for step in self.rate_schedule.key_steps():
        if not any(v > 0 for v in self.rate_schedule.at(step).values()):
          raise validation.ConfigError(
              f'mixture {self.name!r}: every rate is 0 from step {step}: a stage needs a task '
              'to sample.')
    if self.priority is not None:
      self.priority_groups()

  def sampled_tasks(self) -> list[bool]:
    """Per task (the order of `tasks`): whether it is sampled at some step."""
    if self.rate_schedule is None:
      return [r > 0 for _, r in self.tasks_and_rates()]
    return list(np.max([self.rates_at(s) for s in self.rate_schedule.key_steps()], 0) > 0)

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

  def loss_weights_at(self, step: int) -> np.ndarray:
    """λ per task at training step `step`: the schedule's value where it names the task (or
    an item holding it), else the static `loss_weights`. Before priorities, which depend on
    the batch (losses.prioritized_loss_weights)."""
    weights = self.loss_weights()
    if self.loss_weight_schedule is None:
      return weights
    values = self.loss_weight_schedule.at(step)
    index = {t.name: i for i, t in enumerate(self.tasks)}
    for obj, _ in self._resolved():
      if obj.name in values:
        for task in (obj.tasks if isinstance(obj, Mixture) else [obj]):
          weights[index[task.name]] = values[obj.name]
    for name, i in index.items():
      if name in values:
        weights[i] = values[name]
    return weights

  def priority_groups(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(group of each task, -1 for none: [num_tasks] int32; floors [num_groups] float32,
    highest priority first), or None without priorities."""
    if self.priority is None:
      return None
    by_item = {obj.name: [t.name for t in (obj.tasks if isinstance(obj, Mixture) else [obj])]
               for obj, _ in self._resolved()}
    names = [t.name for t in self.tasks]
    group = np.full(len(names), -1, np.int32)
    for g, (members, _) in enumerate(self.priority.groups):
      for member in members:
        if member not in by_item and member not in names:
          raise validation.ConfigError(
              f'mixture {self.name!r}: priority names {member!r}, which is neither a task nor '
              f'an item of the mixture (tasks: {names}).')
        for task in by_item.get(member, [member]):
          if group[names.index(task)] not in (-1, g):
            raise validation.ConfigError(f'mixture {self.name!r}: task {task!r} is in two '
                                         'priority groups; give each task one group.')
          group[names.index(task)] = g
    return group, np.array([f for _, f in self.priority.groups], np.float32)

  def __repr__(self):
    return f'Mixture({self.name!r}, {[t.name for t in self.tasks]})'

  def _key(self) -> tuple:
    return (self.name, self.items, self.default_rate, self._loss_weights, self.description,
            self.rate_schedule, self.loss_weight_schedule, self.priority)

  def __eq__(self, other):
    """Equal settings (a mixture gin builds twice, e.g. from a run's config.gin, is equal)."""
    return isinstance(other, Mixture) and self._key() == other._key()

  def __hash__(self):
    return hash(self.name)


def _item_rates(items: Sequence[tuple[Task | Mixture, Rate]]) -> list[float]:
  """Each item's unnormalised rate: a number, a function of the item, or a UniMax evaluated
  over every item that has an equal one (its pool)."""
  rates: list[float] = []
  pools: list[tuple[UniMax, list[int]]] = []
  for i, (obj, rate) in enumerate(items):
    if isinstance(rate, UniMax):
      pool = next((p for p in pools if p[0] == rate), None)
      if pool is None:
        pools.append(pool := (rate, []))
      pool[1].append(i)
      rates.append(0.0)
    else:
      rates.append(float(rate(obj) if callable(rate) else rate))
  for rate, members in pools:
    for i, r in zip(members, rate.rates([items[i][0] for i in members])):
      rates[i] = r
  return rates


def get_mixture(name_or_obj: str | Task | Mixture) -> Mixture:
  """A mixture by name; a task becomes a mixture of itself."""
  obj = registry.get(name_or_obj) if isinstance(name_or_obj, str) else name_or_obj
  return obj if isinstance(obj, Mixture) else Mixture(obj.name, [obj])
