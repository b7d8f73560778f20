"""TrainState and its creation directly sharded over the mesh.

The state is created by one jitted function with `out_shardings`, so a parameter is only
ever materialised as its shards: an xxl model never has to fit on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from t5x_lite import partitioning
from t5x_lite.models import Model
from t5x_lite.peft import params as peft_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32: train steps taken (skipped ones included; the schedule
                             # sees step - skipped_steps, the updates applied)
  params: Any
  opt_state: Any
  skipped_steps: jax.Array   # int32: updates skipped because the loss or gradient was not finite
  bad_streak: jax.Array      # int32: consecutive skipped updates


def _init(model: Model, optimizer: optax.GradientTransformation, rng: jax.Array,
          params: Any = None) -> TrainState:
  if params is None:
    params = nn.unbox(model.with_adapters(None).boxed_params(rng))
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                    skipped_steps=zero, bad_streak=zero)


def _init_adapters(model: Model, optimizer: optax.GradientTransformation,
                   rng: jax.Array, base: Any = None) -> tuple[TrainState, Any]:
  """(state over the trainable leaves, frozen leaves) of `model`'s adapters. `base`: the
  base's parameters (all or some leaves: they replace the fresh ones); the adapters start
  fresh (LoRA B = 0)."""
  adapters = model.adapters
  full = nn.unbox(model.boxed_params(rng))
  if base is not None:
    full = peft_params.combine(full, base)
  full = peft_params.init_prompt(full, adapters, jax.random.fold_in(rng, 2),
                                 model.config.vocab_size)
  trainable, frozen = peft_params.split(full, adapters)
  return _init(model, optimizer, rng, trainable), frozen


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Abstract shapes and shardings of a TrainState on a mesh."""
  shapes: Any        # TrainState of jax.ShapeDtypeStruct
  specs: Any         # TrainState of PartitionSpec
  shardings: Any     # TrainState of NamedSharding
  frozen: Any = None  # adapter runs: the frozen base's ShapeDtypeStructs, with shardings

  def abstract(self) -> Any:
    """ShapeDtypeStructs carrying the target shardings (an orbax restore target)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.shapes, self.shardings)


def state_layout(model: Model, optimizer: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh, rules) -> StateLayout:
  """With `model.adapters` (a peft.AdapterSpec) the state holds the trainable leaves only
  and `frozen` describes the base, each leaf sharded by the same rules."""
  adapters = model.adapters
  if adapters is None:
    shapes, frozen = jax.eval_shape(lambda: _init(model, optimizer, jax.random.key(0))), {}
  else:
    shapes, frozen = jax.eval_shape(lambda: _init_adapters(model, optimizer,
                                                           jax.random.key(0)))
  all_specs = partitioning.param_specs(model.logical_axes(), rules)
  params_specs, frozen_specs = peft_params.split(all_specs, adapters)
  partitioning.check_divisible(shapes.params, params_specs, mesh, 'parameter')
  partitioning.check_divisible(frozen, frozen_specs, mesh, 'parameter')
  specs = TrainState(
      step=P(), params=params_specs,
      opt_state=partitioning.derived_specs(shapes.opt_state, shapes.params, params_specs),
      skipped_steps=P(), bad_streak=P())
  frozen_abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), frozen,
      partitioning.to_shardings(frozen_specs, mesh)) if adapters is not None else None
  return StateLayout(shapes, specs, partitioning.to_shardings(specs, mesh), frozen_abstract)


def create_state(model: Model, optimizer: optax.GradientTransformation,
                 layout: StateLayout, rng: jax.Array, params: Any = None) -> TrainState:
  """A fresh state, created directly with `layout.shardings` (params optionally given, e.g.
  warm-started from a converted checkpoint; they are resharded, never gathered)."""
  if params is None:
    return jax.jit(lambda key: _init(model, optimizer, key),
                   out_shardings=layout.shardings)(rng)
  params = jax.device_put(params, layout.shardings.params)
  return jax.jit(lambda key, p: _init(model, optimizer, key, p),
                 out_shardings=layout.shardings)(rng, params)


def create_adapter_state(model: Model, optimizer: optax.GradientTransformation,
                         layout: StateLayout, rng: jax.Array,
                         base: Any = None) -> tuple[TrainState, Any]:
  """(fresh state of the trainable leaves, frozen base), both created sharded. `base`:
  parameters of the base (None: random, from `rng`: tests and tiny runs)."""
  frozen_shardings = jax.tree.map(lambda x: x.sharding, layout.frozen)
  out = (layout.shardings, frozen_shardings)
  if base is None:
    return jax.jit(lambda key: _init_adapters(model, optimizer, key),
                   out_shardings=out)(rng)
  return jax.jit(lambda key, b: _init_adapters(model, optimizer, key, b),
                 out_shardings=out)(rng, base)


def frozen_from_seed(model: Model, seed: int, target: Any) -> Any:
  """The random base an adapter run without INITIAL_CHECKPOINT_PATH drew from its seed,
  sharded as `target` (eval/infer/export of such a run: tests and tiny CPU runs)."""
  shardings = jax.tree.map(lambda x: x.sharding, target)
  return jax.jit(lambda: _init_adapters(model, optax.identity(), jax.random.key(seed))[1],
                 out_shardings=shardings)()
