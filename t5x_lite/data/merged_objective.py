"""T5's merged documents for objective tasks: a task's stream of full chunks (grain).

T5's `span_corruption` (google-research/text-to-text-transfer-transformer,
t5/data/preprocessors.py, with its default merge_examples_to_reduce_padding=True) runs
`select_random_chunk(max_length=65536)` on every document, then `reduce_concat_tokens(
batch_size=128)` (the tokens of 128 consecutive documents concatenated, no separator), then
`split_tokens(max_tokens_per_segment=random_spans_helper's tokens_length)` (consecutive
chunks, the window's last one shorter), then `denoise` on every chunk. Short texts share
chunks and every chunk but a window's last is full, so each example has the noise and span
counts of a full chunk.

Here, per task and data shard (`Objective.merges`; objective_tasks.py):

- the documents are the task's shuffled, repeated stream positions, as a per-document task's
  (pipeline.py: this shard's slice, seeded shuffle, reshuffled every epoch);
- window w concatenates the ids (no EOS) of the documents at stream positions
  [C*w, C*w + C) (C = `Objective.concat_documents`, T5's 128); a document over 65536 tokens
  gives one 65536-token chunk chosen with `default_rng([seed, shard, task index, position])`
  (the per-document example's seeding);
- the window is split into `Objective.chunk_length` pieces; piece j becomes an example with
  `Objective.make_chunk` and `default_rng([seed, shard, task index, w, j])`.

So example (w, j) is a pure function of the seed, the shard, the task's index in the
mixture and (w, j); the iterator's state is {'window': w, 'piece': j} (the next piece), and a
restored iterator recomputes window w (C documents) and goes on bitwise. Empty documents add
nothing (T5 filters them). The stream has no random access by position (a window gives a
variable number of chunks), so pipeline.py mixes a mixture holding such a task as grain
IterDatasets (`mix_streams`), and a scheduled mixture (scheduled_mix.py) keeps such a task's
iterator state instead of its position; mixing rates count chunks, as seqio mixes the
preprocessed examples.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from t5x_lite.data import objectives
from t5x_lite.data.objective_tasks import DOCUMENT_MAX_TOKENS
from t5x_lite.data.sources import DataError


class MergedObjectiveIterDataset(grain.IterDataset):
  """The examples of one merged objective task in one data shard.

  documents: MapDataset, stream position -> example index (shuffled, repeated: endless).
  epoch_length: this shard's documents per epoch (to stop on a task with no text at all).
  render: pipeline._RenderAndTokenize of the task (its config, shard, task index, and
    `objective_chunk`, which makes one example's features from a chunk's ids).
  """

  def __init__(self, documents: grain.MapDataset, epoch_length: int, render):
    super().__init__()
    self._documents, self._epoch_length, self._render = documents, epoch_length, render

  def __iter__(self) -> grain.DatasetIterator:
    return _MergedIterator(self._documents, self._epoch_length, self._render)

  def __str__(self) -> str:
    return f'MergedObjectiveIterDataset({self._render.task.name})'


class _MergedIterator(grain.DatasetIterator):

  def __init__(self, documents: grain.MapDataset, epoch_length: int, render):
    super().__init__()
    self._documents, self._render = documents, render
    cfg, objective = render.config, render.task.objective
    self._concat = objective.concat_documents
    self._chunk_length = objective.chunk_length(cfg.feature_lengths['inputs'] -
                                                cfg.prompt_length)
    self._empty_limit = -(-epoch_length // self._concat) + 1   # > one epoch of windows
    self._window, self._piece = 0, 0
    self._cached: tuple[int, list[np.ndarray]] | None = None

  def _seed(self, *key: int) -> np.random.Generator:
    render = self._render
    return np.random.default_rng([render.config.seed, render.shard, render.task_index, *key])

  def window_documents(self, window: int) -> list[int]:
    """The example indices whose texts window `window` concatenates, in order."""
    first = window * self._concat
    return [int(self._documents[p]) for p in range(first, first + self._concat)]

  def _document(self, position: int) -> np.ndarray:
    task, split = self._render.task, self._render.config.split
    index = int(self._documents[position])
    ids = task.objective.encode(task.text(split, index), self._render.vocab,
                                f'task {task.name} {split}[{index}]')
    if ids.size > DOCUMENT_MAX_TOKENS:   # select_random_chunk (max_length=65536)
      ids = objectives.select_random_chunk(ids, DOCUMENT_MAX_TOKENS, self._seed(position))
    return ids

  def window_pieces(self, window: int) -> list[np.ndarray]:
    """Window `window`'s chunks: its documents' ids concatenated, then split."""
    if self._cached is None or self._cached[0] != window:
      first = window * self._concat
      ids = [self._document(p) for p in range(first, first + self._concat)]
      self._cached = (window, objectives.split_tokens(np.concatenate(ids), self._chunk_length))
    return self._cached[1]

  def __next__(self) -> dict:
    empty = 0
    while self._piece >= len(pieces := self.window_pieces(self._window)):
      empty = 0 if pieces else empty + 1
      if empty > self._empty_limit:
        task = self._render.task
        raise DataError(f'task {task.name}: every {self._render.config.split} text in field '
                        f'{task.objective.text_field!r} of data shard {self._render.shard} is '
                        'empty: give the task some text, or leave it out of the mixture.')
      self._window, self._piece = self._window + 1, 0
    window, piece = self._window, self._piece
    self._piece += 1
    task = self._render.task
    return self._render.objective_chunk(
        pieces[piece], self._seed(window, piece),
        f'task {task.name} {self._render.config.split} window {window} chunk {piece}')

  def get_state(self) -> dict[str, Any]:
    return {'window': self._window, 'piece': self._piece}

  def set_state(self, state: dict[str, Any]) -> None:
    self._window, self._piece = int(state['window']), int(state['piece'])


def mix_streams(per_task: Sequence[grain.MapDataset | grain.IterDataset],
                rates: Sequence[float], seed: int, window: int) -> grain.IterDataset:
  """Mix tasks of which some are merged objective streams, as pipeline.py's map-style mix
  does: grain's IterDataset.mix draws tasks in the same exact proportions as MapDataset.mix
  (the same selection over the same integer proportions), counting a merged task's chunks;
  then WindowShuffleIterDataset with the same window and seed (it buffers a window, and on
  restore re-reads it from the state where the window began: bitwise). Map-style tasks are
  read in order without threads (a thread pool and prefetch buffer per task would not scale
  to FLAN-size mixtures; PipelineConfig.num_threads applies to map-style mixtures)."""
  sequential = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  streams = [ds if isinstance(ds, grain.IterDataset) else ds.to_iter_dataset(sequential)
             for ds in per_task]
  mixed = grain.IterDataset.mix(streams, weights=list(rates))
  if window > 1:
    mixed = grain.experimental.WindowShuffleIterDataset(mixed, window_size=window, seed=seed)
  return mixed
