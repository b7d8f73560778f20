"""Tests for the T5X objective and its mixture-of-tasks extension."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest

from t5x_lite.training import losses

VOCAB = 11


# Jitted once per static configuration: eager op-by-op dispatch is what makes tests slow.
_token_losses = jax.jit(losses.token_losses, static_argnames=('z_loss', 'label_smoothing'))
_mixture_loss = jax.jit(losses.mixture_loss, static_argnames=(
    'z_loss', 'label_smoothing', 'normalization', 'constant'))
_token_weights = jax.jit(losses.token_weights, static_argnames=('normalization',))


def _logits(shape, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((*shape, VOCAB)) * scale).astype(np.float32)


def _targets(shape, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def _packed_batch():
  """2 rows of length 6. Row 0 packs two examples (3 + 2 real tokens), row 1 one (4)."""
  return {
      'decoder_target_tokens': np.array([[5, 6, 1, 7, 1, 0], [3, 4, 8, 1, 0, 0]], np.int32),
      'decoder_loss_weights': np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], np.int32),
      'decoder_segment_ids': np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]], np.int32),
      'decoder_task_ids': np.array([[0, 0, 0, 1, 1, -1], [1, 1, 1, 1, -1, -1]], np.int32),
  }


def _random_batch(batch=8, length=12, num_tasks=3, seed=0):
  """Random packed rows: up to 3 segments per row, padding at the end, a task per segment."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((batch, length), np.int32) for k in (
      'decoder_target_tokens', 'decoder_loss_weights', 'decoder_segment_ids')}
  out['decoder_task_ids'] = np.full((batch, length), -1, np.int32)
  for row in range(batch):
    pos = 0
    for seg in range(1, 4):
      n = int(rng.integers(1, 5))
      if pos + n > length:
        break
      out['decoder_target_tokens'][row, pos:pos + n] = rng.integers(1, VOCAB, n)
      out['decoder_loss_weights'][row, pos:pos + n] = 1
      out['decoder_segment_ids'][row, pos:pos + n] = seg
      out['decoder_task_ids'][row, pos:pos + n] = rng.integers(0, num_tasks)
      pos += n
  return out


def test_no_smoothing_no_z_loss_is_optax_cross_entropy():
  logits = _logits((2, 5))
  targets = _targets((2, 5))
  loss, z = _token_losses(logits, targets, z_loss=0.0)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(z, 0.0)


def test_z_loss_by_hand():
  logits = np.array([[[0.0, math.log(3.0)]]], np.float32)  # logsumexp = log(1 + 3) = log 4
  targets = np.array([[1]], np.int32)
  loss, z = _token_losses(logits, targets, z_loss=0.5)
  np.testing.assert_allclose(z[0, 0], 0.5 * math.log(4.0) ** 2, rtol=1e-6)
  # Cross entropy -log(3/4) plus the z term.
  np.testing.assert_allclose(loss[0, 0], -math.log(0.75) + 0.5 * math.log(4.0) ** 2, rtol=1e-6)


def test_label_smoothing_matches_t5x_formula():
  ls = 0.1
  logits = np.asarray(_logits((3, 4)), np.float64)
  targets = _targets((3, 4), seed=2)
  confidence, low = 1 - ls, ls / (VOCAB - 1)
  soft = np.full(logits.shape, low)
  np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
  log_z = np.log(np.sum(np.exp(logits), axis=-1))
  log_probs = logits - log_z[..., None]
  constant = -(confidence * np.log(confidence) + (VOCAB - 1) * low * np.log(low + 1e-20))
  expected = -np.sum(soft * log_probs, axis=-1) - constant + 1e-4 * log_z ** 2
  loss, _ = _token_losses(logits.astype(np.float32), targets, z_loss=1e-4, label_smoothing=ls)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)


def test_label_smoothing_perfect_prediction_costs_nothing():
  ls = 0.2
  targets = np.array([[3, 0, 10]], np.int32)
  soft = np.where(np.arange(VOCAB) == targets[..., None], 1 - ls, ls / (VOCAB - 1))
  # Logits log(q): the softmax is q and logsumexp is 0, so z-loss is 0 as well.
  loss, z = _token_losses(np.log(soft).astype(np.float32), targets, z_loss=1e-4,
                          label_smoothing=ls)
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)
  np.testing.assert_allclose(z, 0.0, atol=1e-9)


def test_bad_label_smoothing_raises():
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.token_losses(_logits((1, 1)), np.zeros((1, 1), np.int32), label_smoothing=1.0)


def test_per_sequence_weights_on_packed_rows():
  weights = _token_weights(_packed_batch(), 'per_sequence')
  expected = [[1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 0], [1 / 4] * 4 + [0, 0]]
  np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_per_sequence_without_segment_ids_uses_rows():
  batch = _packed_batch()
  del batch['decoder_segment_ids']
  weights = _token_weights(batch, 'per_sequence')
  np.testing.assert_allclose(weights, [[0.2] * 5 + [0], [0.25] * 4 + [0, 0]], rtol=1e-6)
  np.testing.assert_allclose(losses.normalizer(batch, 'per_sequence'), 2.0)


@pytest.mark.parametrize('normalization,constant,expected', [
    ('per_real_token', None, 9.0),
    ('per_total_token', None, 12.0),
    ('per_sequence', None, 3.0),  # three examples: two in row 0, one in row 1
    ('constant', 4.5, 4.5),
])
def test_normalizer(normalization, constant, expected):
  value = jax.jit(lambda b: losses.normalizer(b, normalization, constant))(_packed_batch())
  np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_normalization_errors():
  with pytest.raises(ValueError, match='per_real_token, per_total_token'):
    losses.normalizer(_packed_batch(), 'per_token')
  with pytest.raises(ValueError, match='constant'):
    losses.normalizer(_packed_batch(), 'constant')


@pytest.mark.parametrize('normalization', ['per_real_token', 'per_total_token', 'per_sequence'])
def test_mixture_loss_on_known_numbers(normalization):
  """Uniform logits: every token loss is log(VOCAB), so the loss is known in closed form."""
  batch = _packed_batch()
  logits = np.zeros((2, 6, VOCAB), np.float32)
  loss, aux = _mixture_loss(logits, batch, np.ones(2), z_loss=0.0, normalization=normalization)
  # Weighted sums of the real tokens: 9 tokens, or 3 examples for per_sequence.
  numerator = {'per_real_token': 9.0, 'per_total_token': 9.0, 'per_sequence': 3.0}
  divisor = {'per_real_token': 9.0, 'per_total_token': 12.0, 'per_sequence': 3.0}
  expected = math.log(VOCAB) * numerator[normalization] / divisor[normalization]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(aux['tokens'], [3.0, 6.0])
  np.testing.assert_allclose(aux['loss_sum'], [3 * math.log(VOCAB), 6 * math.log(VOCAB)],
                             rtol=1e-6)


def test_per_sequence_loss_averages_examples():
  """Each example's mean token loss, averaged over the 3 examples."""
  batch = _packed_batch()
  logits = _logits((2, 6), seed=3)
  token_loss = np.asarray(_token_losses(logits, batch['decoder_target_tokens'])[0])
  examples = [token_loss[0, :3].mean(), token_loss[0, 3:5].mean(), token_loss[1, :4].mean()]
  loss, _ = _mixture_loss(logits, batch, np.ones(2), normalization='per_sequence')
  np.testing.assert_allclose(loss, np.mean(examples), rtol=1e-6)


def test_all_ones_lambda_is_plain_t5x_loss():
  batch = _random_batch()
  logits = _logits((8, 12), seed=4)
  token_loss = np.asarray(_token_losses(logits, batch['decoder_target_tokens'])[0])
  weights = batch['decoder_loss_weights']
  expected = np.sum(token_loss * weights) / np.sum(weights)
  loss, _ = _mixture_loss(logits, batch, np.ones(3))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize('normalization', ['per_real_token', 'per_sequence'])
def test_lambda_weights_sum_of_task_losses(normalization):
  batch = _random_batch()
  logits = _logits((8, 12), seed=5)
  fn = lambda lam: _mixture_loss(logits, batch, lam, normalization=normalization)[0]
  per_task = [fn(np.eye(3, dtype=np.float32)[i]) for i in range(3)]
  lam = np.array([0.5, 2.0, 0.0], np.float32)
  np.testing.assert_allclose(fn(lam), sum(l * t for l, t in zip(lam, per_task)), rtol=1e-6)
  np.testing.assert_allclose(fn(np.ones(3, np.float32)), sum(per_task), rtol=1e-6)

  # lambda = e_0 is the loss of task 0's tokens alone, with the full batch's normalizer.
  token_loss = np.asarray(_token_losses(logits, batch['decoder_target_tokens'])[0])
  weights = np.asarray(_token_weights(batch, normalization))
  task0 = batch['decoder_task_ids'] == 0
  expected = np.sum(token_loss * weights * task0) / np.sum(weights)
  np.testing.assert_allclose(per_task[0], expected, rtol=1e-6)


@pytest.mark.parametrize('normalization', ['per_real_token', 'per_sequence', 'per_total_token'])
def test_microbatches_with_full_normalizer_add_up(normalization):
  batch = _random_batch(batch=8)
  logits = _logits((8, 12), seed=6)
  lam = np.array([1.0, 0.5, 2.0], np.float32)

  def full(logits):
    return losses.mixture_loss(logits, batch, lam, label_smoothing=0.1,
                               normalization=normalization)

  (full_loss, full_aux), full_grad = jax.jit(jax.value_and_grad(full, has_aux=True))(logits)
  norm = jax.jit(losses.normalizer, static_argnames=('normalization',))(batch, normalization)

  @jax.jit
  def micro(logits, mbatch):
    return jax.value_and_grad(
        lambda l: losses.mixture_loss(l, mbatch, lam, label_smoothing=0.1,
                                      normalization=normalization, normalizer_value=norm),
        has_aux=True)(logits)

  total, aux, grads = 0.0, None, []
  for i in range(4):
    rows = slice(2 * i, 2 * i + 2)
    (loss, mb_aux), grad = micro(logits[rows], {k: v[rows] for k, v in batch.items()})
    total += loss
    aux = mb_aux if aux is None else losses.accumulate_aux(aux, mb_aux)
    grads.append(grad)
  np.testing.assert_allclose(total, full_loss, rtol=1e-6)
  np.testing.assert_allclose(np.concatenate(grads), full_grad, rtol=1e-6, atol=1e-9)
  for key in full_aux:
    np.testing.assert_allclose(aux[key], full_aux[key], rtol=1e-6)


def test_summarize_matches_numpy():
  batch = _random_batch(num_tasks=3, seed=7)
  batch['decoder_task_ids'][batch['decoder_task_ids'] == 2] = 0  # task 2 is absent
  logits = _logits((8, 12), seed=8)
  _, aux = _mixture_loss(logits, batch, np.ones(3, np.float32))
  metrics = jax.jit(lambda a: losses.summarize(a, ['a', 'b', 'c']))(aux)

  token_loss, z = map(np.asarray, _token_losses(logits, batch['decoder_target_tokens']))
  real = batch['decoder_loss_weights'] > 0
  correct = (np.argmax(logits, -1) == batch['decoder_target_tokens']) & real
  np.testing.assert_allclose(metrics['loss'], token_loss[real].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['z_loss'], z[real].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['objective'], token_loss[real].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['accuracy'], correct.sum() / real.sum(), rtol=1e-6)
  assert metrics['tokens'] == real.sum()
  for i, name in enumerate('ab'):
    mask = batch['decoder_task_ids'] == i
    assert metrics[f'{name}/tokens'] == mask.sum()
    np.testing.assert_allclose(metrics[f'{name}/accuracy'], correct[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics[f'{name}/loss'], token_loss[mask].mean(), rtol=1e-6)
  assert (metrics['c/tokens'], metrics['c/loss'], metrics['c/accuracy']) == (0, 0, 0)
  with pytest.raises(ValueError, match='2 task names for 3 tasks'):
    losses.summarize(aux, ['a', 'b'])


def test_task_sums_ignores_padding_and_out_of_range():
  values = np.array([[1.0, 2.0, 4.0, 8.0]], np.float32)
  ids = np.array([[0, -1, 1, 5]], np.int32)
  sums = jax.jit(losses.task_sums, static_argnames=('num_tasks',))(values, ids, num_tasks=2)
  np.testing.assert_allclose(sums, [1.0, 4.0])


def test_empty_batch_is_nan_free():
  batch = {k: np.zeros_like(v) for k, v in _packed_batch().items()}
  batch['decoder_task_ids'][:] = -1
  for normalization in ('per_real_token', 'per_sequence'):
    loss, grad = jax.jit(jax.value_and_grad(lambda l: losses.mixture_loss(
        l, batch, np.ones(2, np.float32), normalization=normalization)[0]))(_logits((2, 6)))
    assert loss == 0.0 and np.all(np.isfinite(grad))
