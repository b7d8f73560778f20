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
from t5x_lite.models import t5


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32: train steps taken (skipped ones included; the schedule
                             # sees step - skipped_steps, the updates applied)
  params: Any
  opt_state: Any
  skipped_steps: jax.Array   # int32: updates skipped because the loss or gradient was not finite
  bad_streak: jax.Array      # int32: consecutive skipped updates


def _init(config: t5.T5Config, optimizer: optax.GradientTransformation, rng: jax.Array,
          params: Any = None) -> TrainState:
  if params is None:
    dummy = jnp.ones((1, 1), jnp.int32)
    params = nn.unbox(t5.Transformer(config).init(rng, dummy, dummy)['params'])
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                    skipped_steps=zero, bad_streak=zero)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Abstract shapes and shardings of a TrainState on a mesh."""
  shapes: Any        # TrainState of jax.ShapeDtypeStruct
  specs: Any         # TrainState of PartitionSpec
  shardings: Any     # TrainState of NamedSharding

  def abstract(self) -> Any:
    """ShapeDtypeStructs carrying the target shardings (an orbax restore target)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.shapes, self.shardings)


def state_layout(config: t5.T5Config, optimizer: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh, rules) -> StateLayout:
  shapes = jax.eval_shape(lambda: _init(config, optimizer, jax.random.key(0)))
  params_specs = partitioning.param_specs(t5.logical_axes(config), rules)
  partitioning.check_divisible(shapes.params, params_specs, mesh, 'parameter')
  specs = TrainState(
      step=P(), params=params_specs,
      opt_state=partitioning.derived_specs(shapes.opt_state, shapes.params, params_specs),
      skipped_steps=P(), bad_streak=P())
  return StateLayout(shapes, specs, partitioning.to_shardings(specs, mesh))


def create_state(config: t5.T5Config, optimizer: optax.GradientTransformation,
                 layout: StateLayout, rng: jax.Array, params: Any = None) -> TrainState:
  """A fresh state, created directly with `layout.shardings` (params optionally given, e.g.
  warm-started from a converted checkpoint; they are resharded, never gathered)."""
  if params is None:
    return jax.jit(lambda key: _init(config, optimizer, key),
                   out_shardings=layout.shardings)(rng)
  params = jax.device_put(params, layout.shardings.params)
  return jax.jit(lambda key, p: _init(config, optimizer, key, p),
                 out_shardings=layout.shardings)(rng, params)
