"""Backend-specific kernels, chosen once from the platform of the mesh in use.

Models, losses and decoding call a `Kernels` object and never probe the backend
themselves. `for_mesh(mesh)` (or `for_platform`) picks the XLA:CPU kernels below on CPU and
plain XLA everywhere else (TPU and GPU fold layouts and transposes into their matmuls);
`Kernels('plain')` forces the plain path on any platform. Both compute the same function:
tests/models/test_kernels.py checks logits and gradients of the two paths within 1e-5.

Attention (`Kernels.attention`, the field): 'plain' (CPU, TPU: the model's own two matmuls and
f32 softmax) or `jax.nn.dot_product_attention` with `implementation=` 'cudnn' (GPU: cuDNN's
fused flash attention, chosen by `for_platform('gpu')`) or 'xla' (the same call on any
backend: how the CPU tests exercise this path). `fused_attention` takes T5's additive bias
(relative positions + the padding/segment mask as NEG_INF, [B, H, T, S]) as `bias=`, no
scaling (T5 folds it into the init); it answers None where the call is one the fused kernel
does not take (dropout on the probabilities, fp32 activations or a head dim cuDNN rejects, an
odd length with a bias in training), and the model then runs its plain path. The decode path
(a KV cache, one query) stays plain everywhere.

XLA:CPU kernels:
- `matmul`: XLA:CPU gives a dot to YNNPACK (~210 GFLOP/s fp32 here, 2 cores) only when
  neither operand is read transposed; otherwise Eigen runs it (150-190 GFLOP/s) or, for
  bf16, XLA converts it to f32. The forward x @ w is plain; the weight gradient x^T g reads
  x transposed.
  fp32: dw is computed from an explicit copy of x^T behind an optimization_barrier (XLA
    would fold a bare transpose back into the dot). x [2048, 512], g [2048, 384]: 5.35 ->
    4.63 ms; [2048, 1024] x [2048, 512]: 13.3 -> 11.1 ms; flan-t5-small fp32 train step,
    best of 8: 2.48 -> 2.43 s in two A/B rounds (medians within this host's noise).
  bf16 (AVX512-BF16 or AMX): YNNPACK's native bf16 dot (2x the fp32 rate) needs an f32
    result and no transposed operand. `_bf16_matmul` asks for f32 and rounds to bf16 (the
    value a bf16 dot returns); its backward materialises each transposed operand with one
    zero row or column appended and slices that off the product (a barrier does not do:
    XLA still upcasts). [2048, 512] x [512, 1024] forward 11.4 -> 5.7 ms, dx 13.2 -> 7.7 ms,
    dw 12.8 -> 8.6 ms; flan-t5-small bf16 train step 2.73 -> 1.84 s.
- `layout_barrier`: the attention matmuls' operands laid out heads-major by an explicit
  copy. Left to itself XLA:CPU computed (probs @ v)^T and transposed the innermost axis
  back: ~9 of 38 ms per flan-t5-small encoder layer (batch 8 x 256).
- `argmax`: the first index of the maximum as two plain reductions: XLA:CPU's (value, index)
  reduce takes 0.62 ms on [8, 32128] logits (once per greedy step), this 0.19 ms; on a
  train step's [8, 64, 32128] logits (the accuracy metric) 36 ms against 10 ms.
- `decode_jit`: on an AVX2-only CPU, XLA's non-YNNPACK dot path decodes greedily ~1.5x
  faster (YNNPACK re-packs every weight for the few rows a step multiplies); with AVX-512
  YNNPACK is faster (flan-t5-small beam 4: 3.1 vs 3.8 s), so the defaults stay there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from t5x_lite import cpu_features

PLATFORMS = ('cpu', 'plain')
ATTENTION = ('plain', 'xla', 'cudnn')
_CPU_DECODE_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The kernels of one platform: 'cpu' (XLA:CPU's, above) or 'plain' (jnp ops); `attention`:
  'plain', or the `implementation` of `jax.nn.dot_product_attention` ('xla', 'cudnn')."""
  platform: str = 'plain'
  attention: str = 'plain'

  def __post_init__(self):
    if self.platform not in PLATFORMS:
      raise ValueError(f'unknown kernels {self.platform!r}; use one of {PLATFORMS}')  # internal
    if self.attention not in ATTENTION:
      raise ValueError(f'unknown attention {self.attention!r}; use one of {ATTENTION}')  # internal

  def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype."""
    if self.platform == 'cpu' and x.dtype == w.dtype:
      if x.dtype == jnp.float32:
        return _f32_matmul(x, w)
      if x.dtype == jnp.bfloat16 and cpu_features.has_native_bf16():
        return _bf16_matmul(x, w)
    return x @ w

  def layout_barrier(self, x: jax.Array) -> jax.Array:
    """Keeps `x` in the layout it was computed in (identity on the plain path)."""
    return jax.lax.optimization_barrier(x) if self.platform == 'cpu' else x

  def argmax(self, logits: jax.Array) -> jax.Array:
    """First index of the maximum over the last axis, int32."""
    if self.platform != 'cpu':
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(is_max, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(first, vocab - 1)   # a NaN row: the last index

  def fused_attention(self, query: jax.Array, key: jax.Array, value: jax.Array,
                      bias: jax.Array, *, dropout: bool = False) -> jax.Array | None:
    """softmax(q k^T + bias) v, unscaled, through `jax.nn.dot_product_attention`: query
    [B, T, H, K], key/value [B, S, H, K], bias broadcastable to [B, H, T, S] (fp32; for cuDNN
    cast to the activations' dtype) -> [B, T, H, K]. None where `attention` is 'plain' or
    the call is one this implementation does not take (module docstring): run the plain path."""
    if self.attention == 'plain' or dropout:
      return None
    if self.attention == 'cudnn':
      if not _cudnn_takes(query, key, bias):
        return None
      # One bias per (row, head): the shape cuDNN's bias gradient is known to take (a
      # cross attention's mask is [B, 1, T, S]).
      shape = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
      bias = jnp.broadcast_to(bias.astype(query.dtype), shape)
    try:
      return jax.nn.dot_product_attention(query, key, value, bias=bias, scale=1.0,
                                          implementation=self.attention)
    except NotImplementedError:   # cuDNN's own checks (its version, the GPU's generation)
      return None

  def decode_jit(self, fn: Callable, **kwargs) -> Callable:
    """`jax.jit` for functions that decode (a `lax.while_loop` over the KV cache)."""
    options = _cpu_decode_options() if self.platform == 'cpu' else {}
    if options:
      kwargs.setdefault('compiler_options', options)
    return jax.jit(fn, **kwargs)


PLAIN = Kernels('plain')
CPU = Kernels('cpu')
GPU = Kernels('plain', attention='cudnn')


def for_platform(platform: str) -> Kernels:
  """XLA:CPU's kernels on 'cpu'; plain XLA with cuDNN's fused attention on 'gpu'; plain XLA
  on 'tpu' and anything else."""
  return {'cpu': CPU, 'gpu': GPU}.get(platform, PLAIN)


def for_mesh(mesh: jax.sharding.Mesh) -> Kernels:
  return for_platform(mesh.devices.flat[0].platform)


def default() -> Kernels:
  """The kernels of the default devices (what a model built without a mesh runs on)."""
  return for_platform(jax.devices()[0].platform)


def _cudnn_takes(query: jax.Array, key: jax.Array, bias: jax.Array) -> bool:
  """What cuDNN's flash attention takes (jax's `check_is_flash_attention`, the conservative
  side): fp16/bf16 activations, a head dim that is a multiple of 8 up to 128, even lengths
  (a bias in training needs them), the bias 4-D."""
  head_dim, length_q, length_kv = query.shape[-1], query.shape[1], key.shape[1]
  return (query.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
          and length_q % 2 == 0 and length_kv % 2 == 0 and bias.ndim == 4)


@functools.cache
def _cpu_decode_options() -> dict[str, str]:
  if cpu_features.has_avx512():
    return {}
  try:
    jax.jit(lambda: 0, compiler_options=_CPU_DECODE_OPTIONS).lower().compile()
    return _CPU_DECODE_OPTIONS
  except Exception:  # pylint: disable=broad-except  # an XLA without the option
    return {}


# --- the CPU matmuls ---------------------------------------------------------------------

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
