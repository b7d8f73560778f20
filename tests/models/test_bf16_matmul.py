"""bf16_matmul: a bf16 x @ w whose forward and gradients stay on XLA:CPU's native bf16 dot."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import cpu_features
from t5x_lite.models import bf16_matmul


def _bf16(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


def _f64(a):
  return np.asarray(a.astype(jnp.float32), np.float64)


def _assert_bf16_close(got, want):
  """Equal up to bf16 rounding of the result (8 significant bits) and f32 accumulation."""
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(_f64(got), want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())


def _loss(matmul, cotangent):
  return lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32) * cotangent)


@pytest.mark.parametrize('m,k,n', [(64, 48, 40), (5, 3, 7), (1, 16, 9)])
def test_value_and_gradients_are_the_exact_products_rounded_to_bf16(m, k, n):
  rng = np.random.default_rng(m)
  x, w = _bf16(rng, (m, k)), _bf16(rng, (k, n), 0.2)
  g = _bf16(rng, (m, n))  # bf16, so the cotangent reaching the matmul is exactly g
  dx, dw = jax.jit(jax.grad(_loss(bf16_matmul.matmul, g.astype(jnp.float32)),
                            argnums=(0, 1)))(x, w)
  _assert_bf16_close(jax.jit(bf16_matmul.matmul)(x, w), _f64(x) @ _f64(w))
  _assert_bf16_close(dx, _f64(g) @ _f64(w).T)
  _assert_bf16_close(dw, _f64(x).T @ _f64(g))


def test_gradients_equal_autodiff_of_the_plain_bf16_matmul():
  rng = np.random.default_rng(1)
  x, w = _bf16(rng, (32, 24)), _bf16(rng, (24, 16), 0.2)
  c = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
  ours = jax.jit(jax.grad(_loss(bf16_matmul.matmul, c), argnums=(0, 1)))(x, w)
  plain = jax.jit(jax.grad(_loss(jnp.matmul, c), argnums=(0, 1)))(x, w)
  for a, b in zip(ours, plain):
    _assert_bf16_close(a, _f64(b))


def _dot_operand_types(hlo_text):
  """(lhs, rhs, out) element types of every dot in an optimized HLO module."""
  found = []
  for computation in re.split(r'\n(?=\S)', hlo_text):
    types = dict(re.findall(r'(?:^|\s|\()%?([\w.\-]+)(?: = |: )(\w+)\[', computation))
    for out, lhs, rhs in re.findall(r'= (\w+)\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)',
                                    computation):
      found.append((types.get(lhs), types.get(rhs), out))
  return found


@pytest.mark.skipif(not (jax.default_backend() == 'cpu' and cpu_features.has_native_bf16()),
                    reason='the native bf16 dot path exists on CPUs with AVX512-BF16 or AMX')
def test_forward_and_both_gradient_products_run_as_native_bf16_dots():
  rng = np.random.default_rng(2)
  x, w = _bf16(rng, (256, 128)), _bf16(rng, (128, 192))
  c = jnp.ones((256, 192), jnp.float32)
  step = jax.jit(jax.value_and_grad(_loss(bf16_matmul.matmul, c), argnums=(0, 1)))
  dots = _dot_operand_types(step.lower(x, w).compile().as_text())
  assert len(dots) == 3 and set(dots) == {('bf16', 'bf16', 'f32')}, dots


def test_runs_where_xla_has_no_native_bf16_dot():
  """With XLA:CPU's YNNPACK dots off, XLA converts the operands to f32 itself: same values."""
  rng = np.random.default_rng(3)
  x, w = _bf16(rng, (48, 32)), _bf16(rng, (32, 40), 0.2)
  c = jnp.asarray(rng.standard_normal((48, 40)), jnp.float32)
  grad = jax.grad(_loss(bf16_matmul.matmul, c), argnums=(0, 1))
  options = {'xla_cpu_experimental_ynn_fusion_type': ''} if jax.default_backend() == 'cpu' else {}
  without = jax.jit(grad, compiler_options=options)(x, w)
  for a, b in zip(without, jax.jit(grad)(x, w)):
    _assert_bf16_close(a, _f64(b))


def test_applies_only_to_bf16_on_a_cpu_with_native_bf16():
  x32, x16 = jnp.ones((4, 4)), jnp.ones((4, 4), jnp.bfloat16)
  assert not bf16_matmul.applies(x32, x32)
  assert not bf16_matmul.applies(x16, x32)
  assert bf16_matmul.applies(x16, x16) == (jax.default_backend() == 'cpu'
                                           and cpu_features.has_native_bf16())
