"""Evaluation inputs: every example exactly once, unpacked and unshuffled, in batches that
are the same (count, shapes, order) on every process; optionally length-bucketed, with the
answer options of rank classification tokenized beside them. Rows carry their example index
(-1 on padding) so outputs are put back in example order (evaluation.Evaluator).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from t5x_lite.data import tasks as tasks_lib
from t5x_lite.data.feature_converters import EncDecFeatureConverter, FeatureConverter
from t5x_lite.data.pipeline import (InputFits, _process_info, _warn_truncation,
                                    check_prompt_length)
from t5x_lite.data.sources import DataError
from t5x_lite.data.vocab import Vocabulary


def eval_examples(task: tasks_lib.Task, split: str, heldout: bool = False,
                  fits: InputFits | None = None) -> list[dict]:
  """Every example of `split` rendered once, with the task's fixed evaluation randomness;
  with `fits`, few-shot prompts drop exemplars to fit as in training."""
  return [task.render(split, i, task.eval_rng(i), heldout=heldout, fits=fits)
          for i in range(task.num_examples(split))]


def bucket_lengths(length: int, minimum: int | None = None) -> tuple[int, ...]:
  """Padded input lengths of length-bucketed eval batches: powers of two from `minimum`
  below `length`, then `length` (512 -> 64, 128, 256, 512: four compiled shapes). The
  default minimum, 64 (or `length` when shorter), keeps short feature lengths at one or two
  shapes: there each shape's compile costs more than the padding it saves."""
  minimum = min(length, 64) if minimum is None else minimum
  out = []
  while minimum < length:
    out.append(minimum)
    minimum *= 2
  return tuple(out) + (length,)


def eval_batches(examples: Sequence[dict], vocab: Vocabulary, feature_lengths: Mapping[str, int],
                 batch_size: int, task_index: int = 0, task_name: str = 'eval',
                 process_index: int | None = None, process_count: int | None = None,
                 overflow: str = 'truncate', buckets: Sequence[int] | None = None,
                 prompt_length: int = 0,
                 feature_converter: FeatureConverter = EncDecFeatureConverter()
                 ) -> Iterator[tuple[dict, np.ndarray]]:
  """Unpacked, unshuffled batches covering every example exactly once.

  Yields (host-local features, example indices) where padding rows (to fill the last
  batch) have index -1 and all-zero features. Global batch g holds the examples at positions
  [g*batch_size, (g+1)*batch_size) of the order; process p gets its contiguous block of
  rows, and every process yields the same number of batches, of the same shapes.

  The order is the examples' own, every input padded to feature_lengths['inputs'] (T5X's
  fixed lengths); or, with `buckets` (ascending, the last = feature_lengths['inputs']: see
  `bucket_lengths`), the order of the tokenized input lengths (stable), each batch's inputs
  padded to the shortest bucket that holds its longest. Every process tokenizes all the
  inputs (each holds all the examples), so all agree on the order and the shapes.

  `prompt_length` n (prompt tuning): every input starts with `vocab.prompt_ids(n)`, as in
  training; the text gets the rest of the inputs length, and a bucket holds prompt + text.

  `feature_converter`: the model family's features, as in training (unpacked). With
  `DecoderOnlyFeatureConverter()` a row is `inputs + targets` (bucket + targets long), right
  padded: the prompt to decode from is T5X's DecoderOnlyModel.predict_batch rule,
  `decoder_input_tokens * decoder_causal_attention` (the start id, then the inputs; prefix_lm
  must be True for the mask), and the targets stay for scoring (rank classification).
  """
  if process_index is None or process_count is None:
    process_index, process_count = _process_info()
  if batch_size % process_count:
    raise DataError(f'eval batch size {batch_size} is not divisible by the {process_count} '
                    'processes.')
  if buckets and (list(buckets) != sorted(buckets) or buckets[-1] != feature_lengths['inputs']):
    raise ValueError(f'buckets {buckets} must ascend to the inputs length '  # internal
                     f'{feature_lengths["inputs"]}')
  check_prompt_length(prompt_length, feature_lengths['inputs'])
  local = batch_size // process_count
  cache: dict[tuple[int, str], tuple[np.ndarray, int]] = {}

  def tokenized(i: int, feature: str) -> tuple[np.ndarray, int]:
    if (i, feature) not in cache:
      tokens = feature_converter.tokenize_example(
          vocab, examples[i], feature_lengths, overflow, f'task {task_name} eval example {i}',
          prompt_length)
      for name in ('inputs', 'targets'):
        cut = tokens[f'{name}_truncated']
        if cut:
          _warn_truncation(task_name, name, cut, feature_lengths[name])
        cache[i, name] = tokens[name], cut
    return cache[i, feature]

  order = np.arange(len(examples))
  if buckets:
    sizes = np.array([len(tokenized(i, 'inputs')[0]) for i in order], np.int64)
    order = np.argsort(sizes, kind='stable')
  order = np.concatenate([order, np.full(-len(order) % batch_size, -1)]).astype(np.int64)
  empty = np.zeros(0, np.int32)
  for g in range(len(order) // batch_size):
    lengths = dict(feature_lengths)
    if buckets:
      members = order[g * batch_size:(g + 1) * batch_size]
      longest = sizes[members[members >= 0]].max()
      lengths['inputs'] = next(b for b in buckets if b >= longest)
    start = g * batch_size + process_index * local
    indices = order[start:start + local]
    rows = []
    for i in indices:
      row = {'inputs': empty, 'targets': empty, 'task_ids': empty,
             'inputs_truncated': np.int32(0), 'targets_truncated': np.int32(0)}
      if i >= 0:
        for feature in ('inputs', 'targets'):
          ids, cut = tokenized(i, feature)
          row[feature], row[f'{feature}_truncated'] = ids, np.int32(cut)
        row['task_ids'] = np.full(len(row['targets']), task_index + 1, np.int32)
      rows.append(feature_converter.example(row, vocab))
    finish = feature_converter.finish_row(lengths, packed=False)
    rows = [finish(r) for r in rows]
    batch = feature_converter.to_contract(vocab)(
        {k: np.stack([r[k] for r in rows]) for k in rows[0]})
    yield {k: batch[k] for k in feature_converter.features}, indices


def option_targets(examples: Sequence[dict], vocab: Vocabulary,
                   feature_lengths: Mapping[str, int], task_name: str = 'eval',
                   bucketed: bool = True,
                   feature_converter: FeatureConverter = EncDecFeatureConverter()
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Every example's answer options tokenized as targets (truncated with EOS as targets
  are; `feature_converter`'s tokenization: a chat template's completion ids), [examples,
  most options, length], and the mask of their tokens (the interface's
  `options_mask`: id 0 may be a real token): zeros pad the missing options and the length,
  the targets length, or `bucketed` the shortest of `bucket_lengths(targets, 4)` that holds
  the longest option (few shapes)."""
  rows = []
  for e in examples:
    rows.append([])
    for option in e['options']:
      tokens = feature_converter.tokenize_example(vocab, {**e, 'targets': option},
                                                  feature_lengths, 'truncate', '',
                                                  features=('targets',))
      ids, cut = tokens['targets'], tokens['targets_truncated']
      if cut:
        _warn_truncation(task_name, 'options', cut, feature_lengths['targets'])
      rows[-1].append(ids)
  longest = max((len(ids) for options in rows for ids in options), default=1)
  length = feature_lengths['targets'] if not bucketed else next(
      b for b in bucket_lengths(feature_lengths['targets'], 4) if b >= longest)
  out = np.zeros((len(rows), max(map(len, rows), default=0), length), np.int32)
  mask = np.zeros(out.shape, bool)
  for i, options in enumerate(rows):
    for k, ids in enumerate(options):
      out[i, k, :len(ids)], mask[i, k, :len(ids)] = ids, True
  return out, mask
