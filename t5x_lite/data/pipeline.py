"""The training and evaluation input pipelines (grain), producing DESIGN.md's batch contract.

Training, per data shard: each task's split indices -> this shard's slice -> seeded shuffle
-> repeat (reshuffled every epoch) -> render a template (a few-shot prompt that does not fit
drops exemplars) -> tokenize, truncate to length - 1 and append EOS (seqio's
append_eos_after_trim; counted) -> prepend the soft prompt's ids to the inputs (prompt tuning)
-> mix tasks by rate (exact proportions, then a seeded window shuffle; a mixture whose rates
follow a schedule instead draws each example's task at the rates of the step it is drawn for:
scheduled_mix.py) -> first-fit packing (or padding) -> decoder inputs shifted inside each
segment -> batch -> thread prefetch. An objective task (objective_tasks.py) makes its
examples from raw text instead of a template: per document, or T5's merged chunks of 128
documents (merged_objective.py: a stream without random access, mixed as grain
IterDatasets).

Data shards make the data independent of the topology: the global batch is the
concatenation of the `num_data_shards` shard batches in order, and process p builds shards
[p*S/P, (p+1)*S/P). One process with S shards and two with S/2 each produce the same global
batches. The iterator state (a small dict, kept per shard: iterator.py) restores the exact
next batches, in any number of processes that divides S.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Mapping

import grain
import numpy as np

from t5x_lite import validation
from t5x_lite.data import merged_objective, mixtures, scheduled_mix, tasks as tasks_lib
from t5x_lite.data.feature_converters import (  # pylint: disable=unused-import
    ENC_DEC_FEATURES, DecoderOnlyFeatureConverter, EncDecFeatureConverter, FeatureConverter,
    _FinishRow, _shift_within_segments, _to_contract, tokenize)
from t5x_lite.data.iterator import DataIterator
from t5x_lite.data.sources import DataError
from t5x_lite.data.vocab import Vocabulary, prompt_ids

FEATURES = ENC_DEC_FEATURES   # the default converter's; `config.feature_converter.features`
_warned: set[str] = set()
_warn_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How a mixture becomes batches. `feature_lengths` is T5X's TASK_FEATURE_LENGTHS.
  `prompt_length` n > 0 (prompt tuning): every example's inputs start with the ids -1..-n
  (`vocab.prompt_ids`), within the inputs length. `feature_converter` makes the model
  family's features (feature_converters.py, T5X's FEATURE_CONVERTER_CLS): encoder-decoder by
  default; `DecoderOnlyFeatureConverter()` makes one `inputs + targets` sequence per example,
  `inputs + targets` positions long."""
  feature_lengths: Mapping[str, int]
  batch_size: int                      # global batch size (all processes)
  split: str = 'train'
  seed: int = 0
  pack: bool = True
  packing_bins: int | None = None      # first-fit bins per shard; default 2 * shard batch
  overflow: str = 'truncate'           # 'truncate' (counted and reported) or 'error'
  num_data_shards: int | None = None   # default: jax.process_count()
  shuffle_window: int = 1000           # window shuffle of the mixed stream
  num_threads: int = 0                 # render + tokenize threads (GIL-bound: 0 was fastest
                                       # here; none in a mixture with merged objective tasks)
  prefetch: int = 2                    # batches prefetched by a thread
  prompt_length: int = 0               # soft prompt ids prepended to every example's inputs
  feature_converter: FeatureConverter = EncDecFeatureConverter()

  def __post_init__(self):
    if set(self.feature_lengths) != {'inputs', 'targets'}:
      raise validation.ConfigError(f"feature_lengths needs exactly 'inputs' and 'targets', "
                                   f'got {dict(self.feature_lengths)}')
    if self.overflow not in ('truncate', 'error'):
      raise validation.ConfigError(f"overflow must be 'truncate' or 'error', got "
                                   f'{self.overflow!r}')
    if self.batch_size <= 0:
      raise validation.ConfigError(f'batch_size must be positive, got {self.batch_size}')
    check_prompt_length(self.prompt_length, self.feature_lengths['inputs'])
    if not isinstance(self.feature_converter, FeatureConverter):
      raise validation.ConfigError('feature_converter must be a FeatureConverter '
                                   '(EncDecFeatureConverter(), DecoderOnlyFeatureConverter()), '
                                   f'got {self.feature_converter!r}')


def check_prompt_length(prompt_length: int, inputs_length: int) -> None:
  """The prompt must leave room for at least EOS within the inputs length."""
  if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or (
      prompt_length < 0):
    raise validation.ConfigError(f'prompt_length must be an int >= 0, got {prompt_length!r}.')
  if prompt_length >= inputs_length:
    raise validation.ConfigError(
        f'prompt_length {prompt_length} leaves no room for the text in the inputs length '
        f'{inputs_length} (the prompt is part of it, and the text needs at least its EOS): '
        f'raise the inputs length (TASK_FEATURE_LENGTHS["inputs"], infer\'s '
        f'--max_input_length) above {prompt_length} or shorten the prompt.')


def _process_info() -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index(), jax.process_count()


class InputFits:
  """Whether a text and its EOS fit `length` tokens beside a `prompt_length`-token soft
  prompt: Task.render's `fits`, so a few-shot prompt drops exemplars until it fits (eval can
  pass it to Task.render too); `tokens` counts a text's tokens, by which
  templates.fit_exemplars ranks the exemplars to drop."""

  def __init__(self, vocab: Vocabulary, length: int, prompt_length: int = 0):
    self.vocab, self.length, self.prompt_length = vocab, length, prompt_length

  def tokens(self, text: str) -> int:
    return len(self.vocab.encode(text))

  def __call__(self, text: str) -> bool:
    return self.tokens(text) + 1 + self.prompt_length <= self.length


def _warn_truncation(task: str, feature: str, n: int, length: int) -> None:
  key = f'{task}/{feature}'
  with _warn_lock:
    if key in _warned:
      return
    _warned.add(key)
  logging.warning('Task %s: %s truncated to %d tokens (%d cut from one example); further '
                  'truncations are counted in the pipeline stats.', task, feature, length, n)


class _RenderAndTokenize:
  """position in the shard's stream of this task, example index -> tokenized example.

  An objective task (Task.objective) skips rendering: its objective makes the ids from the
  example's text with the same per-position rng, so its examples resume bitwise too. Its
  lengths and text field are checked here, at pipeline start."""

  def __init__(self, task: tasks_lib.Task, task_index: int, vocab: Vocabulary,
               config: PipelineConfig, shard: int):
    self.task, self.task_index, self.vocab, self.config = task, task_index, vocab, config
    self.shard = shard
    self.fits = InputFits(vocab, config.feature_lengths['inputs'], config.prompt_length)
    if task.objective is not None:
      task.objective.check_lengths(task.name, config.feature_lengths, config.prompt_length)
      task.text(config.split, 0)   # a missing text field fails now, not mid-run

  def __call__(self, position: int, example_index: int) -> dict:
    cfg = self.config
    rng = np.random.default_rng([cfg.seed, self.shard, self.task_index, position])
    if self.task.objective is not None:
      return self._objective_example(int(example_index), rng)
    rendered = self.task.render(cfg.split, int(example_index), rng, fits=self.fits)
    out = {'exemplars_dropped': np.int32(rendered['exemplars_dropped'])}
    tokens = cfg.feature_converter.tokenize_example(
        self.vocab, rendered, cfg.feature_lengths, cfg.overflow,
        f'task {self.task.name} {cfg.split}[{example_index}]', cfg.prompt_length)
    for feature in ('inputs', 'targets'):
      cut = tokens[f'{feature}_truncated']
      if cut:
        _warn_truncation(self.task.name, feature, cut, cfg.feature_lengths[feature])
      out[feature], out[f'{feature}_truncated'] = tokens[feature], np.int32(cut)
    out['task_ids'] = np.full(len(out['targets']), self.task_index + 1, np.int32)
    return cfg.feature_converter.example(out, self.vocab)

  def _objective_example(self, example_index: int, rng: np.random.Generator) -> dict:
    cfg = self.config
    return self._objective_features(self.task.objective.make(
        self.task.text(cfg.split, example_index), self.vocab, cfg.feature_lengths, rng,
        cfg.prompt_length, cfg.overflow, f'task {self.task.name} {cfg.split}[{example_index}]'))

  def objective_chunk(self, ids: np.ndarray, rng: np.random.Generator, where: str) -> dict:
    """A merged objective task's example from one chunk's ids (merged_objective.py)."""
    cfg = self.config
    return self._objective_features(self.task.objective.make_chunk(
        ids, self.vocab, cfg.feature_lengths, rng, cfg.prompt_length, cfg.overflow, where))

  def _objective_features(self, made: dict) -> dict:
    out = {'exemplars_dropped': np.int32(0)}   # the keys and order of a rendered example
    for feature in ('inputs', 'targets'):
      cut = made[f'{feature}_truncated']
      if cut:
        _warn_truncation(self.task.name, feature, cut, self.config.feature_lengths[feature])
      out[feature], out[f'{feature}_truncated'] = made[feature], np.int32(cut)
    out['task_ids'] = np.full(len(out['targets']), self.task_index + 1, np.int32)
    return self.config.feature_converter.example(out, self.vocab)


def _shard_dataset(mixture: mixtures.Mixture, vocab: Vocabulary, config: PipelineConfig,
                   shard: int, num_shards: int, shard_batch: int) -> grain.IterDataset:
  per_task, rates, indices = [], [], []
  sampled = mixture.sampled_tasks()
  static = None if mixture.scheduled else [r for _, r in mixture.tasks_and_rates()]
  for task_index, task in enumerate(mixture.tasks):
    if not sampled[task_index]:
      continue
    n = task.num_examples(config.split)
    if n < num_shards:
      raise DataError(f'task {task.name} has {n} {config.split} examples, fewer than the '
                      f'{num_shards} data shards.')
    documents = (grain.MapDataset.range(n)[shard::num_shards]
                 .shuffle(seed=config.seed * 7919 + task_index * 104729 + shard))
    render = _RenderAndTokenize(task, task_index, vocab, config, shard)
    if task.objective is not None and task.objective.merges:   # T5's merged chunks
      per_task.append(merged_objective.MergedObjectiveIterDataset(
          documents.repeat(), len(documents), render))
    else:
      per_task.append(documents.repeat().map_with_index(render))
    indices.append(task_index)
    if static is not None:
      rates.append(static[task_index])
  clock = None
  if mixture.scheduled:   # rates of the step each example is drawn for (scheduled_mix.py)
    clock = scheduled_mix.StepClock()
    ds = scheduled_mix.ScheduledMixIterDataset(
        per_task, scheduled_mix.ScheduledRates(mixture, indices), config.seed, shard, clock)
  elif any(isinstance(d, grain.IterDataset) for d in per_task):   # merged objective tasks
    ds = merged_objective.mix_streams(per_task, rates, config.seed * 31 + shard,
                                      config.shuffle_window)
  else:
    mixed = grain.MapDataset.mix(per_task, weights=rates)
    if config.shuffle_window > 1:
      mixed = grain.experimental.WindowShuffleMapDataset(
          mixed, window_size=config.shuffle_window, seed=config.seed * 31 + shard)
    ds = mixed.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                                 prefetch_buffer_size=max(16, 4 * shard_batch)))
  lengths, converter = dict(config.feature_lengths), config.feature_converter
  if config.pack:
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=converter.length_struct(lengths),
        num_packing_bins=config.packing_bins or 2 * shard_batch, seed=config.seed + shard,
        shuffle_bins=True, meta_features=converter.meta_features())
  ds = (ds.map(converter.finish_row(lengths, config.pack))
        .batch(shard_batch, drop_remainder=True).map(converter.to_contract(vocab)))
  if clock is not None:
    ds = scheduled_mix.StepClockIterDataset(ds, clock)
  if config.prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch)
  return ds


def train_iterator(mixture: str | mixtures.Mixture | tasks_lib.Task, vocab: Vocabulary,
                   config: PipelineConfig, process_index: int | None = None,
                   process_count: int | None = None) -> DataIterator:
  """This process's share of the global training batches of `mixture`."""
  mixture = mixtures.get_mixture(mixture)
  if process_index is None or process_count is None:
    process_index, process_count = _process_info()
  num_shards = config.num_data_shards or process_count
  if num_shards % process_count:
    raise DataError(f'num_data_shards={num_shards} must be a multiple of the {process_count} '
                    'processes.')
  if config.batch_size % num_shards:
    raise DataError(f'batch size {config.batch_size} is not divisible by the {num_shards} data '
                    'shards; use a multiple of it.')
  for task in mixture.tasks:
    if config.split not in task.splits:
      raise DataError(f'task {task.name} has no {config.split!r} split (it has {task.splits}).')
  per_process = num_shards // process_count
  shard_ids = range(process_index * per_process, (process_index + 1) * per_process)
  shard_batch = config.batch_size // num_shards
  return DataIterator([_shard_dataset(mixture, vocab, config, s, num_shards, shard_batch)
                       for s in shard_ids], shard_ids, num_shards)
