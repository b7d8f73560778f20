"""The model interface: every operation the rest of the library needs from a model family.

As T5X's `BaseTransformerModel` (t5x/models.py), one object per family wraps its flax module
and answers for it: parameters (init, abstract shapes, logical axes), the logits the loss
reads, scoring of given targets, incremental decoding over a cache, and the activation
bytes `plan` reports. Decoding, scoring, the train step, state layout, checkpoints,
evaluation and the commands call these methods and never a family's classes.

What differs from T5X: T5X's model also owns the loss (`loss_fn`) and whole decoders
(`predict_batch_with_aux`, with `decoding.beam_search` passed in); here the model answers
the two questions that differ per family (logits for a batch; one decode step over a cache)
and the loss (losses.py), the search strategies (decoding/) and the train step stay shared,
so a family brings no loss or search of its own. The encoder of an encoder-decoder runs
once per input inside `init_decode` (T5X's `_compute_logits_from_slice` gets the encoded
inputs passed in, as `context` here); a decoder-only model puts its prompt's keys/values in
the cache there instead.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import kernels as kernels_lib


@dataclasses.dataclass(frozen=True)
class LayerStack:
  """Activation bytes of one stack of identical layers (per device, one microbatch)."""
  name: str
  count: int
  layer: int          # what a layer keeps for its backward pass
  layer_input: int    # what it keeps with remat: its input


@dataclasses.dataclass(frozen=True)
class ActivationBytes:
  """Per-device activation bytes of one microbatch, as `plan` reports them."""
  stacks: tuple[LayerStack, ...]
  shared: int           # kept once for all layers (attention biases, encoder output, ...)
  output: int           # logits and their softmax
  working: int          # the backward pass's largest working set
  rows_per_device: int

  def stack(self, name: str) -> LayerStack:
    return next(s for s in self.stacks if s.name == name)

  def peak(self, remat: bool) -> int:
    if remat:
      layers = (sum(s.count * s.layer_input for s in self.stacks)
                + max((s.layer for s in self.stacks), default=0))
    else:
      layers = sum(s.count * s.layer for s in self.stacks)
    return self.shared + self.output + self.working + layers


class Model(abc.ABC):
  """One model family's answers. `config`: its frozen config dataclass, with `family` (the
  key of `models.build`), `vocab_size`, `dtype`, `param_dtype`, `dropout_rate` and `remat`.
  `kernels`: the platform's (None: the default devices'); `adapters`: a peft.AdapterSpec
  (LoRA banks, soft prompt) trained beside the base, or None."""

  def __init__(self, config: Any, kernels: kernels_lib.Kernels | None = None,
               adapters: Any = None):
    self.config, self.kernels, self.adapters = config, kernels, adapters

  @property
  def family(self) -> str:
    return self.config.family

  @property
  def feature_kind(self) -> str:
    """The batch form `logits` reads (T5X's FEATURE_CONVERTER_CLS, as a name so that models
    import nothing of data): 'encoder_decoder' (DESIGN.md's encoder-decoder contract) or
    'decoder_only' (its decoder-only contract); `data.feature_converters.for_kind` makes the
    converter."""
    return 'encoder_decoder'

  @property
  def ops(self) -> kernels_lib.Kernels:
    """The kernels this model runs (decoding and the loss use the same)."""
    return self.kernels or kernels_lib.default()

  def with_adapters(self, adapters: Any) -> 'Model':
    """The same model with other adapters (e.g. eval's routed spec); same kernels."""
    return type(self)(self.config, self.kernels, adapters)

  # --- parameters ---------------------------------------------------------------------------

  @abc.abstractmethod
  def boxed_params(self, rng: jax.Array) -> Any:
    """Fresh params boxed with their logical axes (`nn.LogicallyPartitioned`). The base's
    params depend on `rng` alone, whatever the adapters (theirs come from their own key)."""

  def abstract_params(self) -> Any:
    """Shapes and logical axes of the parameters, boxed; no memory."""
    return jax.eval_shape(lambda: self.boxed_params(jax.random.key(0)))

  def logical_axes(self) -> Any:
    """Tree of `PartitionSpec`s of logical axis names, matching the params tree."""
    return nn.get_partition_spec(self.abstract_params())

  def init_params(self, rng: jax.Array, out_shardings: Any = None) -> Any:
    """Random parameters (unboxed) from one compiled program, directly with
    `out_shardings` when given (op-by-op init is ~5x slower)."""
    return jax.jit(lambda key: nn.unbox(self.boxed_params(key)),
                   out_shardings=out_shardings)(rng)

  def param_count(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(self.abstract_params())))

  # --- training and scoring -----------------------------------------------------------------

  @abc.abstractmethod
  def logits(self, params: Any, batch: Mapping[str, jax.Array], *,
             enable_dropout: bool = False, rngs: Any = None) -> jax.Array:
    """float32 logits [batch, target_length, vocab] for a batch of the feature contract
    (DESIGN.md: inputs, targets, segment ids, positions, task ids), aligned with
    `decoder_target_tokens`: what the loss reads."""

  @abc.abstractmethod
  def score_options(self, params: Any, inputs: jax.Array, option_targets: jax.Array, *,
                    inputs_mask: jax.Array | None = None,
                    options_mask: jax.Array | None = None) -> jax.Array:
    """Log-likelihood [batch, options] of each input's options (targets [batch, options,
    length], EOS included; `options_mask` marks their real tokens, default the ids > 0; an
    all-padding option scores 0), each option as `score` would score it, the input's own
    work done once."""

  def score(self, params: Any, inputs: jax.Array, targets: jax.Array, *,
            inputs_mask: jax.Array | None = None, targets_mask: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """Log-likelihood of given targets (EOS included), teacher-forced in one pass: (sum
    [batch], per-token [batch, length] with 0 on padding). Masks: see `real_inputs`."""
    inputs = jnp.where(real_inputs(inputs, inputs_mask), inputs, 0)
    targets = jnp.where(real_targets(targets, targets_mask), targets, 0)
    logits = self.logits(params, {'encoder_input_tokens': inputs,
                                  'decoder_input_tokens': shift_right(targets),
                                  'decoder_target_tokens': targets})
    return log_likelihood(logits, targets)

  # --- incremental decoding -----------------------------------------------------------------

  @abc.abstractmethod
  def init_decode(self, params: Any, inputs: jax.Array, max_decode_length: int,
                  rows_per_input: int = 1, *, inputs_mask: jax.Array | None = None
                  ) -> tuple[Any, Any]:
    """(context, cache) to decode up to `max_decode_length` tokens for each of the
    `rows_per_input` consecutive rows per input (beam search: the beams). `context` is
    read-only during decoding (e.g. the encoded inputs); `cache` is carried step to step."""

  @abc.abstractmethod
  def decode_step(self, params: Any, context: Any, cache: Any, tokens: jax.Array
                  ) -> tuple[jax.Array, Any]:
    """Logits [rows, vocab] of the next token after `tokens` [rows] (the previous token
    of each row; 0 at the first step), and the updated cache."""

  @abc.abstractmethod
  def reorder_cache(self, cache: Any, parents: jax.Array) -> Any:
    """The cache after beam search moved each row to its parent: `parents` [inputs,
    rows_per_input] holds, per new row, the old row it continues."""

  # --- memory ---------------------------------------------------------------------------------

  @abc.abstractmethod
  def activation_bytes(self, batch_size: int, feature_lengths: Mapping[str, int],
                       axis_sizes: Mapping[str, int], rules) -> ActivationBytes:
    """What the train step keeps for its backward pass, per device, for a microbatch of
    `batch_size` rows (the analytic formula `plan` reports; checked against XLA's).
    `feature_lengths`: the task lengths ('inputs', 'targets'); each family lays its rows out
    from them (T5: encoder and decoder; decoder-only: one row of inputs + targets)."""


def shift_right(targets: jax.Array) -> jax.Array:
  """Decoder inputs for teacher forcing: start token 0, then the targets but their last."""
  return jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))


def real_inputs(inputs: jax.Array, inputs_mask: jax.Array | None = None) -> jax.Array:
  """Which positions of right-padded `inputs` [batch, length] hold tokens: `inputs_mask`
  where the caller gives it, else the nonzero ids (T5's vocabularies pad with 0; soft-prompt
  ids are negative). A vocabulary whose id 0 is a real token (Llama's and Qwen's "!") needs
  the mask: the feature converters' `model_inputs_mask` gives it, as T5X's DecoderOnlyModel
  reads the prompt's extent from `decoder_causal_attention`, not from the ids."""
  return (inputs != 0) if inputs_mask is None else inputs_mask.astype(bool)


def real_targets(targets: jax.Array, targets_mask: jax.Array | None = None) -> jax.Array:
  """Which target positions are scored: `targets_mask`, else the ids > 0 (`real_inputs`)."""
  return (targets > 0) if targets_mask is None else targets_mask.astype(bool)


def log_likelihood(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """(sum [batch], per-token [batch, length]) log-probabilities of `targets`, 0 on padding
  (`real_targets(targets, mask)`)."""
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(targets, 0)[..., None],
                                  axis=-1)[..., 0]
  per_token = jnp.where(real_targets(targets, mask), log_probs, 0.0)
  return per_token.sum(axis=-1), per_token
