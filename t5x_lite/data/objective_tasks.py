"""An `Objective` makes a task's (inputs, targets) token ids from raw text: T5's span
corruption or prefix LM (objectives.py), with seqio's chunk arithmetic.

A task with `objective=` (tasks.Task) has no templates and no metric, and is never
decode-evaluated (eval sets leave it out). Every example is a pure function of (seed, data
shard, task, stream position), so runs repeat and resume stays bitwise. Two ways to chunk:

- Merged (`merge_examples_to_reduce_padding=True`, span corruption's default, as T5's
  `span_corruption`): T5's select_random_chunk (65536 tokens) per document, then
  reduce_concat_tokens (the tokens of `concat_documents` = 128 consecutive documents of the
  task's stream, no separator) and split_tokens into chunks of `chunk_length`, each chunk an
  example (merged_objective.py builds that stream). Short texts share chunks, every chunk but
  a window's last is full, so the noise and span counts are those of full chunks; mixing
  rates count chunks, as seqio mixes preprocessed examples.
- Per document (`False`, prefix LM's default, as T5's `prefix_lm`): `Objective.make` on one
  text per visit of a document (pipeline.py's map-style stream). A text longer than a chunk
  gives ONE chunk per visit, chosen with the example's rng: over epochs every chunk is seen,
  but one epoch sees each document once, not each chunk. A short text is masked alone (a
  5-token text: 1 noise token in 1 span), with shorter inputs (packing fills the row).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from t5x_lite import validation
from t5x_lite.data import objectives
from t5x_lite.data.sources import DataError
from t5x_lite.data.vocab import Vocabulary, prompt_ids

KINDS = ('span_corruption', 'prefix_lm', 'causal_lm')
SENTINELS = ('t5', 'extra_id')
_DEFAULT_DENSITY = {'span_corruption': 0.15, 'prefix_lm': 0.5, 'causal_lm': 0.0}  # T5's
_DEFAULT_MERGE = {'span_corruption': True, 'prefix_lm': False, 'causal_lm': False}
DOCUMENT_MAX_TOKENS = 65536   # T5's select_random_chunk(max_length=65536) before merging


@dataclasses.dataclass(frozen=True)
class Objective:
  """How a task turns raw text into (inputs, targets).

  kind: 'span_corruption' (T5's pre-training objective: t5/data/preprocessors.py
    `span_corruption`), 'prefix_lm' (`prefix_lm`: inputs a random prefix, targets the rest)
    or 'causal_lm' (no inputs, targets = a chunk of the text + EOS, chunks of the targets
    length: for decoder-only models, feature_converters.DecoderOnlyFeatureConverter; not
    merged, and with no noise density).
  noise_density: the fraction of noise tokens; None: T5's default of the kind (0.15 span
    corruption, 0.5 prefix LM: a split point uniform over the chunk).
  mean_noise_span_length: span corruption's mean span (T5 3.0; ByT5 20).
  text_field: the example field holding the raw text.
  sentinels: 't5' (T5's rule, objectives.t5_sentinel_fn: `<extra_id_i>` of a SentencePiece
    vocab; the top byte ids 258 - i of the byte vocab, as ByT5 pre-trained) or 'extra_id'
    (`vocab.extra_id(i)`: Hugging Face ByT5's 259 + i).
  max_text_tokens: a bound on any text's length in tokens, where known (the built-in texts'):
    the targets-length check then needs only what the longest chunk can hold.
  merge_examples_to_reduce_padding: T5's name: True concatenates `concat_documents`
    documents and splits them into chunks (the module docstring); False masks each document
    alone; None: T5's default of the kind (True for span corruption, False for prefix LM).
  concat_documents: documents a merged window concatenates (reduce_concat_tokens' batch_size,
    T5's 128).
  """
  kind: str = 'span_corruption'
  noise_density: float | None = None
  mean_noise_span_length: float = 3.0
  text_field: str = 'text'
  sentinels: str = 't5'
  max_text_tokens: int | None = None
  merge_examples_to_reduce_padding: bool | None = None
  concat_documents: int = 128

  def __post_init__(self):
    if self.kind not in KINDS:
      raise validation.ConfigError(f'objective kind must be one of {KINDS}, got {self.kind!r}')
    if self.sentinels not in SENTINELS:
      raise validation.ConfigError(f'objective sentinels must be one of {SENTINELS}, got '
                                   f'{self.sentinels!r}')
    if self.noise_density is None:
      object.__setattr__(self, 'noise_density', _DEFAULT_DENSITY[self.kind])
    ok, span = ((0.0 <= self.noise_density <= 0.5, '[0, 0.5]') if self.kind == 'prefix_lm'
                else (self.noise_density == 0.0, '{0}') if self.kind == 'causal_lm'
                else (0.0 < self.noise_density < 1.0, '(0, 1)'))
    if not ok:
      raise validation.ConfigError(f'{self.kind}: noise_density must be in {span} (as T5), '
                                   f'got {self.noise_density}')
    if self.mean_noise_span_length <= 0:
      raise validation.ConfigError('mean_noise_span_length must be > 0, got '
                                   f'{self.mean_noise_span_length}')
    if self.max_text_tokens is not None and self.max_text_tokens < 1:
      raise validation.ConfigError(f'max_text_tokens must be >= 1, got {self.max_text_tokens}')
    if self.merge_examples_to_reduce_padding is None:
      object.__setattr__(self, 'merge_examples_to_reduce_padding', _DEFAULT_MERGE[self.kind])
    if self.kind == 'causal_lm' and self.merge_examples_to_reduce_padding:
      raise validation.ConfigError('causal_lm masks each document alone: '
                                   'merge_examples_to_reduce_padding must be False or None')
    if not isinstance(self.merge_examples_to_reduce_padding, (bool, np.bool_)):
      raise validation.ConfigError('merge_examples_to_reduce_padding must be True, False or '
                                   f'None, got {self.merge_examples_to_reduce_padding!r}')
    if (isinstance(self.concat_documents, bool) or
        not isinstance(self.concat_documents, (int, np.integer)) or self.concat_documents < 1):
      raise validation.ConfigError('concat_documents must be an int >= 1 (T5: 128), got '
                                   f'{self.concat_documents!r}')

  @property
  def merges(self) -> bool:
    """Whether documents are merged into full chunks (merged_objective.py)."""
    return bool(self.merge_examples_to_reduce_padding)

  def describe(self) -> str:
    extra = (f', mean span {self.mean_noise_span_length:g}'
             if self.kind == 'span_corruption' else '')
    chunks = (f'{self.concat_documents} documents merged into chunks' if self.merges else
              'each document alone')
    return (f'{self.kind} (noise density {self.noise_density:g}{extra}; {chunks}) on field '
            f'{self.text_field!r}')

  # --- lengths ---------------------------------------------------------------------------
  def chunk_length(self, inputs_room: int) -> int:
    """Raw tokens per chunk for `inputs_room` input positions (EOS included): span
    corruption: seqio's `random_spans_helper` (512 -> 568), so the corrupted inputs fill
    the room; prefix LM: T5's `split_tokens_to_inputs_length` (room - 1)."""
    if self.kind in ('prefix_lm', 'causal_lm'):
      return max(1, inputs_room - 1)
    return objectives.random_spans_helper(inputs_room, self.noise_density,
                                          self.mean_noise_span_length)[0]

  def longest_chunk(self, inputs_room: int) -> int:
    """The most raw tokens one example's chunk can hold: a whole chunk, or with
    `max_text_tokens` the most the texts give (one text, or `concat_documents` merged)."""
    chunk = self.chunk_length(inputs_room)
    if self.max_text_tokens is None:
      return chunk
    return min(chunk, self.max_text_tokens * (self.concat_documents if self.merges else 1))

  def targets_needed(self, inputs_room: int) -> int:
    """The targets length (EOS included) the longest chunk can produce. Span corruption:
    the helper's (114 for 512: T5 sets TASK_FEATURE_LENGTHS' targets from it), or where the
    texts cannot fill a chunk (`longest_chunk`), the most they give (the mask's own
    arithmetic); prefix LM: the whole chunk but its first token, plus EOS."""
    chunk, longest = self.chunk_length(inputs_room), self.longest_chunk(inputs_room)
    if self.kind in ('prefix_lm', 'causal_lm'):
      return longest + (self.kind == 'causal_lm')
    if longest >= chunk:
      return objectives.random_spans_helper(inputs_room, self.noise_density,
                                            self.mean_noise_span_length)[1]
    return max(_mask_targets_length(n, self.noise_density, self.mean_noise_span_length)
               for n in range(1, longest + 1))

  def check_lengths(self, task_name: str, feature_lengths: Mapping[str, int],
                    prompt_length: int = 0) -> None:
    """Span corruption: a targets length below what a chunk produces is a ConfigError at
    pipeline start (it would cut every long example's targets). Prefix LM's continuation
    may be longer than the targets length: cut and counted, as any task's targets."""
    if self.kind != 'span_corruption':
      return
    room = feature_lengths['inputs'] - prompt_length
    if room < 2:
      raise validation.ConfigError(f'task {task_name}: span corruption needs at least 2 '
                                   f'input positions, the inputs length leaves {room}.')
    need = self.targets_needed(room)
    if feature_lengths['targets'] < need:
      shorter = self.max_text_tokens is not None and self.max_text_tokens < self.chunk_length(room)
      merged = (f', {self.concat_documents} texts merged: merge_examples_to_reduce_padding='
                'False masks each text alone' if self.merges and shorter else '')
      where = (f'{room} input positions (inputs length {feature_lengths["inputs"]} less the '
               f'{prompt_length}-token prompt)' if prompt_length else
               f'inputs length {feature_lengths["inputs"]}')
      raise validation.ConfigError(
          f'task {task_name}: span corruption at {where} (chunks of '
          f'{self.chunk_length(room)} tokens{merged}) makes targets of up to {need} tokens, '
          f'but the targets length is {feature_lengths["targets"]}. Set TASK_FEATURE_LENGTHS '
          f'targets to {need} (T5 uses 114 for inputs 512), or shorten the inputs length.')

  # --- examples --------------------------------------------------------------------------
  def sentinel_spec(self, vocab: Vocabulary):
    return objectives.t5_sentinel_fn(vocab) if self.sentinels == 't5' else vocab.extra_id

  def encode(self, text: str, vocab: Vocabulary, where: str = 'objective') -> np.ndarray:
    """The text's token ids (no EOS), int32."""
    if not isinstance(text, str):
      raise DataError(f'{where}: field {self.text_field!r} must be text, got '
                      f'{type(text).__name__}')
    return np.asarray(vocab.encode(text), np.int32)

  def make(self, text: str, vocab: Vocabulary, feature_lengths: Mapping[str, int],
           rng: np.random.Generator, prompt_length: int = 0, overflow: str = 'truncate',
           where: str = 'objective') -> dict:
    """One per-document example from `text` (one of its chunks, chosen with `rng`), as
    `make_chunk` makes it. An empty text gives inputs = targets = [EOS] (T5 drops it; a
    map-style pipeline keeps one example per visit)."""
    ids = self.encode(text, vocab, where)
    ids = objectives.select_random_chunk(
        ids, self.chunk_length(self.text_room(feature_lengths, prompt_length)), rng)
    return self.make_chunk(ids, vocab, feature_lengths, rng, prompt_length, overflow, where)

  def text_room(self, feature_lengths: Mapping[str, int], prompt_length: int = 0) -> int:
    """The positions a chunk's text fills: the inputs' (less the soft prompt), or for
    causal_lm the targets' (EOS included)."""
    if self.kind == 'causal_lm':
      return feature_lengths['targets']
    return feature_lengths['inputs'] - prompt_length

  def make_chunk(self, ids: np.ndarray, vocab: Vocabulary, feature_lengths: Mapping[str, int],
                 rng: np.random.Generator, prompt_length: int = 0, overflow: str = 'truncate',
                 where: str = 'objective') -> dict:
    """One training example from one chunk's ids (at most `chunk_length` of them): {'inputs',
    'targets'} int32 ids ending in EOS (the soft prompt's ids `vocab.prompt_ids(n)` first,
    taking n of the inputs positions) and the token counts cut to fit, {'inputs_truncated',
    'targets_truncated'}, as pipeline.tokenize counts them."""
    room, eos = feature_lengths['inputs'] - prompt_length, vocab.eos_id
    if self.kind == 'causal_lm':
      inputs, targets = objectives.causal_lm(ids, eos)
    elif not ids.size:
      inputs = targets = np.array([eos], np.int32)
    elif self.kind == 'span_corruption':
      inputs, targets = objectives.span_corruption(
          ids, self.sentinel_spec(vocab), rng, self.noise_density, self.mean_noise_span_length,
          eos)
    else:
      inputs, targets = objectives.prefix_lm(ids, rng, self.noise_density, eos)
    out = {}
    for feature, seq, length in (('inputs', inputs, room),
                                 ('targets', targets, feature_lengths['targets'])):
      cut = max(0, seq.size - length)
      if cut and overflow == 'error':
        raise DataError(f'{where} {feature}: {seq.size} tokens (with EOS) from {self.kind}, '
                        f'longer than the {length} positions. Raise TASK_FEATURE_LENGTHS or '
                        'use overflow="truncate".')
      if cut:
        seq = np.append(seq[:max(0, length - 1)], eos).astype(np.int32)
      out[feature], out[f'{feature}_truncated'] = seq, cut
    if prompt_length:
      out['inputs'] = np.concatenate([prompt_ids(prompt_length), out['inputs']])
    return out


def _mask_targets_length(length: int, noise_density: float, mean_span: float) -> int:
  """Targets (EOS included) of span corruption on `length` tokens, with
  objectives.random_spans_noise_mask's float32 arithmetic (noise + one sentinel a span)."""
  f32, n = np.float32, max(length, 2)
  noise = min(max(int(np.round(f32(n) * f32(noise_density))), 1), n - 1)
  spans = max(int(np.round(f32(noise) / f32(mean_span))), 1)
  return noise + spans + 1


def as_objective(objective: str | Objective | None, text_field: str = 'text'
                 ) -> Objective | None:
  """An Objective from its kind's name (gin-friendly) or itself."""
  if objective is None or isinstance(objective, Objective):
    return objective
  if isinstance(objective, str):
    return Objective(objective, text_field=text_field)
  raise validation.ConfigError(f'objective must be one of {KINDS} or an Objective, got '
                               f'{objective!r}')
