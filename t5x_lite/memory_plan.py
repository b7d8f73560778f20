"""Bytes per device of a training run, from shapes and shardings alone: nothing is compiled.

Parameters and optimizer state: `training.state.state_layout` on an abstract mesh (the real
state init under `jax.eval_shape`, the real partition specs), so the figures follow the model
and the optimizer whatever their parameter layout. Gradients: the trainable parameters'
shapes, dtype and shardings, twice with microbatches > 1 (the accumulator and the current
microbatch's). An adapter run (`peft.AdapterSpec`) differentiates and updates its trainable
leaves only: its frozen base counts parameters alone, no optimizer state, no gradient.
FSDP gathers: a layer's weights are all-gathered over the batch axes for its matmuls and its
weight gradient exists unreduced before the reduce-scatter, so the largest layer's
parameters unsharded over (data, fsdp) count twice as a working set (frozen ones once).

Activations follow `models/t5.py` and `layers.py`: what autodiff keeps for the backward
pass, per device. Notation: B rows per device per microbatch (global batch / microbatches /
(data x fsdp)), L and T the input and target lengths, D d_model, H heads, K d_kv, F d_ff,
V vocab, a the activation dtype's bytes, m = 1 with dropout (a bool mask per element) else 0,
p = a when dropout is on or a != 4 (probabilities kept in the activation dtype beside fp32),
else 0, g = 1 for a gated MLP. A tensor whose logical axis (heads, mlp, vocab) is sharded by
the rules (tensor parallelism) is divided by that mesh axis.

  attention(Q, S)  = 2aBQHK (q, context) + 2aBSHK (k, v) + (4 + p + m) BHQS (probs fp32,
                     the probs fed to probs @ v, dropout mask)
  mlp(N)           = (2 + g) aBNF + mBNF (wi outputs, the wo input, dropout mask)
  encoder layer    = 4aBLD (residual stream x2, norm outputs x2) + 2mBLD + attention(L, L)
                     + mlp(L)
  decoder layer    = 6aBTD + 3mBTD + attention(T, T) + attention(T, L) + mlp(T)
  layer input      = aBLD / aBTD: all that `T5Config.remat` keeps of a layer
  shared           = 4BHL^2 + 4BHT^2 + 4BTL (the fp32 bias+mask arrays every layer reads)
                     + (2a + m) BLD (encoder output before/after its final norm)
  output           = 8BTV (fp32 logits and the loss's softmax) + (2a + m) BTD (final norm)
  working          = max(4BTV (the logits' gradient), the largest layer): live at the start
                     of the backward pass
  peak             = shared + output + working + sum over layers of (layer, or layer input
                     plus one layer recomputed when remat is on)

This is what a compiler must keep once elementwise chains fuse (the norm's rsqrt, scalar
broadcasts and the like are left out); the total adds it to the gradients, an upper bound on
the backward pass's peak. The optimizer update's temporaries are not counted. XLA:CPU
(`t5x-lite plan --compile`) keeps more: with the batch its temporaries grow 1.1-1.7x as fast
as this estimate (flan-t5 tiny, 256/64, 1 -> 8 rows per device, dp/fsdp, fp32/bf16, dropout
on/off), its update phase holds about the parameters' size again beside the gradients, and
it schedules remat's recomputation early (loss gradient of flan-t5-small, batch 16, 256/64:
3.99 GiB of temporaries without remat, 3.86 GiB with).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec as P

from t5x_lite import partitioning
from t5x_lite.models import layers, t5
from t5x_lite.training import state as state_lib


def _entry_size(entry, axis_sizes: Mapping[str, int], skip=()) -> int:
  names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
  return math.prod(axis_sizes[n] for n in names if n not in skip)


def _local_bytes(shape: Sequence[int], spec, itemsize: int, axis_sizes: Mapping[str, int],
                 skip=()) -> int:
  """Bytes of the largest shard of an array (dimensions rounded up, as XLA pads them)."""
  spec = tuple(spec or ()) + (None,) * len(shape)
  return math.prod(-(-n // _entry_size(e, axis_sizes, skip)) for n, e in zip(shape, spec)) * (
      itemsize)


def abstract_mesh(axis_sizes: Mapping[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(axis_sizes[a] for a in partitioning.MESH_AXES),
                      partitioning.MESH_AXES)


# --- parameters, optimizer state, gradients -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StateBytes:
  params: int       # the trainable parameters (all of them in a full fine-tune)
  optimizer: int
  gradients: int
  gathered: int     # FSDP working set: the largest layer's weights + weight gradient, gathered
  frozen: int = 0   # an adapter run's frozen base: its parameters only
  trainable_count: int = 0   # number of trainable parameters

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.gathered + self.frozen


def _layer_of(path: str) -> str:
  """'encoder/layers_3/attention/query' -> 'encoder/layers_3'; other leaves stand alone."""
  match = re.match(r'(.*?layers_\d+)/', path)
  return match.group(1) if match else path


def state_bytes(model_config: t5.T5Config, optimizer, axis_sizes: Mapping[str, int], rules,
                microbatches: int = 1, adapters: Any = None) -> StateBytes:
  """Per-device bytes of the TrainState the train loop would create on this mesh
  (`state_lib.state_layout` on an abstract mesh: its shapes and specs, nothing allocated).

  With `adapters` (a `peft.AdapterSpec`, its task slots set as the train loop sets them:
  `peft.runs.spec_for_mixture`) the state holds the trainable leaves only: they count
  parameters, optimizer state and gradients; the frozen base counts its parameters alone.
  FSDP gathers a frozen layer's weights too, but makes no weight gradient for them.
  """
  layout = state_lib.state_layout(model_config, optimizer, abstract_mesh(axis_sizes), rules,
                                  adapters)
  frozen = layout.frozen or {}
  frozen_specs = jax.tree.map(lambda s: s.sharding.spec, frozen)
  is_spec = lambda x: isinstance(x, P)  # pylint: disable=unnecessary-lambda-assignment

  def total(tree, specs):
    return sum(_local_bytes(s.shape, spec, np.dtype(s.dtype).itemsize, axis_sizes)
               for s, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=is_spec)))

  per_layer: dict[str, int] = {}
  for tree, specs, copies in ((layout.shapes.params, layout.specs.params, 2),
                              (frozen, frozen_specs, 1)):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (keypath, leaf), spec in zip(flat, jax.tree.leaves(specs, is_leaf=is_spec)):
      itemsize = np.dtype(leaf.dtype).itemsize
      extra = (_local_bytes(leaf.shape, spec, itemsize, axis_sizes, partitioning.BATCH_AXES)
               - _local_bytes(leaf.shape, spec, itemsize, axis_sizes))
      key = _layer_of(partitioning._path(keypath))  # pylint: disable=protected-access
      per_layer[key] = per_layer.get(key, 0) + copies * extra
  params = total(layout.shapes.params, layout.specs.params)
  return StateBytes(params=params, optimizer=total(layout.shapes.opt_state,
                                                   layout.specs.opt_state),
                    gradients=params * (2 if microbatches > 1 else 1),
                    gathered=max(per_layer.values(), default=0),
                    frozen=total(frozen, frozen_specs),
                    trainable_count=sum(math.prod(x.shape)
                                        for x in jax.tree.leaves(layout.shapes.params)))


# --- activations ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ActivationBytes:
  """Per-device activation bytes of one microbatch (see the module docstring)."""
  encoder_layer: int
  decoder_layer: int
  encoder_layer_input: int
  decoder_layer_input: int
  shared: int
  output: int
  working: int
  num_encoder_layers: int
  num_decoder_layers: int
  rows_per_device: int

  def peak(self, remat: bool) -> int:
    if remat:
      layers_bytes = (self.num_encoder_layers * self.encoder_layer_input
                      + self.num_decoder_layers * self.decoder_layer_input
                      + max(self.encoder_layer, self.decoder_layer))
    else:
      layers_bytes = (self.num_encoder_layers * self.encoder_layer
                      + self.num_decoder_layers * self.decoder_layer)
    return self.shared + self.output + self.working + layers_bytes


def activation_bytes(model_config: t5.T5Config, batch_size: int,
                     feature_lengths: Mapping[str, int], axis_sizes: Mapping[str, int], rules,
                     microbatches: int = 1) -> ActivationBytes:
  """What the train step keeps for its backward pass, per device, for one microbatch."""
  cfg = model_config
  partitioning.check_batch_size(batch_size, abstract_mesh(axis_sizes))
  if batch_size % microbatches:
    raise partitioning.PartitioningError(
        f'batch size {batch_size} does not split into {microbatches} microbatches')
  b = batch_size // microbatches
  length, targets = feature_lengths['inputs'], feature_lengths['targets']
  a = np.dtype(cfg.activation_dtype).itemsize
  m = 1 if cfg.dropout_rate > 0 else 0
  p = a if (m or a != 4) else 0
  g = 1 if layers.parse_feed_forward_proj(cfg.feed_forward_proj)[1] else 0
  dims = {'batch': b, 'heads': cfg.num_heads, 'kv': cfg.d_kv, 'embed': cfg.d_model,
          'mlp': cfg.d_ff, 'vocab': cfg.vocab_size}

  def size(*axes) -> int:
    """Elements per device of an array with these logical axes ('length'/'T'/'L' = lengths)."""
    names = tuple({'L': 'length', 'T': 'length'}.get(x, x) for x in axes)
    names = tuple(n if n not in names[:i] else None for i, n in enumerate(names))
    spec = nn.logical_to_mesh_axes(names, rules)
    shape = [{'L': length, 'T': targets}.get(x, dims.get(x, 1)) for x in axes]
    return _local_bytes(shape, spec, 1, axis_sizes)

  def attention(q, s):
    return (2 * a * size('batch', q, 'heads', 'kv') + 2 * a * size('batch', s, 'heads', 'kv')
            + (4 + p + m) * size('batch', 'heads', q, s))

  def mlp(n):
    return (2 + g) * a * size('batch', n, 'mlp') + m * size('batch', n, 'mlp')

  encoder_layer = (4 * a + 2 * m) * size('batch', 'L', 'embed') + attention('L', 'L') + mlp('L')
  decoder_layer = ((6 * a + 3 * m) * size('batch', 'T', 'embed') + attention('T', 'T')
                   + attention('T', 'L') + mlp('T'))
  shared = (4 * size('batch', 'heads', 'L', 'L') + 4 * size('batch', 'heads', 'T', 'T')
            + 4 * size('batch', None, 'T', 'L') + (2 * a + m) * size('batch', 'L', 'embed'))
  logits = 4 * size('batch', 'T', 'vocab')
  output = 2 * logits + (2 * a + m) * size('batch', 'T', 'embed')
  return ActivationBytes(
      encoder_layer=encoder_layer, decoder_layer=decoder_layer,
      encoder_layer_input=a * size('batch', 'L', 'embed'),
      decoder_layer_input=a * size('batch', 'T', 'embed'), shared=shared, output=output,
      working=max(logits, encoder_layer, decoder_layer),
      num_encoder_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
      rows_per_device=-(-b // _entry_size(partitioning.BATCH_AXES, axis_sizes)))


def run_adapters(model_config: t5.T5Config, train_config: Any) -> Any:
  """The run's `peft.AdapterSpec` as the train loop builds it (the mixture's tasks as the
  task bank's slots, its groups), its `train` patterns checked; None: a full fine-tune."""
  spec = getattr(train_config, 'adapters', None)
  if spec is None:
    return None
  from t5x_lite.data import mixtures  # pylint: disable=import-outside-toplevel
  from t5x_lite.peft import params as peft_params, runs  # pylint: disable=import-outside-toplevel
  spec = runs.spec_for_mixture(spec, mixtures.get_mixture(train_config.mixture))
  if spec.train:
    peft_params.check_against_base(spec, nn.unbox(t5.abstract_params(model_config)))
  return spec


def compared_specs(spec: Any) -> list[Any]:
  """The columns `t5x-lite plan` shows beside an adapter run: a full fine-tune (None), the run,
  and the other method: prompt tuning with 20 tokens beside LoRA, or peft's default LoRA
  (rank 8 on q and v of both stacks, one adapter for all tasks) beside prompt tuning."""
  from t5x_lite.peft import spec as spec_lib  # pylint: disable=import-outside-toplevel
  out = [None]
  if spec is None:
    return out
  out.append(spec)
  if spec.lora is not None and not spec.prompt_length:
    out.append(spec_lib.AdapterSpec(prompt_length=20))
  elif spec.prompt_length and spec.lora is None:
    out.append(spec_lib.AdapterSpec(lora=spec_lib.LoraSpec()))
  return out


def plan(model_config: t5.T5Config, train_config: Any, axis_sizes: Mapping[str, int],
         adapters: Any = None) -> tuple[StateBytes, ActivationBytes]:
  """Both estimates for a `loop.TrainConfig` on a mesh of `axis_sizes`; `adapters`: the spec
  to plan (`run_adapters(...)` for the run's own; None: a full fine-tune).

  The activations do not depend on the adapters here: a soft prompt sits inside the inputs
  length (the data side prepends it within `feature_lengths['inputs']`), and LoRA's own
  activations, [rows, length, rank] per adapted projection, are left out like other
  rank-sized terms. So they are the full fine-tune's for every column, an upper bound for an
  adapter run: autodiff keeps a frozen projection's input only when something trainable
  needs it (e.g. wo's input when wo is frozen and not adapted is not kept).
  """
  rules = partitioning.rules_for(train_config.partitioning)
  state = state_bytes(model_config, train_config.optimizer.build(), axis_sizes, rules,
                      train_config.microbatches, adapters)
  activations = activation_bytes(model_config, train_config.batch_size,
                                 train_config.feature_lengths, axis_sizes, rules,
                                 train_config.microbatches)
  return state, activations
