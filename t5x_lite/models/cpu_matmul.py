"""x @ w whose gradient products run on XLA:CPU's fast dot kernel, as its forward does.

XLA:CPU gives a dot to YNNPACK (~210 GFLOP/s fp32 here, 2 cores) only when neither operand
is read transposed; otherwise Eigen runs it (150-190 GFLOP/s for these shapes) or, for bf16,
XLA converts it to f32. The forward x @ w is plain; the weight gradient dw = x^T g reads x
transposed. `matmul` keeps all three products on YNNPACK, on the CPU backend only:

fp32: dw is computed from an explicit copy of x^T behind an optimization_barrier (XLA would
  fold a bare transpose back into the dot). The copy costs less than the kernel saves:
  x [2048, 512], g [2048, 384]: 5.35 -> 4.63 ms; [2048, 1024] x [2048, 512]: 13.3 -> 11.1 ms.
  In the flan-t5-small fp32 train step (~70 ms predicted from its dots): the best of 8 steps
  2.48 -> 2.43 s in two A/B rounds, one process; the medians moved within this host's noise.

bf16 (CPUs with AVX512-BF16 or AMX): YNNPACK's native bf16 dot (2x the fp32 rate) needs an
  f32 result and no transposed operand. A plain bf16 `x @ w` asks for bf16, and both of its
  gradient products (dx = g w^T, dw = x^T g) read an operand transposed, so all three ran at
  the fp32 rate. `_bf16_matmul` asks for f32 and rounds the result to bf16 (the value a bf16
  dot returns); its backward materialises each transposed operand with one zero row or
  column appended and slices that off the product. A barrier does not do here: XLA still
  treats the operand as transposed and upcasts. The copies cost ~4% of a flan-t5-small bf16
  train step (the largest, the output layer's [32128, 513], ~7 ms). Measured on an
  AVX512-BF16 CPU, 2 cores: [2048, 512] x [512, 1024] forward 11.4 -> 5.7 ms, dx 13.2 ->
  7.7 ms, dw 12.8 -> 8.6 ms; the flan-t5-small bf16 train step 2.73 -> 1.84 s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_lite import cpu_features


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype; on CPU with the gradients described above."""
  if jax.default_backend() == 'cpu' and x.dtype == w.dtype:
    if x.dtype == jnp.float32:
      return _f32_matmul(x, w)
    if x.dtype == jnp.bfloat16 and cpu_features.has_native_bf16():
      return _bf16_matmul(x, w)
  return x @ w


@jax.custom_vjp
def _f32_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return x @ w


def _f32_matmul_fwd(x, w):
  return x @ w, (x, w)


def _f32_matmul_bwd(residuals, g):
  x, w = residuals
  return g @ w.T, jax.lax.optimization_barrier(x.T) @ g


_f32_matmul.defvjp(_f32_matmul_fwd, _f32_matmul_bwd)


def _dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _transpose_plus_zeros(a: jax.Array, axis: int) -> jax.Array:
  """a^T with one slice of zeros appended along `axis`: an array XLA must materialise."""
  t = a.T
  zeros_shape = tuple(1 if i == axis else n for i, n in enumerate(t.shape))
  return jnp.concatenate([t, jnp.zeros(zeros_shape, a.dtype)], axis=axis)


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """Accumulated in f32, rounded to bf16."""
  return _dot_f32(x, w).astype(x.dtype)


def _bf16_matmul_fwd(x, w):
  return _bf16_matmul(x, w), (x, w)


def _bf16_matmul_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  dx = _dot_f32(g, _transpose_plus_zeros(w, axis=1))[:, :-1]  # g @ w^T
  dw = _dot_f32(_transpose_plus_zeros(x, axis=0), g)[:-1]  # x^T @ g
  return dx.astype(x.dtype), dw.astype(w.dtype)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)
