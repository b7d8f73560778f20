"""Autoregressive decoding over the KV cache: the encoder runs once per input, then one
`lax.while_loop` emits a token per step for every row until all rows reached EOS.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from t5x_lite.models import t5

EOS_ID = 1


def greedy_decode(model: t5.Transformer, params: Any, encoder_input_tokens: jax.Array,
                  max_decode_length: int, eos_id: int = EOS_ID) -> jax.Array:
  """Greedy (argmax) decoding. Returns [batch, max_decode_length] int32 tokens, EOS
  included, zeros after it. Rows of padding (all-zero inputs) decode to garbage that callers
  drop."""
  batch = encoder_input_tokens.shape[0]
  encoded = model.apply({'params': params}, encoder_input_tokens, method=t5.Transformer.encode)
  cache = t5.init_cache(model, params, encoded, encoder_input_tokens, max_decode_length)
  tokens = jnp.zeros((batch, max_decode_length), jnp.int32)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_decode_length) & ~jnp.all(done)

  def body(carry):
    i, tokens, cache, done, previous = carry
    logits, cache = t5.decode_step(model, params, cache, encoded, encoder_input_tokens,
                                   previous)
    token = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    return i + 1, tokens, cache, done | (token == eos_id), token

  start = (jnp.int32(0), tokens, cache, jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.int32))
  return jax.lax.while_loop(cond, body, start)[1]
