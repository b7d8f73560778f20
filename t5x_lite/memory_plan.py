"""Bytes per device of a training run, from shapes and shardings alone: nothing is compiled.

Parameters and optimizer state: `jax.eval_shape` of the real state init and the real
partition specs (those `training.state.state_layout` uses), so the figures follow the model
and the optimizer whatever their parameter layout. Gradients: the parameters' shapes, dtype
and shardings, twice with microbatches > 1 (the accumulator and the current microbatch's).
FSDP gathers: a layer's weights are all-gathered over the batch axes for its matmuls and its
weight gradient exists unreduced before the reduce-scatter, so the largest layer's
parameters unsharded over (data, fsdp) count twice as a working set.

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
  params: int
  optimizer: int
  gradients: int
  gathered: int     # FSDP working set: the largest layer's weights + weight gradient, gathered


def _layer_of(path: str) -> str:
  """'encoder/layers_3/attention/query' -> 'encoder/layers_3'; other leaves stand alone."""
  match = re.match(r'(.*?layers_\d+)/', path)
  return match.group(1) if match else path


def state_bytes(model_config: t5.T5Config, optimizer, axis_sizes: Mapping[str, int], rules,
                microbatches: int = 1) -> StateBytes:
  """Per-device bytes of the TrainState the train loop would create on this mesh."""
  shapes = jax.eval_shape(lambda: state_lib._init(  # pylint: disable=protected-access
      model_config, optimizer, jax.random.key(0)))
  params_specs = partitioning.param_specs(t5.logical_axes(model_config), rules)
  partitioning.check_divisible(shapes.params, params_specs, abstract_mesh(axis_sizes),
                               'parameter')
  opt_specs = partitioning.derived_specs(shapes.opt_state, shapes.params, params_specs)

  def total(tree, specs, **kwargs):
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    return sum(_local_bytes(s.shape, spec, np.dtype(s.dtype).itemsize, axis_sizes, **kwargs)
               for s, spec in zip(jax.tree.leaves(tree), flat_specs))

  params = total(shapes.params, params_specs)
  per_layer: dict[str, int] = {}
  flat = jax.tree_util.tree_flatten_with_path(shapes.params)[0]
  for (keypath, leaf), spec in zip(flat, jax.tree.leaves(
      params_specs, is_leaf=lambda x: isinstance(x, P))):
    itemsize = np.dtype(leaf.dtype).itemsize
    extra = (_local_bytes(leaf.shape, spec, itemsize, axis_sizes, partitioning.BATCH_AXES)
             - _local_bytes(leaf.shape, spec, itemsize, axis_sizes))
    key = _layer_of(partitioning._path(keypath))  # pylint: disable=protected-access
    per_layer[key] = per_layer.get(key, 0) + extra
  return StateBytes(params=params, optimizer=total(shapes.opt_state, opt_specs),
                    gradients=params * (2 if microbatches > 1 else 1),
                    gathered=2 * max(per_layer.values(), default=0))


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


def plan(model_config: t5.T5Config, train_config: Any, axis_sizes: Mapping[str, int]
         ) -> tuple[StateBytes, ActivationBytes]:
  """Both estimates for a `loop.TrainConfig` on a mesh of `axis_sizes`."""
  rules = partitioning.rules_for(train_config.partitioning)
  state = state_bytes(model_config, train_config.optimizer.build(), axis_sizes, rules,
                      train_config.microbatches)
  activations = activation_bytes(model_config, train_config.batch_size,
                                 train_config.feature_lengths, axis_sizes, rules,
                                 train_config.microbatches)
  return state, activations
