"""Tests for schedules, Adafactor / AdamW construction and gradient clipping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite.training import optimizers


def _values(schedule, steps):
  return [float(schedule(jnp.asarray(s, jnp.int32))) for s in steps]


def test_constant_and_warmup_schedules():
  np.testing.assert_allclose(
      _values(optimizers.learning_rate_schedule('constant', 0.3), [0, 5, 10**6]), [0.3] * 3)
  warmup = optimizers.learning_rate_schedule('warmup', 0.2, warmup_steps=100)
  np.testing.assert_allclose(_values(warmup, [0, 25, 100, 5000]), [0.0, 0.05, 0.2, 0.2],
                             rtol=1e-6)
  no_warmup = optimizers.learning_rate_schedule('warmup', 0.2)
  np.testing.assert_allclose(_values(no_warmup, [0, 1]), [0.2, 0.2])


def test_rsqrt_schedule_is_t5s():
  rsqrt = optimizers.learning_rate_schedule('rsqrt', 1.0, warmup_steps=10_000)
  np.testing.assert_allclose(_values(rsqrt, [0, 1, 10_000, 40_000]),
                             [0.01, 0.01, 0.01, 0.005], rtol=1e-6)
  # Without warmup the first step is not a division by zero.
  np.testing.assert_allclose(_values(optimizers.learning_rate_schedule('rsqrt', 2.0), [0, 4]),
                             [2.0, 1.0], rtol=1e-6)


def test_cosine_schedule():
  cosine = optimizers.learning_rate_schedule('cosine', 1.0, warmup_steps=10, total_steps=110,
                                             alpha=0.1)
  # Warmup ends at 10; the cosine midpoint is 50 steps later, halfway between 1 and 0.1.
  np.testing.assert_allclose(_values(cosine, [0, 5, 10, 60, 110, 500]),
                             [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-5, atol=1e-7)


def test_schedule_errors():
  with pytest.raises(ValueError, match='constant, warmup, rsqrt, cosine'):
    optimizers.learning_rate_schedule('linear', 1.0)
  with pytest.raises(ValueError, match='total_steps'):
    optimizers.learning_rate_schedule('cosine', 1.0, warmup_steps=10)
  with pytest.raises(ValueError, match='total_steps'):
    optimizers.learning_rate_schedule('cosine', 1.0, warmup_steps=10, total_steps=10)
  with pytest.raises(ValueError, match='warmup_steps'):
    optimizers.learning_rate_schedule('warmup', 1.0, warmup_steps=-1)


def test_adafactor_factors_only_large_matrices():
  params = {'kernel': jnp.zeros((256, 512)), 'scale': jnp.zeros((64,)),
            'small': jnp.zeros((64, 512))}
  state = optimizers.make_optimizer('adafactor').init(params)
  factored_state = state[0]  # optax.adafactor is a chain; the moments come first
  assert isinstance(factored_state, optax.FactoredState)
  assert factored_state.v_row['kernel'].shape == (256,)
  assert factored_state.v_col['kernel'].shape == (512,)
  assert factored_state.v['kernel'].shape == (1,)  # no full second moment
  assert factored_state.v['scale'].shape == (64,)
  assert factored_state.v_row['scale'].shape == (1,)
  assert factored_state.v['small'].shape == (64, 512)  # 64 < min_dim_size_to_factor


def _quadratic(params):
  return sum(jnp.sum((p - 1.5) ** 2) for p in jax.tree.leaves(params))


@pytest.mark.parametrize('name,kwargs', [
    ('adafactor', {'learning_rate': 0.1}),
    ('adafactor', {'learning_rate': 0.1, 'schedule': 'rsqrt', 'weight_decay': 1e-4}),
    ('adamw', {'learning_rate': 0.05, 'clip_grad_norm': 1.0}),
    ('adamw', {'learning_rate': 0.05, 'schedule': 'cosine', 'warmup_steps': 2,
               'total_steps': 10}),
])
def test_a_few_steps_reduce_a_quadratic(name, kwargs):
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((128, 128)), jnp.float32),
            'b': jnp.asarray(rng.standard_normal((8,)), jnp.float32)}
  optimizer = optimizers.make_optimizer(name, **kwargs)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      updates, state = optimizer.update(jax.grad(_quadratic)(params), state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), length=5)
    return params

  assert float(_quadratic(run(params))) < 0.9 * float(_quadratic(params))


def test_global_norm_clipping_before_the_optimizer():
  """A gradient of norm 100 clipped to 1 acts exactly like that gradient scaled to norm 1.

  Adam's update hardly depends on the gradient's scale, so the check is on its first
  moment, which is (1 - b1) * the gradient it was given.
  """
  rng = np.random.default_rng(1)
  grads = {'a': rng.standard_normal((3, 4)), 'b': rng.standard_normal((5,))}
  norm = math.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
  big = {k: jnp.asarray(100.0 * g / norm, jnp.float32) for k, g in grads.items()}
  unit = {k: jnp.asarray(g / norm, jnp.float32) for k, g in grads.items()}
  params = {k: jnp.ones_like(g) for k, g in big.items()}

  clipped = optimizers.make_optimizer('adamw', learning_rate=0.1, clip_grad_norm=1.0)
  plain = optimizers.make_optimizer('adamw', learning_rate=0.1)
  clipped_updates, clipped_state = clipped.update(big, clipped.init(params), params)
  plain_updates, plain_state = plain.update(unit, plain.init(params), params)
  for k in params:
    np.testing.assert_allclose(clipped_updates[k], plain_updates[k], rtol=1e-6)
    np.testing.assert_allclose(clipped_state[1][0].mu[k], 0.1 * unit[k], rtol=1e-6)
    np.testing.assert_allclose(plain_state[0].mu[k], 0.1 * unit[k], rtol=1e-6)
  # Without clipping the first moment would carry the norm-100 gradient.
  _, unclipped_state = plain.update(big, plain.init(params), params)
  np.testing.assert_allclose(unclipped_state[0].mu['a'], 0.1 * big['a'], rtol=1e-6)


def test_weight_decay_goes_to_the_right_argument():
  params = {'w': jnp.ones((4,))}
  zero = {'w': jnp.zeros((4,))}
  adamw = optimizers.make_optimizer('adamw', learning_rate=0.5, weight_decay=0.1)
  updates, _ = adamw.update(zero, adamw.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.5 * 0.1, rtol=1e-6)  # decay scaled by lr
  adafactor = optimizers.make_optimizer('adafactor', learning_rate=0.5, weight_decay=0.1)
  updates, _ = adafactor.update(zero, adafactor.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1, rtol=1e-6)  # absolute, as in T5X


def test_unknown_optimizer_raises():
  with pytest.raises(ValueError, match="'sgd'.*adafactor, adamw"):
    optimizers.make_optimizer('sgd')
