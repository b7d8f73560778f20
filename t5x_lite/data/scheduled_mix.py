"""Task sampling that follows a rate schedule, exactly resumable (grain datasets).

grain's `MapDataset.mix` interleaves its parents in fixed proportions; a curriculum needs
the rates of the step being trained. Two grain stages do it:

- `ScheduledMixIterDataset` (in place of mix + window shuffle) draws each example's task at
  random from the rates of the step it is drawn for, then that task's next example. Draw i
  uses `default_rng([seed, shard, i])` and the per-task positions: a pure function of the
  draw index and the steps, so a restored iterator draws the same examples. A task whose
  stream has no random access (T5's merged objective chunks: merged_objective.py) is read
  through its own iterator, whose state the mixer's state keeps.
- `StepClockIterDataset` (after batching) counts the batches built and tells the clock, which
  records at which draw each step began. Draws for step s therefore are those made while
  batch s is being built.

Packing holds examples back: grain's first-fit packer pulls a round of examples at once and
emits its rows over the next batches, so a batch holds examples drawn for its own step or
for the one or two before it (2 x batch packing bins); unpacked, every example of batch s
is drawn for step s. On restore the packer re-reads the round it was emitting (from an
earlier draw index): the clock's record of where each step began (kept in the iterator
state) gives those draws their original steps, so resume stays bitwise.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Sequence

import grain
import numpy as np

from t5x_lite.data.sources import DataError

_KEPT_MARKS = 64   # steps of history kept: a packing round spans at most 3 batches


class ScheduledRates:
  """step -> the sampling rates of the sampled tasks (`indices` into mixture.tasks)."""

  def __init__(self, mixture, indices: Sequence[int]):
    self.mixture, self.indices = mixture, list(indices)

  def __call__(self, step: int) -> np.ndarray:
    return self.mixture.rates_at(step)[self.indices]


class StepClock:
  """Which step each draw is for: `marks` = [(first draw index, step), ...] ascending."""

  def __init__(self):
    self.draws = 0
    self.marks: list[tuple[int, int]] = [(0, 0)]

  def step_for(self, draw: int) -> int:
    if draw < self.marks[0][0]:
      raise RuntimeError(f'draw {draw} is older than the step history kept (from draw '  # internal
                         f'{self.marks[0][0]}): a packing round spanned > {_KEPT_MARKS} steps')
    return self.marks[bisect.bisect_right(self.marks, (draw, float('inf'))) - 1][1]

  def start_step(self, step: int) -> None:
    self.marks.append((self.draws, step))
    del self.marks[:-_KEPT_MARKS]


class _MixIterator(grain.DatasetIterator):

  def __init__(self, parents: Sequence[grain.MapDataset | grain.IterDataset],
               rates_fn: Callable[[int], np.ndarray], seed: int, shard: int, clock: StepClock):
    super().__init__()
    self._tasks, self._rates_fn, self._seed, self._shard = list(parents), rates_fn, seed, shard
    self._clock = clock
    self._positions = [0] * len(parents)
    self._streams = {i: iter(p) for i, p in enumerate(parents) if isinstance(p, grain.IterDataset)}
    self._cache: dict[int, np.ndarray] = {}

  def _cumulative(self, step: int) -> np.ndarray:
    if step not in self._cache:
      rates = np.asarray(self._rates_fn(step), np.float64)
      if len(self._cache) > 8:
        self._cache.clear()
      self._cache[step] = np.cumsum(rates) / rates.sum()
    return self._cache[step]

  def __next__(self) -> Any:
    draw = self._clock.draws
    cumulative = self._cumulative(self._clock.step_for(draw))
    u = np.random.default_rng([self._seed, self._shard, draw]).random()
    task = min(int(np.searchsorted(cumulative, u, side='right')), len(self._tasks) - 1)
    while cumulative[task] - (cumulative[task - 1] if task else 0.0) <= 0:   # u at an edge
      task -= 1
    stream = self._streams.get(task)
    element = next(stream) if stream is not None else self._tasks[task][self._positions[task]]
    self._positions[task] += 1
    self._clock.draws = draw + 1
    return element

  def get_state(self) -> dict[str, Any]:
    state = {'draws': self._clock.draws, 'positions': list(self._positions)}
    if self._streams:   # merged objective tasks: their iterators' states, by task
      state['streams'] = {str(i): it.get_state() for i, it in self._streams.items()}
    return state

  def set_state(self, state: dict[str, Any]) -> None:
    streams = state.get('streams', {}) if isinstance(state, dict) else {}
    if (not isinstance(state, dict) or len(state.get('positions', ())) != len(self._tasks)
        or set(streams) != {str(i) for i in self._streams}):
      raise DataError(
          f'the data iterator state is not a scheduled mixture\'s of {len(self._tasks)} sampled '
          'tasks: the mixture (its tasks or rate schedule) changed since the checkpoint. '
          'Resume with the checkpoint\'s mixture, or start a new model_dir that warm-starts '
          'from this one (INITIAL_CHECKPOINT_PATH).')
    self._clock.draws = int(state['draws'])
    self._positions = [int(p) for p in state['positions']]
    for i, it in self._streams.items():
      it.set_state(streams[str(i)])


class ScheduledMixIterDataset(grain.IterDataset):
  """Examples of `parents` (one endless MapDataset per task, or an endless IterDataset for a
  merged objective task), each task drawn with the probabilities `rates_fn(step)` of the
  step the clock says the draw is for."""

  def __init__(self, parents: Sequence[grain.MapDataset | grain.IterDataset],
               rates_fn: Callable[[int], np.ndarray], seed: int, shard: int, clock: StepClock):
    super().__init__()
    self._tasks, self._rates_fn, self._seed, self._shard = parents, rates_fn, seed, shard
    self._clock = clock

  def __iter__(self) -> grain.DatasetIterator:
    return _MixIterator(self._tasks, self._rates_fn, self._seed, self._shard, self._clock)


class _ClockIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, clock: StepClock):
    super().__init__(parent)
    self._clock, self._step = clock, 0

  def __next__(self) -> Any:
    batch = next(self._parent)
    self._step += 1
    self._clock.start_step(self._step)   # the next draws are for the next batch
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(), 'step': self._step,
            'marks': [list(m) for m in self._clock.marks]}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or 'marks' not in state:
      raise DataError(
          'the data iterator state was saved by a mixture without a rate schedule; this one has '
          'one. Resume with the checkpoint\'s mixture, or start a new model_dir that '
          'warm-starts from this one (INITIAL_CHECKPOINT_PATH).')
    self._clock.marks = [(int(d), int(s)) for d, s in state['marks']]
    self._step = int(state['step'])
    self._parent.set_state(state['parent'])   # the mixer restores the clock's draw count


class StepClockIterDataset(grain.IterDataset):
  """Batches unchanged; each one moves `clock` to the next step."""

  def __init__(self, parent: grain.IterDataset, clock: StepClock):
    super().__init__(parent)
    self._clock = clock

  def __iter__(self) -> grain.DatasetIterator:
    self._clock.__init__()   # a fresh iteration starts at step 0, draw 0
    return _ClockIterator(self._parent.__iter__(), self._clock)
