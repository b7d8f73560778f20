"""Decoder-only models (Llama, Qwen2/2.5, Qwen3, Gemma) behind the model interface, as
T5X's `DecoderOnlyModel`: one stack reads inputs and targets concatenated.

`logits` reads the decoder-only batch contract (DESIGN.md) as it comes. `score`,
`score_options` and `init_decode` take the interface's (inputs, targets) pairs and lay each
row out as a causal LM reads it, as Hugging Face does: no start token, the prompt's own
tokens (a tokenizer's BOS included) then the targets; the logits at the last prompt token
predict the first target. Inputs are right-padded; `inputs_mask` marks their tokens (default
the nonzero ids: `interface.real_inputs`; a prompt must hold at least one token), and placed
left-padded (masked, positions starting at 0 on the first real token) so that all rows'
prompts end at the same index. With `inputs_bidirectional_attention` the prompt tokens
attend to each other both ways (T5X's prefix LM).

Adapters (`adapters`: a peft.AdapterSpec, as the T5 family's): LoRA banks on the seven
projections and a soft prompt (decoder_only.py); `logits` routes per-task banks by the
batch's `decoder_task_ids`; scoring and decoding take params routed to one task
(`peft.params.route`), as T5's do.

Decoding: `init_decode` runs the whole prompt in one pass (prefill), keeps its keys/values
in a cache of prompt + `max_decode_length` slots and the logits of its last token; the
first `decode_step` returns those logits, each later one runs the previous token.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from t5x_lite.models import decoder_only, decoder_only_memory
from t5x_lite.models.decoder_only_config import DecoderOnlyConfig
from t5x_lite.models.interface import ActivationBytes, Model, log_likelihood, real_inputs

FEATURES = ('decoder_input_tokens', 'decoder_segment_ids', 'decoder_positions',
            'decoder_causal_attention',
            'decoder_task_ids')   # task ids route per-task adapters (ignored otherwise)


def left_pad(inputs: jax.Array, real: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Right-padded rows [B, L] whose tokens `real` marks -> (left-padded rows, pad count
  [B])."""
  length = inputs.shape[1]
  idx = jnp.arange(length)
  used = jnp.max(jnp.where(real, idx + 1, 0), axis=1)     # last real + 1
  pad = length - used
  rolled = jnp.take_along_axis(inputs, (idx[None, :] - pad[:, None]) % length, axis=1)
  return jnp.where(idx[None, :] >= pad[:, None], rolled, 0), pad


def empty_cache(c: DecoderOnlyConfig, rows: int, total: int) -> dict:
  """Zero keys/values [rows, total, kv_heads, head_dim] for every layer."""
  zeros = jnp.zeros((rows, total, c.num_kv_heads, c.head_dim), c.activation_dtype)
  return {f'layers_{i}': {'attention': {'cached_key': zeros, 'cached_value': zeros}}
          for i in range(c.num_layers)}


class DecoderOnlyModel(Model):
  """`config`: a `DecoderOnlyConfig`."""

  feature_kind = 'decoder_only'

  def __init__(self, config: DecoderOnlyConfig, kernels=None, adapters: Any = None):
    super().__init__(config, kernels, adapters)
    self.module = decoder_only.DecoderOnly(config, self.ops, adapters)

  def boxed_params(self, rng: jax.Array) -> Any:
    """The base's params are `DecoderOnly(config)`'s with this key whatever the adapters
    (flax draws a scope's params from one counter: adapters in between would shift them);
    the adapters' come from their own key."""
    one = jnp.ones((1, 1), jnp.int32)
    base = decoder_only.DecoderOnly(self.config).init(rng, one)['params']
    if self.adapters is None:
      return base
    ids = {'decoder_task_ids': one * 0} if self.adapters.per_task else {}
    full = traverse_util.flatten_dict(decoder_only.DecoderOnly(
        self.config, adapters=self.adapters).init(jax.random.fold_in(rng, 1), one,
                                                  **ids)['params'])
    return traverse_util.unflatten_dict({**full, **traverse_util.flatten_dict(base)})

  def logits(self, params: Any, batch: Mapping[str, jax.Array], *,
             enable_dropout: bool = False, rngs: Any = None) -> jax.Array:
    features = {k: batch[k] for k in FEATURES if k in batch}
    return self.module.apply({'params': params}, **features, enable_dropout=enable_dropout,
                             rngs=rngs)

  # --- scoring ------------------------------------------------------------------------------

  def _prompt_features(self, inputs: jax.Array, inputs_mask: jax.Array | None, extra: int
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Features of left-padded prompts followed by `extra` more tokens' slots."""
    prompt, pad = left_pad(inputs, real_inputs(inputs, inputs_mask))
    b, length = prompt.shape
    idx = jnp.arange(length + extra)[None, :]
    valid = idx >= pad[:, None]
    features = {'decoder_segment_ids': valid.astype(jnp.int32),
                'decoder_positions': jnp.maximum(idx - pad[:, None], 0).astype(jnp.int32),
                'decoder_causal_attention': (valid & (idx < length)).astype(jnp.int32)}
    return prompt, features

  def score(self, params: Any, inputs: jax.Array, targets: jax.Array, *,
            inputs_mask: jax.Array | None = None, targets_mask: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
    prompt, features = self._prompt_features(inputs, inputs_mask, targets.shape[1] - 1)
    tokens = jnp.concatenate([prompt, jnp.maximum(targets[:, :-1], 0)], axis=1)
    logits = self.logits(params, {'decoder_input_tokens': tokens, **features})
    return log_likelihood(logits[:, inputs.shape[1] - 1:], targets, targets_mask)

  def score_options(self, params: Any, inputs: jax.Array, option_targets: jax.Array, *,
                    inputs_mask: jax.Array | None = None,
                    options_mask: jax.Array | None = None) -> jax.Array:
    """Each (input, option) pair scored as `score` scores it (the prompt is run once per
    option: a shared prefix cache is not implemented)."""
    batch, n, length = option_targets.shape
    repeat = lambda x: None if x is None else jnp.repeat(x, n, axis=0)
    flat = lambda x: None if x is None else x.reshape(batch * n, length)
    total, _ = self.score(params, repeat(inputs), flat(option_targets),
                          inputs_mask=repeat(inputs_mask), targets_mask=flat(options_mask))
    return total.reshape(batch, n)

  # --- incremental decoding -----------------------------------------------------------------

  def init_decode(self, params: Any, inputs: jax.Array, max_decode_length: int,
                  rows_per_input: int = 1, *, inputs_mask: jax.Array | None = None
                  ) -> tuple[Any, Any]:
    inputs = jnp.repeat(inputs, rows_per_input, axis=0)
    if inputs_mask is not None:
      inputs_mask = jnp.repeat(inputs_mask, rows_per_input, axis=0)
    prompt, features = self._prompt_features(inputs, inputs_mask, max_decode_length)
    rows, length = prompt.shape
    total = length + max_decode_length
    layers = empty_cache(self.config, rows, total)
    bias = self._decode_bias(features, 0, length, total)
    logits, variables = self.module.apply(
        {'params': params, 'cache': layers}, prompt,
        decoder_positions=features['decoder_positions'][:, :length], decode=True,
        cache_index=jnp.int32(0), bias=bias, mutable=['cache'])
    cache = {'layers': variables['cache'], 'first_logits': logits[:, -1],
             'step': jnp.int32(0), **features}
    return length, cache

  def _decode_bias(self, features, start, length_q, total) -> jax.Array:
    """[rows, 1, 1, Q, total]: query slot start + i sees the written, unpadded slots up to
    itself (and, prefix LM, every prompt token)."""
    q = start + jnp.arange(length_q)
    key = jnp.arange(total)
    segment = features['decoder_segment_ids'].astype(bool)
    mask = (key[None, None, :] <= q[None, :, None]) & segment[:, None, :]
    if self.config.inputs_bidirectional_attention:
      prefix = features['decoder_causal_attention'].astype(bool)
      q_prefix = jax.lax.dynamic_slice_in_dim(prefix, start, length_q, axis=1)
      mask = mask | (q_prefix[:, :, None] & prefix[:, None, :])
    return jnp.where(mask, 0.0, decoder_only.NEG_INF).astype(jnp.float32)[:, None, None]

  def decode_step(self, params: Any, context: Any, cache: Any, tokens: jax.Array
                  ) -> tuple[jax.Array, Any]:
    """Step 0: the prompt's last logits (from `init_decode`). Step t > 0: `tokens` (the
    token chosen at step t - 1) written at slot prompt_length + t - 1."""
    prompt_length = context
    step = cache['step']
    total = cache['decoder_segment_ids'].shape[1]

    def run(_):
      index = prompt_length + step - 1
      positions = jax.lax.dynamic_slice_in_dim(cache['decoder_positions'], index, 1, axis=1)
      bias = self._decode_bias(cache, index, 1, total)
      logits, variables = self.module.apply(
          {'params': params, 'cache': cache['layers']}, tokens[:, None],
          decoder_positions=positions, decode=True, cache_index=index, bias=bias,
          mutable=['cache'])
      return logits[:, 0], variables['cache']

    def first(_):
      return cache['first_logits'], cache['layers']

    logits, layers = jax.lax.cond(step == 0, first, run, None)
    return logits, {**cache, 'layers': layers, 'step': step + 1}

  def reorder_cache(self, cache: Any, parents: jax.Array) -> Any:
    inputs, n = parents.shape
    rows = (jnp.arange(inputs)[:, None] * n + parents).reshape(-1)
    return {**jax.tree.map(lambda x: jnp.take(x, rows, axis=0),
                           {k: v for k, v in cache.items() if k != 'step'}),
            'step': cache['step']}

  # --- memory ---------------------------------------------------------------------------

  def activation_bytes(self, batch_size: int, feature_lengths: Mapping[str, int],
                       axis_sizes: Mapping[str, int], rules) -> ActivationBytes:
    return decoder_only_memory.activation_bytes(self.config, batch_size, feature_lengths,
                                                axis_sizes, rules)
