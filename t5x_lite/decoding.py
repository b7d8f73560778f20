"""Autoregressive decoding over the KV cache: greedy and temperature / top-k / top-p
sampling, plus scoring of given targets. The encoder runs once per input; one
`lax.while_loop` emits a token per step for every row until all rows reached EOS.
Beam search is in `beam_search.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from t5x_lite import kernels as kernels_lib, validation
from t5x_lite.models import t5

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


def decode(model: t5.Transformer, params: Any, encoder_input_tokens: jax.Array,
           max_decode_length: int, sampling: SamplingConfig = SamplingConfig(),
           rng: jax.Array | None = None, eos_id: int = EOS_ID,
           limit: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
  """Greedy or sampled decoding. Returns (tokens [batch, max_decode_length] int32, EOS
  included and zeros after it; log-likelihood [batch] of those tokens under the model,
  untempered). Several samples per input: repeat the input rows.

  `limit` (<= max_decode_length, may be traced): decode at most that many tokens, zeros
  after; one compiled program then serves every shorter length (evaluation decodes each
  task to its own longest target)."""
  batch = encoder_input_tokens.shape[0]
  limit = max_decode_length if limit is None else jnp.minimum(limit, max_decode_length)
  rng = jax.random.key(0) if rng is None else rng
  select = _select_fn(sampling, model.ops.argmax)
  encoded = model.apply({'params': params}, encoder_input_tokens, method=t5.Transformer.encode)
  cache = t5.init_cache(model, params, encoded, encoder_input_tokens, max_decode_length)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < limit) & ~jnp.all(done)

  def body(carry):
    i, tokens, cache, done, previous, score = carry
    logits, cache = t5.decode_step(model, params, cache, encoded, encoder_input_tokens,
                                   previous)
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


def greedy_decode(model: t5.Transformer, params: Any, encoder_input_tokens: jax.Array,
                  max_decode_length: int, eos_id: int = EOS_ID) -> jax.Array:
  """Greedy (argmax) tokens [batch, max_decode_length]."""
  return decode(model, params, encoder_input_tokens, max_decode_length, eos_id=eos_id)[0]


def score(model: t5.Transformer, params: Any, encoder_input_tokens: jax.Array,
          target_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Log-likelihood of given targets (EOS included, 0 = padding), teacher-forced in one
  pass: (sum [batch], per-token [batch, length] with 0 on padding). Rank classification
  scores each option this way and picks the most likely."""
  logits = model.apply({'params': params}, encoder_input_tokens, _shift_right(target_tokens))
  return _log_likelihood(logits, target_tokens)


def score_options(model: t5.Transformer, params: Any, encoder_input_tokens: jax.Array,
                  option_targets: jax.Array) -> jax.Array:
  """Log-likelihood [batch, options] of each input's options (targets [batch, options,
  length], EOS included, 0 = padding; an all-padding option scores 0). The encoder runs once
  per input and all its options decode, teacher-forced, against that output: `score` on
  every (input, option) pair up to float rounding, without encoding the input once per
  option (T5X's and FLAN's rank classification score each pair as its own example)."""
  batch, n, length = option_targets.shape
  encoded = model.apply({'params': params}, encoder_input_tokens, method=t5.Transformer.encode)
  targets = option_targets.reshape(batch * n, length)
  logits = model.apply({'params': params}, jnp.repeat(encoded, n, axis=0),
                       jnp.repeat(encoder_input_tokens, n, axis=0), _shift_right(targets),
                       method=t5.Transformer.decode)
  return _log_likelihood(logits, targets)[0].reshape(batch, n)


def _shift_right(target_tokens: jax.Array) -> jax.Array:
  """Decoder inputs: start token 0, then the targets but their last."""
  return jnp.pad(target_tokens[:, :-1], ((0, 0), (1, 0)))


def _log_likelihood(logits: jax.Array, target_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), target_tokens[..., None],
                                  axis=-1)[..., 0]
  per_token = jnp.where(target_tokens > 0, log_probs, 0.0)
  return per_token.sum(axis=-1), per_token


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How `predict` decodes (what gin_configs/decoding/*.gin bind)."""
  method: str = 'greedy'        # greedy | beam | sample
  num_beams: int = 4
  alpha: float = 0.6            # beam search brevity penalty exponent (T5X's default)
  beam_end: str = 't5x'         # 't5x': finished beams win; 'hf': cut beams compete (generate)
  temperature: float = 1.0      # sample
  top_k: int = 0
  top_p: float = 1.0
  num_samples: int = 1          # sample: independent samples per input
  seed: int = 0

  def __post_init__(self):
    if self.beam_end not in ('t5x', 'hf'):  # beam_search.ENDS
      raise validation.ConfigError(
          f"decoding.DecodingConfig.beam_end {self.beam_end!r}: use 't5x' (T5X: finished beams "
          "win) or 'hf' (transformers' generate: beams cut by the length compete)")
    validation.check(self, {'method': ('greedy', 'beam', 'sample'), 'num_beams': '>= 1',
                            'temperature': '>= 0', 'top_k': '>= 0',
                            'top_p': '(0, 1]', 'num_samples': '>= 1'})


def predict(model: t5.Transformer, params: Any, encoder_input_tokens: jax.Array,
            max_decode_length: int, config: DecodingConfig = DecodingConfig(),
            eos_id: int = EOS_ID, limit: jax.Array | int | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """Candidates per input: (tokens [batch, n, max_decode_length], scores [batch, n]) with
  n = 1 (greedy), num_beams (beam, best first) or num_samples (sample, in draw order).
  Scores are log-likelihoods (beam: length-penalised when alpha > 0). `limit`: see `decode`
  (greedy and sample; beam search always decodes max_decode_length)."""
  batch = encoder_input_tokens.shape[0]
  if config.method == 'beam':
    if limit is not None:
      raise ValueError('beam search takes no limit: pass max_decode_length = the limit')  # internal
    from t5x_lite import beam_search  # pylint: disable=import-outside-toplevel
    return beam_search.beam_search(model, params, encoder_input_tokens, max_decode_length,
                                   config.num_beams, config.alpha, eos_id, config.beam_end)
  if config.method == 'greedy':
    tokens, scores = decode(model, params, encoder_input_tokens, max_decode_length,
                            eos_id=eos_id, limit=limit)
    return tokens[:, None], scores[:, None]
  n = config.num_samples
  tokens, scores = decode(
      model, params, jnp.repeat(encoder_input_tokens, n, axis=0), max_decode_length,
      SamplingConfig(config.temperature, config.top_k, config.top_p),
      rng=jax.random.key(config.seed), eos_id=eos_id, limit=limit)
  return tokens.reshape(batch, n, -1), scores.reshape(batch, n)
