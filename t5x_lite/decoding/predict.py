"""What `predict` decodes with (greedy, beam or sampling) and the dispatch to each."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t5x_lite import validation
from t5x_lite.decoding import beam_search
from t5x_lite.decoding.sampling import EOS_ID, SamplingConfig, decode
from t5x_lite.models import Model


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


def predict(model: Model, params, encoder_input_tokens: jax.Array,
            max_decode_length: int, config: DecodingConfig = DecodingConfig(),
            eos_id: int = EOS_ID, limit: jax.Array | int | None = None,
            inputs_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Candidates per input: (tokens [batch, n, max_decode_length], scores [batch, n]) with
  n = 1 (greedy), num_beams (beam, best first) or num_samples (sample, in draw order).
  Scores are log-likelihoods (beam: length-penalised when alpha > 0). `limit`: see `decode`
  (greedy and sample; beam search always decodes max_decode_length). `inputs_mask`: the
  inputs' real tokens (default the nonzero ids: `models.interface.real_inputs`)."""
  batch = encoder_input_tokens.shape[0]
  if config.method == 'beam':
    if limit is not None:
      raise ValueError('beam search takes no limit: pass max_decode_length = the limit')  # internal
    return beam_search.beam_search(model, params, encoder_input_tokens, max_decode_length,
                                   config.num_beams, config.alpha, eos_id, config.beam_end,
                                   inputs_mask)
  if config.method == 'greedy':
    tokens, scores = decode(model, params, encoder_input_tokens, max_decode_length,
                            eos_id=eos_id, limit=limit, inputs_mask=inputs_mask)
    return tokens[:, None], scores[:, None]
  n = config.num_samples
  tokens, scores = decode(
      model, params, jnp.repeat(encoder_input_tokens, n, axis=0), max_decode_length,
      SamplingConfig(config.temperature, config.top_k, config.top_p),
      rng=jax.random.key(config.seed), eos_id=eos_id, limit=limit,
      inputs_mask=None if inputs_mask is None else jnp.repeat(inputs_mask, n, axis=0))
  return tokens.reshape(batch, n, -1), scores.reshape(batch, n)
