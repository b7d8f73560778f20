"""Unsupervised objectives on token ids: T5's span corruption and prefix LM, and a plain
causal LM (decoder-only models), in numpy.

Follows google-research/text-to-text-transfer-transformer t5/data/preprocessors.py
(`span_corruption`, `denoise`, `random_spans_noise_mask`, `noise_span_to_unique_sentinel`,
`nonnoise_span_to_unique_sentinel`, `random_spans_helper`, `select_random_chunk`,
`split_tokens`, `prefix_lm`, `random_prefix_noise_mask`) with the same arithmetic (float32
and round-half-to-even where T5 uses `tf.round` on float32, Python floats where T5 uses
Python). T5 draws its layouts with stateless TF ops; we draw the same distributions from the
numpy Generator we are given, so the layouts are exact in law, not in bits. EOS is appended
(the vocabulary's `eos_id`; T5's 1 by default) to inputs and targets, as T5's tasks do with `seqio.preprocessors.append_eos_after_trim`
(trimming is the pipeline's).
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np

from t5x_lite.validation import ConfigError
from t5x_lite.data.vocab import EOS_ID, UNK_ID, ByteVocabulary, SentencePieceVocabulary, Vocabulary

SentinelSpec = Union[int, Callable[[int], int], Vocabulary]


def t5_sentinel_fn(vocab: Vocabulary) -> Callable[[int], int]:
  """Span i's sentinel as T5 picks it: `sentinel_id(vocabulary) + 1 - (i + 1)`, i.e.
  `vocabulary.vocab_size - 1 - i` with seqio's unpadded vocab_size.

  SentencePiece: seqio counts its extra ids in vocab_size (32000 + 100 = 32100, not the
  model's 32128), so span i gets `<extra_id_i>` = 32099 - i = `vocab.extra_id(i)`.
  Bytes: ByT5 pre-trained with `t5.data.ByteVocabulary()` (no extra ids, vocab_size 259;
  google-research/byt5 byt5/tasks.py), so span i gets 258 - i, the top byte ids (0xFF, 0xFE,
  ...; bytes 0xF5-0xFF never occur in UTF-8). To use Hugging Face's ByT5 extra ids (259 + i)
  instead, pass `vocab.extra_id` as the sentinel function.
  """
  if isinstance(vocab, ByteVocabulary):
    top, limit = vocab.base_vocab_size, vocab.base_vocab_size - UNK_ID - 1
  elif isinstance(vocab, SentencePieceVocabulary):
    top, limit = vocab.base_vocab_size + vocab.extra_ids, vocab.extra_ids
  else:
    raise TypeError(  # internal
        f'no T5 sentinel rule for {vocab!r}; pass a vocab size or a function')

  def fn(i: int) -> int:
    if i >= limit:
      raise ConfigError(f'{i + 1} noise spans but {vocab!r} has {limit} sentinels: use shorter '
                        'chunks (random_spans_helper) or a larger mean_noise_span_length')
    return top - 1 - i
  return fn


def _sentinel_ids(spec: SentinelSpec, num_spans: int) -> np.ndarray:
  if isinstance(spec, Vocabulary):
    spec = t5_sentinel_fn(spec)
  if isinstance(spec, (int, np.integer)):  # T5's sentinel_id: vocabulary.vocab_size - 1
    ids = int(spec) - 1 - np.arange(num_spans)
  elif callable(spec):
    ids = np.array([spec(i) for i in range(num_spans)], np.int64)
  else:
    raise TypeError(  # internal
        f'sentinels: expected a vocab size, a function or a Vocabulary, got {spec!r}')
  if num_spans and ids.min() <= UNK_ID:
    raise ConfigError(f'{num_spans} noise spans need sentinel ids down to {ids.min()}, which '
                      'reaches PAD/EOS/UNK: the vocabulary is too small for this many spans')
  return ids


def _check_rng(rng) -> None:
  if not isinstance(rng, np.random.Generator):
    raise TypeError(  # internal
        f'rng must be a numpy Generator (np.random.default_rng(seed)), got {rng!r}')


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Lengths of a uniformly random split of num_items into num_segments non-empty parts
  (T5's `_random_segmentation`: shuffle num_segments - 1 segment starts among the gaps)."""
  first_in_segment = np.zeros(num_items, np.int64)
  first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
  return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0, *,
                            rng: np.random.Generator) -> np.ndarray:
  """T5's `random_spans_noise_mask` (random_roll=False, its default): a bool mask of length.

  num_noise_tokens = round(length * density) clipped to [1, length - 1] and num_noise_spans =
  max(1, round(num_noise_tokens / mean)) (float32, round half to even, length raised to 2 then
  the mask cut back, as T5). Noise and non-noise lengths are independent uniform random
  compositions; spans alternate starting with non-noise, so the mask always ends in noise.
  """
  _check_rng(rng)
  if not 0.0 <= noise_density < 1.0 or mean_noise_span_length <= 0:
    raise ConfigError(f'need noise_density in [0, 1) and mean_noise_span_length > 0, got '
                      f'{noise_density}, {mean_noise_span_length}')
  if noise_density == 0.0:
    return np.zeros(length, bool)
  orig_length, length = length, max(length, 2)
  f32 = np.float32
  num_noise = int(np.round(f32(length) * f32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(np.round(f32(num_noise) / f32(mean_noise_span_length))), 1)
  num_nonnoise = length - num_noise
  if num_spans > min(num_noise, num_nonnoise):  # T5 fails here too (mismatched tf.stack).
    raise ConfigError(
        f'{num_spans} spans need as many noise and non-noise tokens, but length '
        f'{length} has {num_noise} and {num_nonnoise}: change noise_density or '
        'mean_noise_span_length')
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  is_noise = np.repeat(np.tile([False, True], num_spans), interleaved)
  return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  sentinels: SentinelSpec) -> np.ndarray:
  """T5's `noise_span_to_unique_sentinel`: each run of noise tokens -> one sentinel, the
  k-th run (k = 0, 1, ...) getting sentinel k (vocab_size - 1 - k)."""
  tokens, noise_mask = np.asarray(tokens), np.asarray(noise_mask, bool)
  prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
  first = noise_mask & ~prev_is_noise
  span_index = np.cumsum(first) - 1
  ids = _sentinel_ids(sentinels, int(first.sum()))
  out = np.where(first, ids[np.maximum(span_index, 0)] if ids.size else 0, tokens)
  return out[~(noise_mask & prev_is_noise)].astype(tokens.dtype)


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                     sentinels: SentinelSpec) -> np.ndarray:
  """T5's `nonnoise_span_to_unique_sentinel`: the targets, each non-noise run -> a sentinel."""
  return noise_span_to_unique_sentinel(tokens, ~np.asarray(noise_mask, bool), sentinels)


def _as_tokens(tokens, nonempty_for: str = '') -> np.ndarray:
  arr = np.asarray(tokens)
  if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f'tokens must be one sequence of int ids, got shape {arr.shape} '  # internal
                     f'dtype {arr.dtype}')
  if nonempty_for and not arr.size:
    raise ValueError(  # internal
        f'{nonempty_for} got no tokens: drop empty texts first (split_tokens '
        'does, as T5 filters them)')
  return arr.astype(np.int32)


def _with_eos(ids: np.ndarray, eos_id: int = EOS_ID) -> np.ndarray:
  return np.append(ids, eos_id).astype(np.int32)


def span_corruption(tokens, vocab_size_or_sentinel_fn: SentinelSpec, rng: np.random.Generator,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray]:
  """T5's `span_corruption` on one chunk (its `denoise` with random_spans_noise_mask,
  noise_span_to_unique_sentinel, nonnoise_span_to_unique_sentinel) -> (inputs, targets).

  tokens: raw ids without EOS, one chunk of `random_spans_helper(...)[0]` tokens or fewer
  (`split_tokens`). inputs = non-noise runs with one sentinel per noise run; targets = each
  sentinel followed by its noise run; EOS appended to both. Sentinels: an int is T5's
  `vocabulary.vocab_size` (span k -> vocab_size - 1 - k), a Vocabulary uses
  `t5_sentinel_fn`, a function maps span index -> id. ByT5 uses mean_noise_span_length=20.
  """
  tokens = _as_tokens(tokens, 'span_corruption')
  mask = random_spans_noise_mask(tokens.size, noise_density, mean_noise_span_length, rng=rng)
  inputs = noise_span_to_unique_sentinel(tokens, mask, vocab_size_or_sentinel_fn)
  targets = nonnoise_span_to_unique_sentinel(tokens, mask, vocab_size_or_sentinel_fn)
  return _with_eos(inputs, eos_id), _with_eos(targets, eos_id)


def random_spans_helper(inputs_length: int, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
  """T5's `random_spans_helper`: (tokens_length, targets_length), EOS counted: the largest
  raw chunk whose corrupted inputs fit inputs_length (512 -> 568 raw, targets 114: T5's
  pre-training) and its targets; noise_density 0.5: one token less if targets > inputs.

  Kept from T5, with its two mismatches against the mask: Python float64 rounding here,
  float32 there (e.g. 190 * 0.15: 28 vs 29 noise tokens: targets 2 over targets_length,
  at tokens_length 190, 350, 390, 670, ...), and round(noise / mean) may be 0 spans here,
  at least 1 there (inputs_length < 10 at mean 3, < 62 at mean 20: inputs 1 over).
  """
  if inputs_length < 2 or not 0.0 < noise_density < 1.0 or mean_noise_span_length <= 0:
    raise ConfigError(f'need inputs_length >= 2, 0 < noise_density < 1, mean_noise_span_length'
                      f' > 0; got {inputs_length}, {noise_density}, {mean_noise_span_length}')

  def lengths(tokens_length: int) -> tuple[int, int]:
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return (tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
            num_noise + num_spans * extra_tokens_per_span_targets + 1)

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  got_inputs_length, targets_length = lengths(tokens_length)
  if noise_density == 0.5 and targets_length > got_inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def select_random_chunk(tokens, max_length: int, rng: np.random.Generator) -> np.ndarray:
  """T5's `select_random_chunk` (its default uniform_random_start=False): a sequence longer
  than max_length gives one of its consecutive max_length-token chunks (the last one
  shorter), chosen uniformly; a shorter one comes back whole (T5 draws among its one chunk
  anyway; we draw only where there is a choice). T5's span_corruption uses max_length 65536
  on every document before merging them."""
  tokens = _as_tokens(tokens)
  if tokens.size <= max_length:
    return tokens
  _check_rng(rng)
  start = max_length * int(rng.integers(-(-tokens.size // max_length)))
  return tokens[start:start + max_length]


def split_tokens(tokens, max_tokens_per_segment: int) -> list[np.ndarray]:
  """T5's `split_tokens` (fixed length): consecutive segments of max_tokens_per_segment, the
  last one shorter; an empty sequence gives none (T5 filters empty examples)."""
  if max_tokens_per_segment < 1:
    raise ConfigError(f'max_tokens_per_segment must be >= 1, got {max_tokens_per_segment}')
  tokens = _as_tokens(tokens)
  return [tokens[i:i + max_tokens_per_segment]
          for i in range(0, tokens.size, max_tokens_per_segment)]


def prefix_lm(tokens, rng: np.random.Generator, noise_density: float = 0.5,
              eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray]:
  """T5's `prefix_lm` on one chunk: `random_prefix_noise_mask`, then inputs =
  `drop_nonnoise_tokens` (the prefix) and targets = `drop_noise_tokens` (the rest), EOS
  appended to both. The prefix length is uniform in [min, length - 1] with min =
  clip(round((1 - 2 * noise_density) * (length - 1)), 1, length - 1): [1, length - 1] at T5's
  0.5. T5 chunks with `split_tokens_to_inputs_length`: split_tokens(tokens, inputs_length - 1).
  """
  _check_rng(rng)
  if not 0.0 <= noise_density <= 0.5:
    raise ConfigError(f'prefix_lm needs noise_density in [0, 0.5] (as T5), got {noise_density}')
  tokens = _as_tokens(tokens, 'prefix_lm')
  max_inputs = tokens.size - 1
  scaled = np.float32(1 - 2 * noise_density) * np.float32(max_inputs)
  min_inputs = min(max_inputs, max(1, int(np.round(scaled))))
  split = int(rng.integers(min_inputs, max_inputs + 1))
  return _with_eos(tokens[:split], eos_id), _with_eos(tokens[split:], eos_id)


def causal_lm(tokens, eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray]:
  """A plain language-modelling example on one chunk: no inputs, targets = the chunk + EOS
  (seqio's LMFeatureConverter input: "targets" only). For decoder-only models
  (feature_converters.DecoderOnlyFeatureConverter, full loss on the text)."""
  return np.zeros(0, np.int32), _with_eos(_as_tokens(tokens), eos_id)
