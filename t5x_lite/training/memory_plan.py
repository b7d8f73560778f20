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

Activations: the model's own formula (`Model.activation_bytes`; T5's in
`models/t5_memory.py`, the decoder-only family's in `models/decoder_only_memory.py`), what
autodiff keeps for the backward pass, per device. The total adds them to the gradients, an
upper bound on the backward pass's peak; the optimizer update's temporaries are not counted.
XLA:CPU (`t5x-lite plan --compile`) keeps more: its update phase holds about the parameters'
size again beside the gradients.

Everything goes through the model interface (`models.build(config)`: `abstract_params` for
the parameter count, `activation_bytes`, `init_decode`, and the state layout's
`boxed_params` / logical axes) and the run's feature converter (`loop.feature_converter`: the
model's `feature_kind`) for the batch, so a family needs nothing here of its own.

Decoding (`decode_bytes`): what `init_decode` returns for the eval batch (the encoded inputs
and a T5 decoder's key/value cache; a decoder-only model's key/value cache of prompt + decode
length), from its shapes under `jax.eval_shape`: the bytes an eval or `infer` run holds
beside the parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec as P

from t5x_lite import partitioning
from t5x_lite import models
from t5x_lite.models.interface import ActivationBytes
from t5x_lite.training import state as state_lib


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


def state_bytes(model_config: Any, optimizer, axis_sizes: Mapping[str, int], rules,
                microbatches: int = 1, adapters: Any = None) -> StateBytes:
  """Per-device bytes of the TrainState the train loop would create on this mesh
  (`state_lib.state_layout` on an abstract mesh: its shapes and specs, nothing allocated).

  With `adapters` (a `peft.AdapterSpec`, its task slots set as the train loop sets them:
  `peft.runs.spec_for_mixture`) the state holds the trainable leaves only: they count
  parameters, optimizer state and gradients; the frozen base counts its parameters alone.
  FSDP gathers a frozen layer's weights too, but makes no weight gradient for them.
  """
  layout = state_lib.state_layout(models.build(model_config, adapters=adapters), optimizer,
                                  abstract_mesh(axis_sizes), rules)
  frozen = layout.frozen or {}
  frozen_specs = jax.tree.map(lambda s: s.sharding.spec, frozen)
  is_spec = lambda x: isinstance(x, P)  # pylint: disable=unnecessary-lambda-assignment

  def total(tree, specs):
    return sum(partitioning.shard_bytes(s.shape, spec, np.dtype(s.dtype).itemsize, axis_sizes)
               for s, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=is_spec)))

  per_layer: dict[str, int] = {}
  for tree, specs, copies in ((layout.shapes.params, layout.specs.params, 2),
                              (frozen, frozen_specs, 1)):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (keypath, leaf), spec in zip(flat, jax.tree.leaves(specs, is_leaf=is_spec)):
      itemsize = np.dtype(leaf.dtype).itemsize
      extra = (partitioning.shard_bytes(leaf.shape, spec, itemsize, axis_sizes, partitioning.BATCH_AXES)
               - partitioning.shard_bytes(leaf.shape, spec, itemsize, axis_sizes))
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


# --- the model: parameter shapes, the batch it reads ------------------------------------------

@functools.lru_cache(maxsize=4)
def _abstract_params(model_config: Any) -> Any:
  return nn.unbox(models.build(model_config).abstract_params())


def abstract_params(model_config: Any) -> Any:
  """The base model's parameter shapes (`Model.abstract_params`, unboxed), traced once per
  config: `plan` reads them for the parameter count and the decode cache."""
  try:
    return _abstract_params(model_config)
  except TypeError:   # an unhashable config
    return nn.unbox(models.build(model_config).abstract_params())


def param_count(model_config: Any) -> int:
  """The base model's parameter count (as `Model.param_count`)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(model_config)))


# --- the batch the model reads ---------------------------------------------------------------

def feature_converter(model_config: Any, train_config: Any) -> Any:
  """The run's feature converter, as the train loop picks it (`loop.feature_converter`:
  `TrainConfig.feature_converter`, else the one of the model's `feature_kind`)."""
  from t5x_lite.training import loop  # pylint: disable=import-outside-toplevel
  return loop.feature_converter(train_config, models.build(model_config))


def model_lengths(model_config: Any, train_config: Any) -> dict[str, int]:
  """Each feature of the batch the train step reads and its length (seqio's
  get_model_feature_lengths): e.g. 'encoder_input_tokens': inputs, or every decoder-only
  feature: inputs + targets."""
  return feature_converter(model_config, train_config).model_lengths(
      train_config.feature_lengths)


# --- activations ----------------------------------------------------------------------------

def activation_bytes(model_config: Any, batch_size: int,
                     feature_lengths: Mapping[str, int], axis_sizes: Mapping[str, int], rules,
                     microbatches: int = 1) -> ActivationBytes:
  """What the train step keeps for its backward pass, per device, for one microbatch."""
  partitioning.check_batch_size(batch_size, abstract_mesh(axis_sizes))
  if batch_size % microbatches:
    raise partitioning.PartitioningError(
        f'batch size {batch_size} does not split into {microbatches} microbatches')
  return models.build(model_config).activation_bytes(batch_size // microbatches,
                                                     feature_lengths, axis_sizes, rules)


def run_adapters(model_config: Any, train_config: Any) -> Any:
  """The run's `peft.AdapterSpec` as the train loop builds it (the mixture's tasks as the
  task bank's slots, its groups), its `train` patterns checked; None: a full fine-tune."""
  spec = getattr(train_config, 'adapters', None)
  if spec is None:
    return None
  from t5x_lite.data import mixtures  # pylint: disable=import-outside-toplevel
  from t5x_lite.peft import params as peft_params, runs  # pylint: disable=import-outside-toplevel
  spec = runs.spec_for_mixture(spec, mixtures.get_mixture(train_config.mixture))
  if spec.train:
    peft_params.check_against_base(spec, abstract_params(model_config))
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


def plan(model_config: Any, train_config: Any, axis_sizes: Mapping[str, int],
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


# --- decoding -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeBytes:
  """What `Model.init_decode` holds for the eval batch (module docstring), per device."""
  rows: int            # decoded rows: eval batch x beams (or samples) per input
  prompt_length: int   # the prompt the model reads (`converter.model_inputs`)
  decode_length: int   # max decode length: the targets' length
  cache: int           # bytes per device: the context and the cache `init_decode` returns


def decode_bytes(model_config: Any, train_config: Any,
                 axis_sizes: Mapping[str, int]) -> DecodeBytes:
  """`init_decode`'s context and cache for `TrainConfig.eval_batch_size` inputs decoded as
  `TrainConfig.eval_decoding` says (beams or samples per input) up to the targets' length,
  from `jax.eval_shape` (nothing allocated). Rows split over the batch axes (data x fsdp)
  as the evaluator splits them; tensor parallelism is not counted (an upper bound)."""
  model = models.build(model_config)
  converter = feature_converter(model_config, train_config).for_eval()
  lengths = train_config.feature_lengths
  targets = lengths['targets']
  empty = {k: np.zeros((1, n), np.int32)
           for k, n in converter.model_lengths(lengths).items()}
  prompt = converter.model_inputs(empty, targets).shape[1]
  decoding = train_config.eval_decoding
  per_input = {'beam': decoding.num_beams, 'sample': decoding.num_samples}.get(
      decoding.method, 1)
  inputs = train_config.eval_batch_size
  out = jax.eval_shape(lambda p, x: model.init_decode(p, x, targets, per_input),
                       abstract_params(model_config),
                       jax.ShapeDtypeStruct((inputs, prompt), np.int32))
  rows = inputs * per_input
  cache = 0
  for leaf in jax.tree.leaves(out):
    spec = P(partitioning.BATCH_AXES) if leaf.shape and leaf.shape[0] in (rows, inputs) else P()
    cache += partitioning.shard_bytes(leaf.shape, spec, np.dtype(leaf.dtype).itemsize,
                                      axis_sizes)
  return DecodeBytes(rows=rows, prompt_length=prompt, decode_length=targets, cache=cache)
