"""gradient_rewrites: the relative position bias's broadcast and gather, whose gradients are
computed another way than XLA's default (same values)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite.models import gradient_rewrites
from t5x_lite.models.gradient_rewrites import broadcast_batch, take_buckets


@pytest.mark.parametrize('batch', [1, 2, 7, 8])
def test_value_and_gradient_equal_the_plain_broadcast(batch):
  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.standard_normal((1, 3, 5, 4)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((batch, 3, 5, 4)), jnp.float32)
  plain = lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:])  # noqa: E731
  np.testing.assert_array_equal(broadcast_batch(x, batch), plain(x))
  ours = jax.jit(jax.grad(lambda x: jnp.sum(broadcast_batch(x, batch) * c)))(x)
  want = np.asarray(c, np.float64).sum(0, keepdims=True)
  assert ours.shape == x.shape
  np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU path only')
def test_gradient_has_no_reduce_over_the_batch_axis():
  def hlo(broadcast):
    grad = jax.jit(jax.grad(lambda x, c: jnp.sum(broadcast(x, 8) * c)))
    return grad.lower(jnp.ones((1, 6, 16, 16)), jnp.ones((8, 6, 16, 16))).compile().as_text()

  leading_reduce = r' reduce\([^\n]*dimensions=\{0\}'
  plain = hlo(lambda x, b: jnp.broadcast_to(x, (b,) + x.shape[1:]))
  assert re.search(leading_reduce, plain)  # the test can see the difference
  assert not re.search(leading_reduce, hlo(broadcast_batch))


def _buckets_and_cotangent(rng, shape, num_buckets, heads):
  buckets = jnp.asarray(rng.integers(0, num_buckets, shape), jnp.int32)
  return buckets, jnp.asarray(rng.standard_normal((heads,) + shape), jnp.float32)


@pytest.mark.parametrize('max_one_hot', [gradient_rewrites.MAX_ONE_HOT, 1])
def test_take_buckets_gradient_equals_the_scatter_add(monkeypatch, max_one_hot):
  """One-hot matmul (default) and the scatter-add fallback (one-hot over the limit) both give
  jnp.take's gradient; every bucket is hit several times, some never."""
  monkeypatch.setattr(gradient_rewrites, 'MAX_ONE_HOT', max_one_hot)
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.standard_normal((3, 12)), jnp.float32)
  buckets, c = _buckets_and_cotangent(rng, (1, 9, 11), 10, 3)  # buckets 10, 11 unused
  np.testing.assert_array_equal(take_buckets(table, buckets), jnp.take(table, buckets, axis=1))
  ours = jax.jit(jax.grad(lambda t: jnp.sum(take_buckets(t, buckets) * c)))(table)
  want = jax.grad(lambda t: jnp.sum(jnp.take(t, buckets, axis=1) * c))(table)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
  assert not np.asarray(ours[:, 10:]).any()


def test_take_buckets_gradient_has_no_scatter():
  rng = np.random.default_rng(1)
  buckets, c = _buckets_and_cotangent(rng, (1, 32, 32), 32, 4)

  def hlo(take):
    grad = jax.jit(jax.grad(lambda t, c: jnp.sum(take(t, buckets) * c)))
    return grad.lower(jnp.ones((4, 32)), c).compile().as_text()

  assert ' scatter(' in hlo(lambda t, b: jnp.take(t, b, axis=1))  # the test sees the difference
  assert ' scatter(' not in hlo(take_buckets)
