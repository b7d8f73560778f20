"""Span corruption and prefix LM: T5's arithmetic exactly, its layout distribution within
stated statistical tolerances (fixed seeds, so deterministic), lossless reconstruction."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from t5x_lite.data import objectives as obj
from t5x_lite.data.vocab import EOS_ID, ByteVocabulary, get_vocabulary

T5_VOCAB_SIZE = 32100  # seqio's vocab_size of T5's vocabulary: 32000 pieces + 100 extra ids.


def _t5_counts(length: int, density: float = 0.15, mean: float = 3.0) -> tuple[int, int]:
  """(noise tokens, noise spans) by T5's formulas, written independently of the module."""
  n = max(length, 2)
  noise = min(max(int(np.round(np.float32(n) * np.float32(density))), 1), n - 1)
  return noise, max(int(np.round(np.float32(noise) / np.float32(mean))), 1)


def _runs(mask: np.ndarray) -> int:
  return int(np.sum(mask & ~np.concatenate([[False], mask[:-1]])))


def _reconstruct(inputs, targets, sentinel_ids) -> np.ndarray:
  """The original tokens: each sentinel in inputs replaced by what follows it in targets."""
  assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
  inputs, targets = list(inputs[:-1]), list(targets[:-1])
  wanted = set(sentinel_ids)
  pos = {t: i for i, t in enumerate(targets) if t in wanted}
  out, k = [], 0
  for tok in inputs:
    if k < len(sentinel_ids) and tok == sentinel_ids[k]:
      nxt = sentinel_ids[k + 1] if k + 1 < len(sentinel_ids) else None
      out += targets[pos[tok] + 1:pos.get(nxt, len(targets))]
      k += 1
    else:
      out.append(tok)
  return np.array(out)


def test_noise_counts_match_t5_formulas_exactly_on_3000_examples():
  """Per example, 0 tolerance: noise tokens, spans, non-noise first and noise last. Summed over
  3000 lengths in [1, 600]: the formulas' totals exactly (noise fraction 0.15004, 45682 spans,
  mean span 2.997), within 0.002 of noise_density."""
  rng, lengths = np.random.default_rng(0), np.random.default_rng(1).integers(1, 601, 3000)
  noise_total = spans_total = 0
  for length in lengths:
    mask = obj.random_spans_noise_mask(int(length), rng=rng)
    noise, spans = _t5_counts(int(length))
    assert mask.shape == (length,)
    if length >= 2:
      assert (int(mask.sum()), _runs(mask)) == (noise, spans)
      assert not mask[0] and mask[-1]
    noise_total, spans_total = noise_total + mask.sum(), spans_total + _runs(mask)
  formula = [_t5_counts(int(n)) for n in lengths if n >= 2]
  assert noise_total == sum(n for n, _ in formula)  # length 1: no noise (T5 cuts its mask)
  assert abs(noise_total / lengths.sum() - 0.15) < 0.002
  assert spans_total == sum(s for _, s in formula)


def test_t5_rounding_cases():
  """T5's preprocessors_test: length 32, density 0.25, mean 2 -> 8 noise tokens in 4 spans;
  round half to even: length 20 -> 5 noise tokens, 5 / 2 = 2.5 -> 2 spans."""
  rng = np.random.default_rng(0)
  mask = obj.random_spans_noise_mask(32, 0.25, 2.0, rng=rng)
  assert (mask.sum(), _runs(mask)) == (8, 4)
  mask = obj.random_spans_noise_mask(20, 0.25, 2.0, rng=rng)
  assert (mask.sum(), _runs(mask)) == (5, 2)
  assert not obj.random_spans_noise_mask(10, 0.0, rng=rng).any()  # T5's density-0 case


def test_unique_sentinels_match_t5s_unit_test():
  """T5's preprocessors_test.test_noise_span_to_unique_sentinel (vocab_size 1000), and the
  targets side of the same mask."""
  tokens, mask = [10, 11, 12, 13, 14, 15], [True, True, False, False, True, False]
  assert obj.noise_span_to_unique_sentinel(tokens, mask, 1000).tolist() == [999, 12, 13, 998, 15]
  assert obj.nonnoise_span_to_unique_sentinel(tokens, mask, 1000).tolist() == [
      10, 11, 999, 14, 998]


def test_every_layout_equally_likely_over_20000_masks():
  """length 20, density 0.25, mean 2: 5 noise tokens in 2 spans and 15 others in 2 spans, so
  C(4,1) * C(14,1) = 56 layouts, each 1/56. Tolerance: 4.5 binomial sigmas (0.0042)."""
  rng, n = np.random.default_rng(0), 20000
  counts: dict[bytes, int] = {}
  for _ in range(n):
    key = obj.random_spans_noise_mask(20, 0.25, 2.0, rng=rng).tobytes()
    counts[key] = counts.get(key, 0) + 1
  assert len(counts) == 56
  p = 1 / 56
  tol = 4.5 * math.sqrt(p * (1 - p) / n)
  assert max(abs(c / n - p) for c in counts.values()) < tol


def test_noise_span_lengths_follow_uniform_compositions_over_5000_chunks():
  """568-token chunks: 85 noise tokens in 28 spans. A uniform composition of N into k parts has
  P(part = j) = C(N-j-1, k-2) / C(N-1, k-1), mean N / k = 3.04. Over 5000 chunks (140000
  spans) the distribution of span lengths matches within 0.006 (4.5 sigmas of the worst cell)."""
  rng, n_chunks = np.random.default_rng(0), 5000
  lengths = []
  for _ in range(n_chunks):
    mask = obj.random_spans_noise_mask(568, rng=rng).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    lengths.append(edges[1::2] - edges[::2])
  lengths = np.concatenate(lengths)
  assert lengths.size == 28 * n_chunks and lengths.sum() == 85 * n_chunks
  big_n, k = 85, 28
  for j in range(1, 8):
    p = math.comb(big_n - j - 1, k - 2) / math.comb(big_n - 1, k - 1)
    assert abs(np.mean(lengths == j) - p) < 0.006, j


@pytest.mark.parametrize('density,mean', [(0.15, 3.0), (0.15, 20.0), (0.5, 3.0)])
def test_span_corruption_reconstructs_the_original_on_1000_chunks(density, mean):
  rng, data = np.random.default_rng(0), np.random.default_rng(1)
  sentinels = T5_VOCAB_SIZE - 1 - np.arange(300)
  for _ in range(1000):
    tokens = data.integers(3, 32000, int(data.integers(1, 600)))
    inputs, targets = obj.span_corruption(tokens, T5_VOCAB_SIZE, rng, density, mean)
    assert inputs.dtype == targets.dtype == np.int32
    mask_noise, spans = _t5_counts(tokens.size, density, mean)
    if tokens.size >= 2:
      assert inputs.size == tokens.size - mask_noise + spans + 1
      assert targets.size == mask_noise + spans + 1
      assert list(inputs[-2:]) == [sentinels[spans - 1], EOS_ID]
    assert targets[0] == sentinels[0]
    np.testing.assert_array_equal(_reconstruct(inputs, targets, list(sentinels)), tokens)


def test_byte_vocabulary_sentinels_are_byt5s_top_byte_ids():
  """ByT5 pre-trained with seqio's ByteVocabulary() (vocab_size 259): spans get 258, 257, ..."""
  vocab, rng = ByteVocabulary(), np.random.default_rng(0)
  text = 'The quick brown fox jumps over the lazy dog. ' * 20
  tokens = np.array(vocab.encode(text))
  inputs, targets = obj.span_corruption(tokens, vocab, rng, mean_noise_span_length=20.0)
  spans = _t5_counts(tokens.size, 0.15, 20.0)[1]
  expected = [258 - i for i in range(spans)]
  assert [t for t in inputs if t >= 248] == expected
  assert [t for t in targets if t >= 248] == expected
  np.testing.assert_array_equal(_reconstruct(inputs, targets, expected), tokens)
  # Hugging Face's ByT5 extra ids instead (259 + i): pass the vocabulary's extra_id.
  inputs, _ = obj.span_corruption(tokens, vocab.extra_id, np.random.default_rng(0))
  assert [t for t in inputs if t >= 259] == [259 + i for i in range(_t5_counts(tokens.size)[1])]


def test_t5_sentencepiece_sentinels_are_its_extra_ids(shared_data):
  vocab = get_vocabulary(str(shared_data / 't5_spiece' / 'spiece.model'))
  assert (vocab.base_vocab_size, vocab.extra_ids, vocab.vocab_size) == (32000, 100, 32128)
  text = ' '.join(['Studies have shown that owning a dog is good for you.'] * 40)
  tokens = np.array(vocab.encode(text))
  inputs, targets = obj.span_corruption(tokens, vocab, np.random.default_rng(0))
  spans = _t5_counts(tokens.size)[1]
  expected = [vocab.extra_id(i) for i in range(spans)]
  assert expected[0] == 32099 == T5_VOCAB_SIZE - 1  # not 32127: seqio's size is unpadded
  assert [t for t in inputs if t >= 32000] == expected
  np.testing.assert_array_equal(_reconstruct(inputs, targets, expected), tokens)
  decoded = vocab.decode(inputs)
  assert decoded.count('<extra_id_') == spans and '<extra_id_0>' in decoded
  assert vocab.decode(targets).startswith('<extra_id_0>')
  with pytest.raises(ValueError, match='100 sentinels'):
    obj.span_corruption(np.full(5000, 100), vocab, np.random.default_rng(0))


def test_random_spans_helper_matches_t5_numbers():
  assert obj.random_spans_helper(512) == (568, 114)  # T5 pre-training: en_mix.gin 512 / 114
  assert obj.random_spans_helper(64, 0.2, 2.0) == (70, 22)  # T5's preprocessors_test
  assert obj.random_spans_helper(64, 0.2, 1.0) == (63, 27)
  assert obj.random_spans_helper(114) == (126, 26)


@pytest.mark.parametrize('mean,first_exact', [(3.0, 10), (20.0, 62)])
def test_chunks_fill_inputs_length_exactly(mean, first_exact):
  """A full chunk of tokens_length raw tokens corrupts to exactly inputs_length ids with EOS:
  512 and 114 (T5's pre-training) through split_tokens, and every inputs_length in
  [first_exact, 1200]. Targets are targets_length except where T5's own two roundings disagree
  (helper: Python float64, mask: float32, e.g. 190 * 0.15 -> 28 vs 29 noise tokens): there
  the mask has one noise token and one span more, targets 2 over (T5 trims them). Below
  first_exact the helper counts round(noise / mean) = 0 spans, the mask at least 1: inputs 1
  over, as in T5."""
  rng, data = np.random.default_rng(0), np.random.default_rng(1)
  for inputs_length in [512, 114]:
    tokens_length, targets_length = obj.random_spans_helper(inputs_length, 0.15, mean)
    chunks = obj.split_tokens(data.integers(3, 32000, 3 * tokens_length + 7), tokens_length)
    assert [c.size for c in chunks] == [tokens_length] * 3 + [7]
    for chunk in chunks[:3]:
      inputs, targets = obj.span_corruption(chunk, T5_VOCAB_SIZE, rng, 0.15, mean)
      assert (inputs.size, targets.size) == (inputs_length, targets_length)
  ties = []
  for inputs_length in range(2, 1201):
    tokens_length, targets_length = obj.random_spans_helper(inputs_length, 0.15, mean)
    inputs, targets = obj.span_corruption(np.arange(3, 3 + tokens_length), T5_VOCAB_SIZE, rng,
                                          0.15, mean)
    if inputs_length >= first_exact:
      assert inputs.size == inputs_length
      if round(tokens_length * 0.15) != _t5_counts(tokens_length, 0.15, mean)[0]:
        ties.append(tokens_length)
        assert targets.size == targets_length + 2
      else:
        assert targets.size == targets_length
    elif inputs_length >= 4:
      assert inputs.size == inputs_length + 1
  assert ties == ([190, 350, 390, 670, 710, 750, 790, 830, 1310] if mean == 3.0 else [])


def test_split_tokens():
  chunks = obj.split_tokens(np.arange(10), 4)
  assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert obj.split_tokens([], 4) == []
  with pytest.raises(ValueError, match='max_tokens_per_segment'):
    obj.split_tokens(np.arange(3), 0)


def test_same_seed_same_output_other_seed_differs():
  tokens = np.arange(3, 571)
  a = obj.span_corruption(tokens, T5_VOCAB_SIZE, np.random.default_rng(7))
  b = obj.span_corruption(tokens, T5_VOCAB_SIZE, np.random.default_rng(7))
  c = obj.span_corruption(tokens, T5_VOCAB_SIZE, np.random.default_rng(8))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])
  p = [obj.prefix_lm(tokens, np.random.default_rng(s))[0].size for s in (7, 7, 8)]
  assert p[0] == p[1] != p[2]


def test_prefix_lm_split_is_uniform_over_20000_examples():
  """Length 11: the prefix has 1..10 tokens, each with p = 0.1 (tolerance 4.5 sigmas = 0.0095)."""
  rng, tokens, n = np.random.default_rng(0), np.arange(3, 14), 20000
  sizes = np.zeros(12, int)
  for _ in range(n):
    inputs, targets = obj.prefix_lm(tokens, rng)
    assert inputs[-1] == targets[-1] == EOS_ID
    sizes[inputs.size - 1] += 1
  np.testing.assert_array_equal(np.concatenate([inputs[:-1], targets[:-1]]), tokens)
  assert sizes[0] == sizes[11] == 0
  assert np.max(np.abs(sizes[1:11] / n - 0.1)) < 4.5 * math.sqrt(0.09 / n)
  one = obj.prefix_lm([5], rng)  # T5: max input tokens 0 -> empty prefix
  assert [x.tolist() for x in one] == [[EOS_ID], [5, EOS_ID]]


def test_bad_inputs_fail_early():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match='no tokens'):
    obj.span_corruption([], T5_VOCAB_SIZE, rng)
  with pytest.raises(ValueError, match='noise_density'):
    obj.random_spans_noise_mask(10, 1.5, rng=rng)
  with pytest.raises(TypeError, match='Generator'):
    obj.span_corruption(np.arange(3, 20), T5_VOCAB_SIZE, 0)
  with pytest.raises(ValueError, match='one sequence'):
    obj.span_corruption(np.ones((2, 3), int), T5_VOCAB_SIZE, rng)
  with pytest.raises(ValueError, match='PAD/EOS/UNK'):
    obj.span_corruption(np.arange(3, 200), 5, rng)
  with pytest.raises(ValueError, match='spans need'):
    obj.random_spans_noise_mask(10, 0.9, 1.0, rng=rng)
  with pytest.raises(ValueError, match='0.5'):
    obj.prefix_lm(np.arange(3, 20), rng, noise_density=0.7)
