"""The training iterator's restorable state: host-local batches from this process's data
shards, the state kept per shard so that it restores in any process count dividing the
shard count (pipeline.py builds the shard datasets)."""

from __future__ import annotations

import weakref
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from t5x_lite.data.sources import DataError

_STATS = ('examples', 'inputs_truncated', 'targets_truncated', 'truncated_examples',
          'exemplars_dropped')


class DataIterator(Iterator[dict]):
  """Host-local batches (numpy, the batch contract) with exact, restorable state.

  The state is kept per data shard (a shard's stream depends only on the shard, the shard
  count and the config, never on the process that reads it), so a state saved by N
  processes restores in M processes that read the same `num_shards`: each takes its own
  shards' entries (`merge_states` joins the states of several processes). `stats`
  (examples, truncations, dropped exemplars) sums this process's shards.
  """

  def __init__(self, shard_datasets: Sequence[grain.IterDataset], shard_ids: Sequence[int],
               num_shards: int):
    self.shard_ids, self.num_shards = list(shard_ids), num_shards
    self._iters = [iter(ds) for ds in shard_datasets]
    self._stats = {s: {k: 0 for k in _STATS} for s in self.shard_ids}
    self.batches = 0
    # Stop prefetch threads before interpreter teardown (grain's __del__ is noisy then).
    self._finalizer = weakref.finalize(self, _close_all, self._iters)

  @property
  def stats(self) -> dict[str, int]:
    return {k: sum(st[k] for st in self._stats.values()) for k in _STATS}

  def close(self) -> None:
    self._finalizer()

  def __next__(self) -> dict:
    parts = [next(it) for it in self._iters]
    for shard, part in zip(self.shard_ids, parts):
      for k in _STATS:
        self._stats[shard][k] += int(part.pop(f'stats/{k}').sum())
    self.batches += 1
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    """{'num_shards', 'batches', 'shards': {shard id (str): {'iterator', 'stats'}}}."""
    return {'num_shards': self.num_shards, 'batches': self.batches,
            'shards': {str(s): {'iterator': it.get_state(), 'stats': dict(self._stats[s])}
                       for s, it in zip(self.shard_ids, self._iters)}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restore from a state holding (at least) this process's shards."""
    if state['num_shards'] != self.num_shards:
      raise DataError(
          f'the data iterator state has {state["num_shards"]} data shards, this run reads '
          f'{self.num_shards}: the streams differ. Resume with num_data_shards='
          f'{state["num_shards"]} (and a process count that divides it).')
    missing = [s for s in self.shard_ids if str(s) not in state['shards']]
    if missing:
      raise DataError(f'the data iterator state lacks shards {missing} of the '
                      f'{self.num_shards} (it has {sorted(state["shards"], key=int)}).')
    for shard, it in zip(self.shard_ids, self._iters):
      entry = state['shards'][str(shard)]
      try:
        it.set_state(entry['iterator'])
      except DataError:
        raise
      except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DataError(
            f'the data iterator state does not fit this pipeline ({type(e).__name__}: {e}): '
            'the mixture, its rate schedule or the packing changed since the checkpoint. '
            'Resume with the checkpoint\'s settings, or start a new model_dir that '
            'warm-starts from this one (INITIAL_CHECKPOINT_PATH).') from e
      self._stats[shard] = {k: int(entry['stats'].get(k, 0)) for k in _STATS}
    self.batches = int(state['batches'])


def merge_states(states: Sequence[Mapping[str, Any]]) -> dict:
  """One state from the states of several processes (same run, same step)."""
  if len({(s['num_shards'], s['batches']) for s in states}) != 1:
    raise DataError('data iterator states of different runs or steps cannot be merged: '
                    f'{[(s["num_shards"], s["batches"]) for s in states]} (num_shards, batches)')
  return {'num_shards': states[0]['num_shards'], 'batches': states[0]['batches'],
          'shards': {k: v for s in states for k, v in s['shards'].items()}}


def _close_all(iterators: list) -> None:
  for it in iterators:
    close = getattr(it, 'close', None)
    if close:
      close()
  iterators.clear()  # collect them now, while the modules their __del__ needs still exist
