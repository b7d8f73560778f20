"""A decoder-only transformer (Llama, Qwen2/2.5, Qwen3, Gemma) in flax.linen.

Pre-norm layers: x + attention(norm(x)), then x + gated_mlp(norm(x)); a final norm and the
output layer (tied to the embedding or its own). Its config is `DecoderOnlyConfig`
(decoder_only_config.py), the model interface `DecoderOnlyModel` (decoder_only_model.py).

Inputs follow the decoder-only batch contract (DESIGN.md): `decoder_input_tokens`,
optional `decoder_segment_ids` (packed rows: no attention across segments; 0 = padding),
`decoder_positions` (RoPE by position within a segment; default 0..L-1) and
`decoder_causal_attention` (read only with `inputs_bidirectional_attention`). The mask is
T5X's decoder-only one (flaxformer `dense_attention.make_decoder_mask`, used by
t5x/models.py `DecoderOnlyModel`): causal OR (both query and key marked in
`decoder_causal_attention`), AND same segment. seqio's `PrefixLMFeatureConverter` marks the
positions `< inputs_width + 1` (the inputs, seen shifted right by one, and the first target
position, whose decoder input is the last input token), so the inputs attend to each other
both ways. Unlike T5X, padding is told by segment id 0, never by token id 0 (decoder-only
vocabularies use id 0 for a real token); causal rows never see the trailing padding anyway.

Parameters carry logical axes (DESIGN.md): `vocab`, `embed`, `mlp`, `joined_kv` (the query
projection's heads * head_dim), `joined_kv_heads` (the key/value projections' kv_heads *
head_dim, which grouped-query attention makes smaller), `kv` (head_dim of q/k norms).

Adapters (`adapters`: a peft.AdapterSpec, as T5's): the seven projections (query, key,
value, out; wi_0 / wi_1 / wo, Hugging Face's q/k/v/o_proj and gate/up/down_proj) go through
`lora.adapted_dense`, the one stack named 'decoder' (`LoraSpec.stacks`), its banks routed per
token by `decoder_task_ids` (-1 on padding); with prompt tuning, token id -(k+1) embeds as
`prompt_embedding[k]` (the pipeline puts -1..-n first in every example's inputs), before the
embedding scaling of Gemma, as peft's prompt is concatenated to `inputs_embeds`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import kernels as kernels_lib
from t5x_lite.models import lora
from t5x_lite.models.decoder_only_config import DecoderOnlyConfig, inverse_frequencies
from t5x_lite.models.primitives import dense, param

NEG_INF = -1e10   # T5X's finite mask value (layers.NEG_INF): a fully masked row stays finite
STACK = 'decoder'   # the one stack's name in `peft.LoraSpec.stacks`

ACTIVATIONS: dict[str, Callable] = {
    'silu': jax.nn.silu,
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
}


def normal(stddev: float) -> Callable:
  return nn.initializers.normal(stddev=stddev)


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, axes)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, plus_one: bool) -> jax.Array:
  """Statistics and scaling in float32 (transformers' Llama and Gemma norms agree in fp32)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  s = scale.astype(jnp.float32)
  return ((1.0 + s) if plus_one else s) * y


class RMSNorm(nn.Module):
  config: DecoderOnlyConfig
  axis: str = 'embed'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    init = nn.initializers.zeros if c.norm_plus_one else nn.initializers.ones
    scale = param(self, 'scale', init, (x.shape[-1],), (self.axis,), c.parameter_dtype)
    return rms_norm(x, scale, c.rms_norm_eps, c.norm_plus_one).astype(c.activation_dtype)


def rotary(positions: jax.Array, c: DecoderOnlyConfig) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, L, 1, head_dim] of each token's position (halves repeated, as
  transformers' `rotate_half` convention pairs dimension i with i + head_dim / 2)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(c))
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


def attention_bias(length_q: int, segment_ids: jax.Array | None,
                   causal_attention: jax.Array | None, batch: int) -> jax.Array:
  """Additive mask [B, 1, 1, Q, K] (broadcast over kv heads and their query groups)."""
  idx = jnp.arange(length_q)
  mask = jnp.broadcast_to(idx[:, None] >= idx[None, :], (batch, length_q, length_q))
  if causal_attention is not None:
    bidirectional = causal_attention[:, :, None].astype(bool) & causal_attention[
        :, None, :].astype(bool)
    mask = mask | bidirectional
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]


class Attention(nn.Module):
  """Grouped-query attention with RoPE: query head h reads key/value head h // group."""
  config: DecoderOnlyConfig
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None

  def _proj(self, x, name, features, axes, bias, deterministic, routes=None):
    c = self.config
    w = param(self, name, normal(x.shape[-1] ** -0.5), (x.shape[-1], features), axes,
              c.parameter_dtype)
    y = lora.adapted_dense(self, name, x, w.astype(c.activation_dtype), axes, self.adapters,
                           STACK, routes, deterministic, self.kernels, c.parameter_dtype)
    if bias:
      b = param(self, f'{name}_bias', nn.initializers.zeros, (features,), axes[1:],
                c.parameter_dtype)
      y = y + b.astype(y.dtype)
    return y

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, cos: jax.Array, sin: jax.Array, *,
               deterministic: bool, cache_index: jax.Array | None = None,
               routes: Any = None) -> jax.Array:
    c = self.config
    b, length = x.shape[:2]
    h, g, k = c.num_heads, c.num_heads // c.num_kv_heads, c.head_dim
    kvh = c.num_kv_heads
    q = self._proj(x, 'query', h * k, ('embed', 'joined_kv'), c.qkv_bias, deterministic,
                   routes)
    key = self._proj(x, 'key', kvh * k, ('embed', 'joined_kv_heads'), c.qkv_bias, deterministic,
                     routes)
    value = self._proj(x, 'value', kvh * k, ('embed', 'joined_kv_heads'), c.qkv_bias,
                       deterministic, routes)
    q = q.reshape(b, length, h, k)
    key = key.reshape(b, length, kvh, k)
    value = value.reshape(b, length, kvh, k)
    if c.qk_norm:
      q = RMSNorm(c, axis='kv', name='query_norm')(q)
      key = RMSNorm(c, axis='kv', name='key_norm')(key)
    q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
    if cache_index is not None:
      key, value = self._update_cache(key, value, cache_index)
    q = constrain(q, ('batch', 'length', 'heads', 'kv')).reshape(b, length, kvh, g, k)
    scores = jnp.einsum('bqhgk,bshk->bhgqs', q, key).astype(jnp.float32) * (k ** -0.5)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(c.activation_dtype)
    probs = nn.Dropout(c.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum('bhgqs,bshk->bqhgk', probs, value).reshape(b, length, h * k)
    w_o = param(self, 'out', normal((h * k) ** -0.5), (h * k, x.shape[-1]),
                ('joined_kv', 'embed'), c.parameter_dtype)
    out = lora.adapted_dense(self, 'out', out, w_o.astype(c.activation_dtype),
                             ('joined_kv', 'embed'), self.adapters, STACK, routes,
                             deterministic, self.kernels, c.parameter_dtype)
    if c.out_bias:
      out = out + param(self, 'out_bias', nn.initializers.zeros, (x.shape[-1],), ('embed',),
                        c.parameter_dtype).astype(out.dtype)
    return constrain(out, ('batch', 'length', 'embed'))

  def _update_cache(self, key, value, index):
    """Decode: keys/values [B, L_max, KVH, K] in the cache; write this call's tokens at
    `index` (the whole prompt at 0 when prefilling, one token per step after) and attend
    over the full cache (the mask hides the slots not yet written). The cache's zeros are
    made by `decoder_only_model.empty_cache`, not by a pass through the model."""
    cached_key = self.variable('cache', 'cached_key')       # made by init_decode
    cached_value = self.variable('cache', 'cached_value')
    start = (0, index, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value,
                                                    key.astype(cached_key.value.dtype), start)
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), start)
    return cached_key.value, cached_value.value


class Mlp(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU (silu) or GeGLU (tanh GELU)."""
  config: DecoderOnlyConfig
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool, routes: Any = None) -> jax.Array:
    c = self.config
    d, f = x.shape[-1], c.intermediate_size

    def proj(name, h, shape, axes):
      w = param(self, name, normal(shape[0] ** -0.5), shape, axes, c.parameter_dtype)
      return lora.adapted_dense(self, name, h, w.astype(c.activation_dtype), axes,
                                self.adapters, STACK, routes, deterministic, self.kernels,
                                c.parameter_dtype)

    gate = proj('wi_0', x, (d, f), ('embed', 'mlp'))
    up = proj('wi_1', x, (d, f), ('embed', 'mlp'))
    hidden = constrain(ACTIVATIONS[c.activation](gate) * up, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(c.dropout_rate)(hidden, deterministic=deterministic)
    out = proj('wo', hidden, (f, d), ('mlp', 'embed'))
    return constrain(out, ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  config: DecoderOnlyConfig
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None

  @nn.compact
  def __call__(self, x, bias, cos, sin, deterministic, cache_index=None, routes=None):
    c = self.config
    drop = nn.Dropout(c.dropout_rate)
    h = RMSNorm(c, name='pre_attention_norm')(x)
    h = Attention(c, self.kernels, self.adapters, name='attention')(
        h, bias, cos, sin, deterministic=deterministic, cache_index=cache_index, routes=routes)
    x = x + drop(h, deterministic=deterministic)
    h = RMSNorm(c, name='pre_mlp_norm')(x)
    h = Mlp(c, self.kernels, self.adapters, name='mlp')(h, deterministic=deterministic,
                                                        routes=routes)
    return x + drop(h, deterministic=deterministic)


class DecoderOnly(nn.Module):
  """tokens [B, L] -> float32 logits [B, L, vocab]."""
  config: DecoderOnlyConfig
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None   # peft.AdapterSpec: LoRA banks / soft prompt beside the base

  def _embed(self, embedding: jax.Array, tokens: jax.Array) -> jax.Array:
    """Token embeddings; with prompt tuning, id -(k+1) is soft prompt token k."""
    c = self.config
    n = self.adapters.prompt_length if self.adapters is not None else 0
    if not n:
      return jnp.take(embedding, tokens, axis=0).astype(c.activation_dtype)
    prompt = param(self, 'prompt_embedding', normal(1.0), (n, c.hidden_size),
                   ('prompt', 'embed'), c.parameter_dtype)
    soft = jnp.take(prompt, jnp.clip(-tokens - 1, 0, n - 1), axis=0)
    hard = jnp.take(embedding, jnp.maximum(tokens, 0), axis=0)
    return jnp.where((tokens < 0)[..., None], soft.astype(c.activation_dtype),
                     hard.astype(c.activation_dtype))

  @nn.compact
  def __call__(self, decoder_input_tokens: jax.Array, decoder_segment_ids=None,
               decoder_positions=None, decoder_causal_attention=None, *,
               decoder_task_ids: jax.Array | None = None,
               enable_dropout: bool = False, decode: bool = False,
               cache_index: jax.Array | None = None, bias: jax.Array | None = None
               ) -> jax.Array:
    """`decode`: write keys/values into the cache at `cache_index` and attend with the
    given `bias` [B, 1, 1, L, L_max] (decoder_only_model builds it). `decoder_task_ids`
    (-1 on padding) route per-task/group adapters (a task id is its task slot); without
    them, params routed to one task (`peft.params.route`)."""
    c = self.config
    tokens = decoder_input_tokens
    batch, length = tokens.shape
    deterministic = not enable_dropout
    d = c.hidden_size
    tied_or_scaled = c.tie_word_embeddings or c.scale_embeddings
    embedding = param(self, 'embedding', normal(d ** -0.5 if tied_or_scaled else 1.0),
                      (c.vocab_size, d), ('vocab', 'embed'), c.parameter_dtype)
    x = self._embed(embedding, tokens)
    if c.scale_embeddings:
      x = x * jnp.asarray(d ** 0.5, c.activation_dtype)
    x = constrain(x, ('batch', 'length', 'embed'))
    if decoder_positions is None:
      decoder_positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    cos, sin = rotary(decoder_positions, c)
    if bias is None:
      bias = attention_bias(length, decoder_segment_ids,
                            decoder_causal_attention if c.inputs_bidirectional_attention
                            else None, batch)
    routes = None
    if self.adapters is not None and self.adapters.per_task and decoder_task_ids is not None:
      routes = lora.adapter_routes(self.adapters, decoder_task_ids)
    layer_cls = DecoderLayer
    if c.remat and not decode:
      layer_cls = nn.remat(DecoderLayer, static_argnums=(5,))
    for i in range(c.num_layers):
      x = layer_cls(c, self.kernels, self.adapters, name=f'layers_{i}')(
          x, bias, cos, sin, deterministic, cache_index if decode else None, routes)
    x = RMSNorm(c, name='final_norm')(x)
    if c.tie_word_embeddings:
      logits = dense(x, embedding.astype(c.activation_dtype).T, self.kernels)
    else:
      w = param(self, 'logits_dense', normal(d ** -0.5), (d, c.vocab_size), ('embed', 'vocab'),
                c.parameter_dtype)
      logits = dense(x, w.astype(c.activation_dtype), self.kernels)
    return constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))
