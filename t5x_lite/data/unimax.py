"""UniMax mixing rates: a budget spread uniformly over a mixture's items, repeats capped.

H. W. Chung, N. Constant, X. Garcia, A. Roberts, Y. Tay, S. Narang, O. Firat, "UniMax: Fairer
and More Effective Language Sampling for Large-Scale Multilingual Pretraining", ICLR 2023
(arXiv:2304.09151), Algorithm 1. The paper spreads a character budget over languages; here the
items are a mixture's tasks or sub-mixtures and the budget is in examples (their
`num_examples`) or in any unit the caller gives sizes in (tokens, characters).

Unlike `examples_proportional`, an item's UniMax rate depends on the sizes of all its siblings,
so a `UniMax` is not a function of one item: `Mixture` recognises it and evaluates it once over
every item that has it as its rate (`UniMax.rates`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Mapping, Sequence

import numpy as np

from t5x_lite import validation
from t5x_lite.data.tasks import Task


def allocate(sizes: Sequence[float], budget: float, max_epochs: float | None) -> np.ndarray:
  """Algorithm 1 of the UniMax paper: each item's share U_i of `budget` (in the unit of
  `sizes`), in the order of `sizes`.

  Items are visited from the smallest to the largest (ties in their given order); with B the
  budget not yet given out, the k-th (0-based) of L items is offered the uniform share
  B / (L - k) and takes at most `max_epochs * size` of it (its data seen at most `max_epochs`
  times); what it leaves stays in B for the larger items. `max_epochs` None or inf (the
  paper's N = infinity) caps nothing: budget / L each. The sampling distribution is U / sum(U)
  (the paper's `normalize(U)`): sum(U) = budget unless every item is capped
  (budget >= max_epochs * sum(sizes)), when U = max_epochs * sizes: examples-proportional.
  """
  sizes = np.asarray(sizes, np.float64)
  if sizes.ndim != 1 or not np.all(np.isfinite(sizes)) or np.any(sizes < 0):
    raise validation.ConfigError(f'UniMax sizes must be finite and >= 0, got {sizes.tolist()}')
  _check(budget, max_epochs)
  capped = max_epochs is not None and max_epochs < math.inf
  shares = np.zeros_like(sizes)
  remaining = float(budget)
  order = np.argsort(sizes, kind='stable')
  for k, i in enumerate(order):
    offer = remaining / (len(order) - k)
    shares[i] = min(offer, max_epochs * sizes[i]) if capped else offer
    remaining -= shares[i]
  return shares


def _positive(value, finite: bool = True) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and 0 < value and (not finite or value < math.inf))


def _check(budget: float, max_epochs: float | None) -> None:
  if not _positive(budget):
    raise validation.ConfigError(f'UniMax budget must be a number > 0, got {budget!r}')
  if max_epochs is not None and not _positive(max_epochs, finite=False):
    raise validation.ConfigError(
        f'UniMax max_epochs must be a number > 0 (None or inf: no cap), got {max_epochs!r}')


@dataclasses.dataclass(frozen=True)
class UniMax:
  """UniMax rates (Chung et al. 2023, Algorithm 1) for the items of a mixture that have it as
  their rate (`default_rate`, or an (item, rate) pair).

  budget: the examples (or tokens, in the unit of `sizes`) the training run will draw from
    these items.
  max_epochs: the paper's N, the most passes over an item's data (> 0); None or inf: no cap
    (uniform).
  sizes: {item name: size} in the budget's unit, e.g. tokens; a sub-mixture not named counts
    the sizes of its tasks. Every item must then be covered. None: each item's
    `num_examples(split)` (a sub-mixture's: the total of its tasks, as seqio's
    `num_input_examples`).

  An item's rate is its allocation U_i (the mixture normalises them to U_i / sum(U)). A plain
  number rate beside UniMax items in the same mixture therefore reads as an allocation in the
  budget's unit. Items with another, unequal UniMax form their own pool.
  """

  budget: float
  max_epochs: float | None
  sizes: Mapping[str, float] | None = None
  split: str = 'train'

  def __post_init__(self):
    _check(self.budget, self.max_epochs)
    if self.sizes is not None:
      sizes = dict(self.sizes)
      bad = {k: v for k, v in sizes.items() if not _positive(v)}
      if bad:
        raise validation.ConfigError(f'UniMax sizes must be numbers > 0, got {bad}')
      object.__setattr__(self, 'sizes', sizes)

  def __hash__(self):
    return hash((self.budget, self.max_epochs, self.split,
                 None if self.sizes is None else tuple(sorted(self.sizes.items()))))

  def size(self, item) -> float:
    """An item's size: `sizes[name]`, else the sum over its tasks; without `sizes`, its
    number of `split` examples."""
    if self.sizes is None:
      return float(item.num_examples(self.split))
    if item.name in self.sizes:
      return float(self.sizes[item.name])
    leaves = [item] if isinstance(item, Task) else item.tasks
    missing = [t.name for t in leaves if t.name not in self.sizes]
    if missing:
      raise validation.ConfigError(
          f'UniMax sizes name neither {item.name!r} nor its tasks {missing}: give every item '
          f'(or every task of a sub-mixture) a size; sizes has {sorted(self.sizes)}')
    return float(sum(self.sizes[t.name] for t in leaves))

  def rates(self, items: Sequence) -> list[float]:
    """The allocation U_i of each item (Task or Mixture), in the order given."""
    return [float(u) for u in allocate([self.size(i) for i in items], self.budget,
                                       self.max_epochs)]
