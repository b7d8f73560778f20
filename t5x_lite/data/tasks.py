"""Tasks, mixtures, their registry and mixing-rate functions (seqio's concepts, no TensorFlow).

A `Task` is a data source plus instruction templates, metrics and postprocessing; it
renders raw examples into (inputs, targets) text. A `Mixture` samples tasks by rate and
carries a separate loss weight per task (the λ_i of L = Σ_i λ_i L_i). Mixtures nest.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import zlib
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from t5x_lite import metrics
from t5x_lite.data import templates as tmpl
from t5x_lite.data.sources import DataSource


@dataclasses.dataclass(eq=False)
class Task:
  """One instruction task.

  options: the answer options of a classification task, a fixed list or the name of the
    example field holding them; used for the OPTIONS block and rank classification.
  template_mix: weights over templates.FORMATS; default zero-shot, with options if any.
  baseline: the trivial baseline: 'majority' (most frequent train target) or 'copy:FIELD'
    (predict the example's FIELD unchanged).
  metric_names: see t5x_lite.metrics; `exact_match` ignores case and punctuation, so tasks
    where those matter use `accuracy` (exact string equality).
  """
  name: str
  source: DataSource
  templates: Sequence[tmpl.Template]
  metric_names: Sequence[str] = ('exact_match',)
  heldout_templates: Sequence[tmpl.Template] = ()
  options: Sequence[str] | str | None = None
  template_mix: Mapping[str, float] | None = None
  num_fewshot: int = 2
  fewshot_split: str = 'train'
  postprocess_fn: Callable[[str], str] | None = None
  baseline: str = 'majority'
  description: str = ''

  def __post_init__(self):
    if not self.name or any(c.isspace() for c in self.name):
      raise ValueError(f'task name {self.name!r} must be non-empty without spaces')
    if not self.templates:
      raise ValueError(f'task {self.name!r} needs at least one template')
    self.templates = tuple(self.templates)
    self.heldout_templates = tuple(self.heldout_templates)
    self.metric_names = tuple(self.metric_names)
    metrics.check_metric_names(self.metric_names)
    if self.baseline != 'majority' and not self.baseline.startswith('copy:'):
      raise ValueError(f"task {self.name!r}: baseline must be 'majority' or 'copy:FIELD', "
                       f'got {self.baseline!r}')
    default = tmpl.ZS_OPT if self.options else tmpl.ZS_NOOPT
    self.formats = tmpl.normalize_mix(self.template_mix or {default: 1.0})
    if any(f.startswith('fs') for f in self.formats) and self.num_fewshot < 1:
      raise ValueError(f'task {self.name!r}: few-shot formats need num_fewshot >= 1')

  # --- raw data ----------------------------------------------------------------------
  @property
  def splits(self) -> tuple[str, ...]:
    return self.source.splits

  def num_examples(self, split: str) -> int:
    return self.source.num_examples(split)

  def example(self, split: str, index: int) -> dict:
    return self.source.split(split)[index]

  def example_options(self, example: Mapping) -> list[str] | None:
    if self.options is None:
      return None
    if isinstance(self.options, str):
      return list(example[self.options])
    return list(self.options)

  # --- rendering ---------------------------------------------------------------------
  def render(self, split: str, index: int, rng: np.random.Generator,
             heldout: bool = False, fmt: str | None = None) -> dict:
    """Draw a format and a template with `rng` and render example `index` of `split`.

    Few-shot exemplars come from `fewshot_split` and never include the example itself.
    Returns inputs/targets text, the example's options, the format and template index.
    """
    pool = self.heldout_templates if heldout else self.templates
    if not pool:
      raise ValueError(f'task {self.name!r} has no held-out templates')
    if fmt is None:
      names = list(self.formats)
      fmt = names[rng.choice(len(names), p=list(self.formats.values()))]
    t = int(rng.integers(len(pool)))
    example = self.example(split, index)
    options = self.example_options(example)
    exemplars = []
    if fmt in (tmpl.FS_OPT, tmpl.FS_NOOPT):
      n = self.num_examples(self.fewshot_split)
      candidates = rng.choice(n, size=min(n, self.num_fewshot + 1), replace=False)
      chosen = [int(i) for i in candidates if not (split == self.fewshot_split and i == index)]
      for i in chosen[:self.num_fewshot]:
        shot = self.example(self.fewshot_split, i)
        exemplars.append((shot, self.example_options(shot)))
    inputs, targets = tmpl.format_example(pool[t], example, fmt, options, exemplars)
    return {'inputs': inputs, 'targets': targets, 'options': options, 'format': fmt,
            'template': t}

  def eval_rng(self, index: int) -> np.random.Generator:
    """The fixed per-example randomness of evaluation (same prompt on every run)."""
    return np.random.default_rng([zlib.crc32(self.name.encode()), index])

  def postprocess(self, text: str) -> str:
    text = text.strip()
    return self.postprocess_fn(text) if self.postprocess_fn else text

  # --- trivial baseline ----------------------------------------------------------------
  def references(self, split: str) -> list[str]:
    return [self.postprocess(self.render(split, i, self.eval_rng(i))['targets'])
            for i in range(self.num_examples(split))]

  def majority_answer(self) -> str:
    """The most frequent reference of the train split (cached: it renders the whole split)."""
    if getattr(self, '_majority', None) is None:
      split = 'train' if 'train' in self.splits else self.splits[0]
      self._majority = collections.Counter(self.references(split)).most_common(1)[0][0]
    return self._majority

  def baseline_predictions(self, split: str) -> list[str]:
    if self.baseline == 'majority':
      return [self.majority_answer()] * self.num_examples(split)
    field = self.baseline.split(':', 1)[1]
    return [self.postprocess(str(self.example(split, i)[field]))
            for i in range(self.num_examples(split))]

  def baseline_score(self, split: str = 'validation') -> dict[str, float]:
    return metrics.compute(self.metric_names, self.references(split),
                           self.baseline_predictions(split))

  def __repr__(self):
    return f'Task({self.name!r}, {self.source})'


# --- mixing rates ---------------------------------------------------------------------------

def _examples_proportional_rate(task: Task, maximum: int | None, temperature: float,
                                scale: float, split: str) -> float:
  n = scale * task.num_examples(split)
  if maximum is not None:
    n = min(n, maximum)
  return float(n) ** (1.0 / temperature)


def examples_proportional(maximum: int | None = None, temperature: float = 1.0,
                          scale: float = 1.0, split: str = 'train') -> Callable[[Task], float]:
  """FLAN/seqio rate: (min(scale * num_examples, maximum)) ** (1 / temperature).
  A partial of a module-level function, so mixtures stay picklable."""
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  return functools.partial(_examples_proportional_rate, maximum=maximum,
                           temperature=temperature, scale=scale, split=split)


Rate = Union[float, Callable[[Task], float]]
MixtureItem = Union[str, Task, 'Mixture', tuple]


class Mixture:
  """Tasks (or mixtures) sampled by rate. Items are names, objects or (item, rate) pairs;
  items without a rate get `default_rate` (a number or a function of the task)."""

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
      out.append((get(obj) if isinstance(obj, str) else obj, rate))
    return out

  def tasks_and_rates(self) -> list[tuple[Task, float]]:
    """Every leaf task once, with rates normalised to sum to 1 (a sub-mixture's rate is
    shared among its tasks in proportion to their own rates)."""
    totals: dict[str, float] = collections.OrderedDict()
    by_name: dict[str, Task] = {}
    for obj, rate in self._resolved():
      if isinstance(obj, Mixture):
        r = float(rate(obj) if callable(rate) else rate)  # a function rates a mixture too
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
    return [t for t, _ in self.tasks_and_rates()]

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


# --- registry -------------------------------------------------------------------------------

_REGISTRY: dict[str, Task | Mixture] = {}


def register(obj: Task | Mixture, overwrite: bool = False) -> Task | Mixture:
  if obj.name in _REGISTRY and not overwrite and _REGISTRY[obj.name] is not obj:
    raise ValueError(f'{obj.name!r} is already registered; pass overwrite=True to replace it')
  _REGISTRY[obj.name] = obj
  return obj


def remove(name: str) -> None:
  _REGISTRY.pop(name, None)


def registered() -> dict[str, Task | Mixture]:
  _load_builtins()
  return dict(_REGISTRY)


def get(name: str) -> Task | Mixture:
  _load_builtins()
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f' Did you mean {close}?' if close else ''
    raise KeyError(f'unknown task or mixture {name!r}.{hint} Registered: '
                   f'{sorted(_REGISTRY)}')
  return _REGISTRY[name]


def get_mixture(name_or_obj: str | Task | Mixture) -> Mixture:
  """A mixture by name; a task becomes a mixture of itself."""
  obj = get(name_or_obj) if isinstance(name_or_obj, str) else name_or_obj
  return obj if isinstance(obj, Mixture) else Mixture(obj.name, [obj])


def _load_builtins() -> None:
  from t5x_lite.data import builtin_tasks  # noqa: F401  pylint: disable=import-outside-toplevel
