"""Autoregressive decoding over the model's cache: greedy and temperature / top-k / top-p
sampling. The model's `init_decode` does the inputs' work once (an encoder-decoder: the
encoder); one `lax.while_loop` emits a token per step for every row until all rows reached
EOS. Beam search is in `beam_search.py`; scoring of given targets is the model's
(`Model.score`, `Model.score_options`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from t5x_lite import kernels as kernels_lib, validation
from t5x_lite.models import Model

EOS_ID = 1
NEG_INF = -1e10


def jit(fn: Callable, kernels: kernels_lib.Kernels | None = None, **kwargs) -> Callable:
  """`jax.jit` for functions that decode, with the compiler options of `kernels` (default:
  the default devices'; pass `kernels.for_mesh(mesh)` when decoding on a mesh)."""
  return (kernels or kernels_lib.default()).decode_jit(fn, **kwargs)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0 and top_p 1.0 = no truncation."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    validation.check(self, {'temperature': '>= 0', 'top_k': '>= 0', 'top_p': '(0, 1]'})


def truncate_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Mask (to NEG_INF) all but the top-k logits and/or the smallest set of tokens whose
  probability reaches top_p (the most likely token is always kept)."""
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # the number of tokens needed to reach top_p, at least one
    keep = jnp.sum(cumulative < top_p, axis=-1, keepdims=True) + 1
    threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def _select_fn(sampling: SamplingConfig, argmax: Callable) -> Callable:
  def select(logits, rng):
    if sampling.temperature == 0.0:
      return argmax(logits)
    scaled = truncate_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  return select


def decode(model: Model, params: Any, encoder_input_tokens: jax.Array,
           max_decode_length: int, sampling: SamplingConfig = SamplingConfig(),
           rng: jax.Array | None = None, eos_id: int = EOS_ID,
           limit: jax.Array | int | None = None, inputs_mask: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """Greedy or sampled decoding. Returns (tokens [batch, max_decode_length] int32, EOS
  included and zeros after it; log-likelihood [batch] of those tokens under the model,
  untempered). Several samples per input: repeat the input rows.

  `limit` (<= max_decode_length, may be traced): decode at most that many tokens, zeros
  after; one compiled program then serves every shorter length (evaluation decodes each
  task to its own longest target). `inputs_mask`: the inputs' real tokens (default the
  nonzero ids: `models.interface.real_inputs`)."""
  batch = encoder_input_tokens.shape[0]
  limit = max_decode_length if limit is None else jnp.minimum(limit, max_decode_length)
  rng = jax.random.key(0) if rng is None else rng
  select = _select_fn(sampling, model.ops.argmax)
  context, cache = model.init_decode(params, encoder_input_tokens, max_decode_length,
                                     inputs_mask=inputs_mask)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < limit) & ~jnp.all(done)

  def body(carry):
    i, tokens, cache, done, previous, score = carry
    logits, cache = model.decode_step(params, context, cache, previous)
    token = select(logits, jax.random.fold_in(rng, i))
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    score = score + jnp.where(done, 0.0, log_prob)
    token = jnp.where(done, 0, token)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    return i + 1, tokens, cache, done | (token == eos_id), token, score

  start = (jnp.int32(0), jnp.zeros((batch, max_decode_length), jnp.int32), cache,
           jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,)))
  _, tokens, _, _, _, score = jax.lax.while_loop(cond, body, start)
  return tokens, score


def greedy_decode(model: Model, params: Any, encoder_input_tokens: jax.Array,
                  max_decode_length: int, eos_id: int = EOS_ID) -> jax.Array:
  """Greedy (argmax) tokens [batch, max_decode_length]."""
  return decode(model, params, encoder_input_tokens, max_decode_length, eos_id=eos_id)[0]
