"""T5 (v1.0, v1.1, Flan-T5, mT5, ByT5) behind the model interface, as T5X's
`EncoderDecoderModel`: the encoder reads the inputs, the decoder the shifted targets; in
decoding the encoder runs once per input and its output is the decode `context`."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from t5x_lite.models import t5, t5_memory
from t5x_lite.models.interface import (ActivationBytes, Model, log_likelihood, real_inputs,
                                      real_targets, shift_right)

# The batch features the module reads (the loss reads the targets and weights itself).
FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'encoder_segment_ids',
            'decoder_segment_ids', 'encoder_positions', 'decoder_positions',
            'decoder_task_ids')   # task ids route per-task adapters (ignored otherwise)


class EncoderDecoderModel(Model):
  """`config`: a `t5.T5Config`."""

  def __init__(self, config: t5.T5Config, kernels=None, adapters: Any = None):
    super().__init__(config, kernels, adapters)
    self.module = t5.Transformer(config, kernels, adapters=adapters)

  def boxed_params(self, rng: jax.Array) -> Any:
    """The base's params are `Transformer(config)`'s with this key whatever the adapters
    (flax draws a scope's params from one counter: adapters in between would shift them);
    the adapters' come from their own key."""
    one = jnp.ones((1, 1), jnp.int32)
    base = t5.Transformer(self.config).init(rng, one, one)['params']
    if self.adapters is None:
      return base
    ids = {'decoder_task_ids': one * 0} if self.adapters.per_task else {}
    full = traverse_util.flatten_dict(self.module.init(
        jax.random.fold_in(rng, 1), one, one, **ids)['params'])
    return traverse_util.unflatten_dict({**full, **traverse_util.flatten_dict(base)})

  def logits(self, params: Any, batch: Mapping[str, jax.Array], *,
             enable_dropout: bool = False, rngs: Any = None) -> jax.Array:
    features = {k: batch[k] for k in FEATURES if k in batch}
    return self.module.apply({'params': params}, **features, enable_dropout=enable_dropout,
                             rngs=rngs)

  def _encode(self, params: Any, inputs: jax.Array) -> jax.Array:
    return self.module.apply({'params': params}, inputs, method=t5.Transformer.encode)

  def score_options(self, params: Any, inputs: jax.Array, option_targets: jax.Array, *,
                    inputs_mask: jax.Array | None = None,
                    options_mask: jax.Array | None = None) -> jax.Array:
    """The encoder runs once per input and all its options decode, teacher-forced, against
    that output (T5X's and FLAN's rank classification score each pair as its own example).
    Masked positions become T5's padding, 0."""
    batch, n, length = option_targets.shape
    inputs = jnp.where(real_inputs(inputs, inputs_mask), inputs, 0)
    encoded = self._encode(params, inputs)
    targets = jnp.where(real_targets(option_targets, options_mask), option_targets, 0
                        ).reshape(batch * n, length)
    logits = self.module.apply({'params': params}, jnp.repeat(encoded, n, axis=0),
                               jnp.repeat(inputs, n, axis=0), shift_right(targets),
                               method=t5.Transformer.decode)
    return log_likelihood(logits, targets)[0].reshape(batch, n)

  def init_decode(self, params: Any, inputs: jax.Array, max_decode_length: int,
                  rows_per_input: int = 1, *, inputs_mask: jax.Array | None = None
                  ) -> tuple[Any, Any]:
    """The encoder's output is the context; the cache holds self-attention slots for
    `max_decode_length` tokens and the cross-attention keys/values of the encoded inputs,
    projected once here and shared by an input's `rows_per_input` rows."""
    inputs = jnp.where(real_inputs(inputs, inputs_mask), inputs, 0)
    encoded = self._encode(params, inputs)
    dummy = jnp.zeros((inputs.shape[0] * rows_per_input, max_decode_length), jnp.int32)
    _, variables = self.module.apply({'params': params}, encoded, inputs, dummy, decode=True,
                                     method=t5.Transformer.decode, mutable=['cache'])
    return (encoded, inputs), variables['cache']

  def decode_step(self, params: Any, context: Any, cache: Any, tokens: jax.Array
                  ) -> tuple[jax.Array, Any]:
    encoded, inputs = context
    logits, variables = self.module.apply({'params': params, 'cache': cache}, encoded, inputs,
                                          tokens[:, None], decode=True,
                                          method=t5.Transformer.decode, mutable=['cache'])
    return logits[:, 0], variables['cache']

  def reorder_cache(self, cache: Any, parents: jax.Array) -> Any:
    """Rows follow their parents through the decoder's slot-history table [inputs, rows, L]
    (see `t5.Decoder`); the keys/values stay where they were written, uncopied."""
    def reorder(path, x):
      if getattr(path[-1], 'key', '') != 'slot_history':
        return x
      return jnp.take_along_axis(x, parents[:, :, None], axis=1)
    return jax.tree_util.tree_map_with_path(reorder, cache)

  def activation_bytes(self, batch_size: int, feature_lengths: Mapping[str, int],
                       axis_sizes: Mapping[str, int], rules) -> ActivationBytes:
    return t5_memory.activation_bytes(self.config, batch_size, feature_lengths, axis_sizes,
                                      rules)
