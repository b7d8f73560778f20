"""Adafactor holds the same factored second moments as T5X's, and updates like T5X's.

The reference is google-research/t5x `t5x/adafactor.py` as configured by its model gins
(`logical_factor_rules = @adafactor.standard_logical_factor_rules()`): a parameter of rank
<= 2 falls back to the heuristic (factor the two largest dimensions when the smaller is
>= min_dim_size_to_factor = 128, `_parse_rule(fallback_to_heuristics=True)`), a higher rank
follows the logical rules. Both are re-implemented here from that file, independently of
optax, and applied to our parameter shapes and logical axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import models
from t5x_lite.training import optimizers, state as state_lib

# t5x/adafactor.py standard_logical_factor_rules (the axes our parameters use).
ROW, COLUMN, NONE = 'row', 'column', 'none'
T5X_FACTOR_RULES = {'vocab': COLUMN, 'embed': ROW, 'mlp': COLUMN, 'heads': COLUMN,
                    'kv': COLUMN, 'joined_kv': COLUMN, 'relpos_buckets': NONE}
MIN_DIM_SIZE_TO_FACTOR = 128


def t5x_second_moment_elements(shape: tuple[int, ...], axes: tuple[str, ...]) -> int:
  """Elements of T5X's v_row + v_col (factored) or v (not) for one parameter."""
  if len(shape) <= 2:  # fallback to the heuristic (Adafactor._factored_dims)
    if len(shape) < 2 or sorted(shape)[-2] < MIN_DIM_SIZE_TO_FACTOR:
      return int(np.prod(shape))
    return int(sum(shape))
  rule = [T5X_FACTOR_RULES[a] for a in axes]  # set_param_axes + _parse_rule, rank > 2
  if ROW not in rule or COLUMN not in rule:
    return int(np.prod(shape))
  rows = int(np.prod([n for n, r in zip(shape, rule) if r != ROW]))    # v_row: rows kept
  cols = int(np.prod([n for n, r in zip(shape, rule) if r != COLUMN]))
  return rows + cols


def our_second_moment_elements(opt_state) -> int:
  """Elements of optax's v_row, v_col and v, without its (1,)-shaped placeholders."""
  factored = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.FactoredState)) if isinstance(s, optax.FactoredState)]
  assert len(factored) == 1
  leaves = jax.tree.leaves((factored[0].v_row, factored[0].v_col, factored[0].v))
  return sum(int(np.prod(x.shape)) for x in leaves if tuple(x.shape) != (1,))


@pytest.mark.parametrize('size', ['small', 'xl', 'xxl'])
def test_factored_state_has_t5xs_element_count(size):
  config = models.preset('flan_t5', size)
  optimizer = optimizers.OptimizerConfig().build()
  model = models.build(config)
  shapes = jax.eval_shape(lambda: state_lib._init(model, optimizer, jax.random.key(0)))  # pylint: disable=protected-access
  boxed = models.abstract_params(config)
  axes = jax.tree.leaves(nn.get_partition_spec(boxed),
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  params = jax.tree.leaves(nn.unbox(boxed))
  assert len(axes) == len(params)
  expected = sum(t5x_second_moment_elements(tuple(p.shape), tuple(a))
                 for p, a in zip(params, axes))
  assert our_second_moment_elements(shapes.opt_state) == expected
  # Every matrix is factored: the statistics are a tiny fraction of the parameters
  # (flan-t5-small: 246,912 of 76,961,152; stored [embed, heads, kv] it was 19.0M).
  assert expected < 0.004 * models.num_params(config)


def numpy_adafactor(param, grad, steps, lr=1e-3, decay_exponent=0.8, eps1=1e-30, eps2=1e-3,
                    clipping_threshold=1.0):
  """T5X's Adafactor.apply_param_gradient for a factored 2-D parameter, float64, no
  momentum, no weight decay: `steps` updates with the same gradient. T5X's "rows" are the
  smaller dimension d1 (v_row averages over the larger d0), `_factored_dims`."""
  param, grad = param.astype(np.float64), grad.astype(np.float64)
  d1, d0 = np.argsort(param.shape)[-2:]
  v_row, v_col = np.zeros(param.shape[d1]), np.zeros(param.shape[d0])
  clipped = False
  for step in range(steps):
    decay = 1.0 - (step + 1.0) ** -decay_exponent
    scale = lr * max(np.sqrt(np.mean(param * param)), eps2)
    grad_sqr = grad * grad + eps1
    v_row = decay * v_row + (1 - decay) * grad_sqr.mean(axis=d0)
    v_col = decay * v_col + (1 - decay) * grad_sqr.mean(axis=d1)
    row_factor = (v_row / v_row.mean()) ** -0.5
    col_factor = v_col ** -0.5
    y = grad * np.expand_dims(row_factor, d0) * np.expand_dims(col_factor, d1)
    clipping_denominator = max(1.0, np.sqrt(np.mean(y * y)) / clipping_threshold)
    clipped |= clipping_denominator > 1.0
    y /= clipping_denominator
    update = -scale * y
    param = param + update
  return param, update, clipped


@pytest.mark.parametrize('kind', ['smooth', 'heavy_tailed', 'below_epsilon1'])
def test_factored_update_equals_t5xs_formula(kind):
  d_model, joined = 512, 6 * 64   # a flan-t5-small attention kernel, [embed, joined_kv]
  rng = np.random.default_rng(0)
  param = (rng.standard_normal((d_model, joined)) * 0.05).astype(np.float32)
  # Rows and columns of different scales, so that the factored estimate is not uniform.
  grad = (rng.standard_normal((d_model, joined)) * rng.uniform(0.1, 3, (d_model, 1))
          * rng.uniform(0.1, 3, (1, joined)))
  if kind == 'heavy_tailed':   # far from rank-1 second moments: the update RMS gets clipped
    grad = rng.standard_t(1.5, (d_model, joined))
  elif kind == 'below_epsilon1':   # grad**2 ~ 1e-32 < epsilon1 = 1e-30
    grad = grad * 1e-16
  grad = grad.astype(np.float32)
  optimizer = optimizers.OptimizerConfig().build()   # the run default: T5's Adafactor
  params = {'query': jnp.asarray(param)}
  state = optimizer.init(params)
  assert state[0].v_row['query'].shape == (joined,)   # factored: rows = the smaller dim
  for _ in range(3):
    updates, state = optimizer.update({'query': jnp.asarray(grad)}, state, params)
    params = optax.apply_updates(params, updates)
  expected, expected_update, clipped = numpy_adafactor(param, grad, steps=3)
  assert clipped == (kind != 'below_epsilon1')   # both branches of the clipping run
  np.testing.assert_allclose(np.asarray(params['query']), expected, atol=1e-6, rtol=0)
  # The last update itself (not only the parameters) agrees to fp32 precision.
  np.testing.assert_allclose(np.asarray(updates['query']), expected_update, rtol=2e-5,
                             atol=1e-12)
