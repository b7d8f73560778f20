"""batch_broadcast: [1, ...] -> [B, ...] whose gradient sums the batch without XLA:CPU's slow
leading-axis reduce."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite.models.batch_broadcast import broadcast_batch


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
