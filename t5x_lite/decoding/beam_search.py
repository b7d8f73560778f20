"""Beam search with T5X's semantics (t5x/decoding.py `beam_search`), over the KV cache in one
`lax.while_loop`.

Every step extends the live beams by one token and keeps the best 2K candidates: those that
end in EOS compete for the K finished slots with score log p / ((5 + length) / 6) ** alpha
(alpha = 0: plain log-likelihood), the others become the K live beams. The search stops at
max_decode_length or as soon as no live beam can still beat the worst finished one.

How it ends (`end`):
- 't5x' (default, T5X's rule): an input's finished beams are returned, best first, however
  well a beam cut off by max_decode_length scores; finished slots never filled stay empty
  (zeros, score NEG_INF). Only for an input where no beam finished are its live beams
  returned, scored by their log-likelihood without the brevity penalty, as T5X's
  `jnp.where(any_finished, finished, live)` does.
- 'hf' (transformers' `generate`): the live beams cut by max_decode_length compete with the
  finished ones, scored with the brevity penalty at max_decode_length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from t5x_lite import validation
from t5x_lite.models import Model

NEG_INF = -1.0e7


def brevity_penalty(alpha: float, length: jax.Array) -> jax.Array:
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _gather_beams(x: jax.Array, beam_indices: jax.Array) -> jax.Array:
  """x [batch, beams, ...] indexed by beam_indices [batch, new_beams]."""
  return jnp.take_along_axis(x, beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2)),
                             axis=1)


ENDS = ('t5x', 'hf')


def beam_search(model: Model, params: Any, encoder_input_tokens: jax.Array,
                max_decode_length: int, num_beams: int = 4, alpha: float = 0.6,
                eos_id: int = 1, end: str = 't5x', inputs_mask: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """Returns (sequences [batch, num_beams, max_decode_length], scores [batch, num_beams]),
  best first; a sequence holds EOS and zeros after it. Scores are length-penalised
  log-likelihoods (plain log-likelihoods with alpha = 0); `end` as in the module docstring."""
  if end not in ENDS:
    raise validation.ConfigError(f'beam search end={end!r}: use one of {ENDS}')
  batch, k, length = encoder_input_tokens.shape[0], num_beams, max_decode_length
  # The inputs' work is done once per input (an encoder-decoder: the encoder, and its k
  # beams share its cross-attention keys/values).
  context, cache = model.init_decode(params, encoder_input_tokens, length, rows_per_input=k,
                                     inputs_mask=inputs_mask)

  live_seqs = jnp.zeros((batch, k, length), jnp.int32)
  live_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1))
  done_seqs = jnp.zeros((batch, k, length), jnp.int32)
  done_scores = jnp.full((batch, k), NEG_INF)
  done_flags = jnp.zeros((batch, k), bool)
  last = jnp.zeros((batch * k,), jnp.int32)

  def cond(state):
    i, _, live_logp, _, done_scores, _, _, _ = state
    # The best a live beam can still reach: its log-probability only falls, and its length
    # penalty is largest at max length (alpha >= 0).
    best_live = live_logp[:, 0] / brevity_penalty(alpha, jnp.asarray(length))
    worst_done = jnp.min(done_scores, axis=1)
    can_improve = jnp.any(best_live > worst_done)
    return (i < length) & can_improve

  def body(state):
    i, live_seqs, live_logp, done_seqs, done_scores, done_flags, cache, last = state
    logits, cache = model.decode_step(params, context, cache, last)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits).reshape(batch, k, vocab)
    candidates = (live_logp[:, :, None] + log_probs).reshape(batch, k * vocab)
    top_logp, top_index = jax.lax.top_k(candidates, 2 * k)
    beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    seqs = _gather_beams(live_seqs, beam)
    seqs = jax.lax.dynamic_update_slice(seqs, token[:, :, None], (0, 0, i))
    ended = token == eos_id

    # finished: the EOS candidates join the previous finished beams; keep the best K (the
    # others rank below the empty slots, which so stay empty: zeros, NEG_INF, unflagged)
    new_scores = jnp.where(ended, top_logp / brevity_penalty(alpha, i + 1), 2 * NEG_INF)
    all_scores = jnp.concatenate([done_scores, new_scores], axis=1)
    done_scores, keep = jax.lax.top_k(all_scores, k)
    done_seqs = _gather_beams(jnp.concatenate([done_seqs, seqs], axis=1), keep)
    done_flags = _gather_beams(jnp.concatenate([done_flags, ended], axis=1), keep)

    # live: the best K candidates that did not end
    live_candidates = jnp.where(ended, NEG_INF, top_logp)
    live_logp, keep = jax.lax.top_k(live_candidates, k)
    live_seqs = _gather_beams(seqs, keep)
    parent = _gather_beams(beam, keep)
    cache = model.reorder_cache(cache, parent)
    last = _gather_beams(token, keep).reshape(batch * k)
    return i + 1, live_seqs, live_logp, done_seqs, done_scores, done_flags, cache, last

  state = (jnp.int32(0), live_seqs, live_logp, done_seqs, done_scores, done_flags, cache, last)
  _, live_seqs, live_logp, done_seqs, done_scores, done_flags, _, _ = jax.lax.while_loop(
      cond, body, state)
  if end == 'hf':
    # Beams still live were cut by max_decode_length (after an early exit they cannot win).
    live_scores = live_logp / brevity_penalty(alpha, jnp.asarray(length))
    scores, keep = jax.lax.top_k(jnp.concatenate([done_scores, live_scores], axis=1), k)
    return _gather_beams(jnp.concatenate([done_seqs, live_seqs], axis=1), keep), scores
  any_done = jnp.any(done_flags, axis=1)
  return (jnp.where(any_done[:, None, None], done_seqs, live_seqs),
          jnp.where(any_done[:, None], done_scores, live_logp))
