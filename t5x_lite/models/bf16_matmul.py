"""A bf16 matmul whose forward AND backward run on the CPU's native bf16 dot instructions.

XLA:CPU runs a dot on YNNPACK's native bf16 kernel (bf16 x bf16 -> f32: 2x the fp32 rate
with AVX512-BF16) only when the dot asks for an f32 result and neither operand is read
transposed. A plain bf16 `x @ w` asks for bf16, and each of its gradient products reads one
operand transposed (dx = g w^T, dw = x^T g): XLA then converts the operands to f32 and all
three run at the fp32 rate, so a bf16 train step is no faster than an fp32 one.

`matmul` asks for f32 and rounds the result to bf16 (the value a bf16 dot returns). Its
backward materialises each transposed operand with one zero row or column appended and
slices that off the product. A plain transposed copy would not do: XLA folds a transpose
back into the dot it feeds, and the dot then falls back to f32; through the concatenate it
cannot fold. The copies cost ~4% of a flan-t5-small bf16 train step (the largest, the output
layer's [32128, 513], ~7 ms).

Measured on an AVX512-BF16 CPU, 2 cores: [2048, 512] x [512, 1024] forward 11.4 -> 5.7 ms,
dx 13.2 -> 7.7 ms, dw 12.8 -> 8.6 ms; the flan-t5-small bf16 train step 2.73 -> 1.84 s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_lite import cpu_features


def applies(x: jax.Array, w: jax.Array) -> bool:
  """Whether `matmul` should replace x @ w: both bf16, on a CPU with native bf16 dots
  (elsewhere XLA already runs bf16 dots natively, or emulates them either way)."""
  return (x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16
          and jax.default_backend() == 'cpu' and cpu_features.has_native_bf16())


def _dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _transpose_plus_zeros(a: jax.Array, axis: int) -> jax.Array:
  """a^T with one slice of zeros appended along `axis`: an array XLA must materialise."""
  t = a.T
  zeros_shape = tuple(1 if i == axis else n for i, n in enumerate(t.shape))
  return jnp.concatenate([t, jnp.zeros(zeros_shape, a.dtype)], axis=axis)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype, accumulated in f32."""
  return _dot_f32(x, w).astype(x.dtype)


def _matmul_fwd(x, w):
  return matmul(x, w), (x, w)


def _matmul_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  dx = _dot_f32(g, _transpose_plus_zeros(w, axis=1))[:, :-1]  # g @ w^T
  dw = _dot_f32(_transpose_plus_zeros(x, axis=0), g)[:-1]  # x^T @ g
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
