"""T5 building blocks: RMSNorm, embedding, relative position bias, attention with a KV cache, MLP.

Every parameter is created through `nn.with_logical_partitioning` with the logical axis
names of DESIGN.md (`vocab`, `embed`, `mlp`, `joined_kv`, `heads`, `relpos_buckets`), so
sharding is pure configuration (see `t5x_lite.partitioning`). Every kernel is 2-D, as in T5X
and Hugging Face (up to a transpose), which keeps conversion exact and cheap.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import kernels as kernels_lib, validation
from t5x_lite.models import lora as lora_lib
# The primitives live in primitives.py (lora.py builds on them too); t5.py uses them as
# layers.dense / layers._param.
from t5x_lite.models.primitives import dense, param as _param

# Large negative logit for masked attention positions (T5X's value: finite, so a fully
# masked row such as a padding query gives a uniform distribution instead of NaN).
NEG_INF = -1e10

Dtype = Any


def normal(stddev: float) -> Callable:
  return nn.initializers.normal(stddev=stddev)


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """Activation sharding hint; a no-op unless logical axis rules and a mesh are active."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, statistics in float32."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(variance + self.epsilon)
    scale = _param(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',),
                   self.param_dtype)
    return (scale.astype(jnp.float32) * y).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding looked up with a gather (a one-hot matmul costs ~40% more FLOPs)."""
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Callable = normal(1.0)
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN

  def setup(self):
    self.embedding = _param(self, 'embedding', self.embedding_init,
                            (self.num_embeddings, self.features), ('vocab', 'embed'),
                            self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits against the embedding matrix (tied output layer)."""
    return dense(x, self.embedding.astype(self.dtype).T, self.kernels)


@functools.lru_cache(maxsize=None)
def relative_position_bucket_table(bidirectional: bool, num_buckets: int,
                                   max_distance: int) -> np.ndarray:
  """T5's bucket of every relative position `key - query` in [-max_distance, max_distance].

  Positions farther than `max_distance` share the last bucket, so clipping a relative
  position into this range and looking it up is exact. Computed once on the host in
  float32, the precision of the reference implementations.
  """
  rel = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
  buckets = np.zeros_like(rel)
  n = num_buckets
  if bidirectional:
    n //= 2
    buckets += (rel > 0).astype(np.int64) * n
    dist = np.abs(rel)
  else:
    dist = np.maximum(-rel, 0)
  max_exact = n // 2
  safe = np.maximum(dist, 1).astype(np.float32)
  log_ratio = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(n - max_exact)).astype(np.int64)
  large = np.minimum(large, n - 1)
  buckets += np.where(dist < max_exact, dist, large)
  return buckets.astype(np.int32)


class RelativePositionBias(nn.Module):
  """Learned per-head bias indexed by the bucketed distance between key and query."""
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Callable = normal(1.0)

  @nn.compact
  def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[b, q] and [b, k] int positions -> bias [b, heads, q, k]."""
    table = jnp.asarray(relative_position_bucket_table(
        self.bidirectional, self.num_buckets, self.max_distance))
    rel = key_positions[:, None, :] - query_positions[:, :, None]
    buckets = table[jnp.clip(rel, -self.max_distance, self.max_distance) + self.max_distance]
    rel_embedding = _param(self, 'rel_embedding', self.embedding_init,
                           (self.num_buckets, self.num_heads), ('relpos_buckets', 'heads'),
                           self.param_dtype)
    values = jnp.take(rel_embedding.T.astype(self.dtype), buckets, axis=1)  # [h, b, q, k]
    return jnp.swapaxes(values, 0, 1)


def mask_to_bias(mask: jax.Array) -> jax.Array:
  return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


class MultiHeadAttention(nn.Module):
  """Unscaled dot-product attention (T5 folds the scale into the init) plus an additive bias.

  `bias` carries both the relative position bias and the mask. In decode mode a self
  attention keeps `cached_key`/`cached_value` of length max_decode_length and writes one
  position per step; a cross attention projects the encoder output once, when the cache is
  created, and reuses it at every step.
  """
  num_heads: int
  head_dim: int
  is_cross_attention: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None          # peft.AdapterSpec: LoRA on the projections it targets
  stack: str = 'encoder'

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, bias: jax.Array, *,
               deterministic: bool, decode: bool = False,
               decode_position: jax.Array | None = None, rows_per_input: int = 1,
               routes_q: Any = None, routes_kv: Any = None) -> jax.Array:
    d_model, h, k = inputs_q.shape[-1], self.num_heads, self.head_dim
    # Stored 2-D, [embed, joined_kv] and [joined_kv, embed], as T5X stores them: Adafactor
    # then factors their second moments (optax, like T5X's fallback for rank <= 2, factors
    # the two largest dimensions). Stored [embed, heads, kv] with d_kv = 64 they were not.
    w_q = _param(self, 'query', normal((d_model * k) ** -0.5), (d_model, h * k),
                 ('embed', 'joined_kv'), self.param_dtype)
    w_k = _param(self, 'key', normal(d_model ** -0.5), (d_model, h * k), ('embed', 'joined_kv'),
                 self.param_dtype)
    w_v = _param(self, 'value', normal(d_model ** -0.5), (d_model, h * k),
                 ('embed', 'joined_kv'), self.param_dtype)
    w_o = _param(self, 'out', normal((h * k) ** -0.5), (h * k, d_model), ('joined_kv', 'embed'),
                 self.param_dtype)

    def project(x, w, name, routes):
      y = self._dense(name, x, w, ('embed', 'joined_kv'), routes, deterministic)
      return constrain(y.reshape(y.shape[:-1] + (h, k)), ('batch', 'length', 'heads', 'kv'))

    def heads_major(x):
      return constrain(jnp.swapaxes(x, 1, 2), ('batch', 'heads', 'length', 'kv'))

    # Training keeps [B, L, H, K]. The decode cache holds keys/values heads-major [B, H, L, K],
    # the layout of the attention matmuls: a decode step reads it without re-laying it out.
    query = project(inputs_q, w_q, 'query', routes_q)
    if decode and self.is_cross_attention:
      key = self.variable('cache', 'cached_key',
                          lambda: heads_major(project(inputs_kv, w_k, 'key', routes_kv)))
      value = self.variable('cache', 'cached_value',
                            lambda: heads_major(project(inputs_kv, w_v, 'value', routes_kv)))
      key, value = key.value, value.value
    else:
      key = project(inputs_kv, w_k, 'key', routes_kv)
      value = project(inputs_kv, w_v, 'value', routes_kv)
      if decode:
        key, value = self._update_self_cache(heads_major(key), heads_major(value),
                                             decode_position, rows_per_input)

    out_proj = functools.partial(self._dense, 'out', w=w_o, axes=('joined_kv', 'embed'),
                                 routes=routes_q, deterministic=deterministic)
    if decode:
      return self._decode_attention(query, key, value, bias, out_proj)
    fused = self.kernels.fused_attention(query, key, value, bias, dropout=(
        self.dropout_rate > 0 and not deterministic))                        # [B, Q, H, K]
    if fused is not None:   # e.g. cuDNN's flash attention on a GPU (see `t5x_lite.kernels`)
      out = out_proj(x=fused.reshape((inputs_q.shape[0], inputs_q.shape[1], h * k)))
      return constrain(out, ('batch', 'length', 'embed'))
    # The two attention matmuls on heads-major operands, each laid out by an explicit copy
    # behind the platform's layout barrier (XLA:CPU otherwise transposes the innermost axis:
    # see `t5x_lite.kernels`; other platforms fold the transposes into their matmuls).
    barrier = self.kernels.layout_barrier
    q = barrier(heads_major(query))                                           # [B, H, Q, K]
    k_t = barrier(constrain(key.transpose(0, 2, 3, 1), ('batch', 'heads', 'kv', 'length')))
    v = barrier(heads_major(value))                                           # [B, H, S, K]
    scores = jnp.matmul(q, k_t).astype(jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.swapaxes(barrier(jnp.matmul(probs, v)), 1, 2)                  # [B, Q, H, K]
    out = out_proj(x=out.reshape((inputs_q.shape[0], inputs_q.shape[1], h * k)))
    return constrain(out, ('batch', 'length', 'embed'))

  def _dense(self, name, x, w, axes, routes, deterministic):
    return lora_lib.adapted_dense(self, name, x, w, axes, self.adapters, self.stack, routes,
                                  deterministic, self.kernels)

  def _decode_attention(self, query, key, value, bias, out_proj):
    """Attention of a decode step against heads-major keys/values [B, H, S, K]. Beam search
    decodes n = query batch / key batch rows per input against one copy of that input's keys
    and values (n = 1 otherwise): the n rows join the query length, so the matmuls are
    batched over (B, H) with no copy of the keys/values per beam. `bias` is
    [B or 1, H or 1, 1 or n * Q, S], its third axis ordered (row, query position)."""
    batch_q, length_q, h, k = query.shape
    batch_kv = key.shape[0]
    n = batch_q // batch_kv
    query = query.reshape(batch_kv, n, length_q, h, k).transpose(0, 3, 1, 2, 4)
    query = query.reshape(batch_kv, h, n * length_q, k)
    if length_q == 1 and n > 1:
      # One matrix-vector product per row: XLA:CPU's dot runs [n, K] x [S, K]^T per (B, H)
      # ~5x slower than n [1, K] x [S, K]^T (2-core AVX2, flan-t5-small beam 4).
      scores = jnp.concatenate([jnp.einsum('bhqk,bhsk->bhqs', query[:, :, i:i + 1], key)
                                for i in range(n)], axis=2)
    else:
      scores = jnp.einsum('bhqk,bhsk->bhqs', query, key)
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqs,bhsk->bhqk', probs, value)
    out = out.reshape(batch_kv, h, n, length_q, k).transpose(0, 2, 3, 1, 4)
    out = out_proj(x=out.reshape(batch_q, length_q, h * k))
    return constrain(out, ('batch', 'length', 'embed'))

  def _update_self_cache(self, key, value, position, rows_per_input):
    """First call (cache creation, full-length dummy input): allocate. Later: write one step.

    The n rows of an input share one cache [B, H, L * n, K] (position-major, so a step
    writes one contiguous [n, K] block per head) and attend over all of it with a mask that
    picks each row's own history (see `t5.Decoder`): beam search then reorders a small
    [B, n, L] table of slots instead of copying the cache every step, as T5X and
    transformers do (~12% of a flan-t5-small beam-4 step on CPU).
    """
    rows, h, length, k = key.shape  # [B * n, H, L (creation) or 1, K]
    n = rows_per_input
    initialized = self.has_variable('cache', 'cached_key')
    shape = (rows // n, h, length * n, k)
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, shape, key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, shape, value.dtype)
    if not initialized:
      return key, value

    def write(cache, new):
      new = new.reshape(rows // n, n, h, k).transpose(0, 2, 1, 3)  # [B, H, n, K]
      cache = jax.lax.dynamic_update_slice(cache, new, (0, 0, position * n, 0))
      return constrain(cache, ('batch', 'heads', 'length', 'kv'))

    cached_key.value = write(cached_key.value, key)
    cached_value.value = write(cached_value.value, value)
    return cached_key.value, cached_value.value


ACTIVATIONS: dict[str, Callable] = {
    'relu': jax.nn.relu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'silu': jax.nn.silu,
}


def parse_feed_forward_proj(spec: str) -> tuple[str, bool]:
  """'relu' -> ('relu', False); 'gated-gelu' -> ('gelu_new', True) as in T5 v1.1 / HF."""
  parts = spec.split('-')
  gated = len(parts) == 2 and parts[0] == 'gated'
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise validation.ConfigError(f"feed_forward_proj {spec!r} must be 'ACT' or 'gated-ACT'")
  act = 'gelu_new' if spec == 'gated-gelu' else parts[-1]
  if act not in ACTIVATIONS:
    raise validation.ConfigError(f'feed_forward_proj {spec!r}: unknown activation {act!r}; '
                                 f'known: {sorted(ACTIVATIONS)}')
  return act, gated


class MlpBlock(nn.Module):
  """Position-wise feed-forward: `wi` (ReLU, T5 v1.0) or gated `wi_0 * wi_1` (v1.1 family)."""
  d_ff: int
  feed_forward_proj: str = 'relu'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None          # peft.AdapterSpec: LoRA on the projections it targets
  stack: str = 'encoder'

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool, routes: Any = None) -> jax.Array:
    act_name, gated = parse_feed_forward_proj(self.feed_forward_proj)
    act = ACTIVATIONS[act_name]
    d_model = x.shape[-1]

    def dense_in(name):
      w = _param(self, name, normal(d_model ** -0.5), (d_model, self.d_ff), ('embed', 'mlp'),
                 self.param_dtype)
      return lora_lib.adapted_dense(self, name, x, w, ('embed', 'mlp'), self.adapters,
                                    self.stack, routes, deterministic, self.kernels)

    if gated:
      hidden = act(dense_in('wi_0')) * dense_in('wi_1')
    else:
      hidden = act(dense_in('wi'))
    hidden = constrain(hidden, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    w_o = _param(self, 'wo', normal(self.d_ff ** -0.5), (self.d_ff, d_model), ('mlp', 'embed'),
                 self.param_dtype)
    out = lora_lib.adapted_dense(self, 'wo', hidden, w_o, ('mlp', 'embed'), self.adapters,
                                 self.stack, routes, deterministic, self.kernels)
    return constrain(out, ('batch', 'length', 'embed'))
