"""Device mesh, logical-axis rules and shardings: how parameters, optimizer state and batches
are laid out over `('data', 'fsdp', 'tensor')`.

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`, ...); a rule set
maps them to mesh axes. The presets:
  dp       replicate parameters, split the batch over data x fsdp.
  fsdp     also shard every parameter's `embed` dimension over `fsdp` (ZeRO-3 style).
  tp       T5X's 1-D model parallelism: `mlp`, `heads` and `vocab` over `tensor`.
  fsdp_tp  both.
The batch is always split over ('data', 'fsdp'). Errors about shapes that do not divide the
mesh are raised here, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from t5x_lite import errors

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

_ACTIVATIONS = [('batch', BATCH_AXES), ('length', None)]
_REPLICATED = [('vocab', None), ('embed', None), ('mlp', None), ('heads', None), ('kv', None),
               ('joined_kv', None), ('relpos_buckets', None),
               # decoder-only (models/decoder_only.py): the key/value projections' joined
               # [kv_heads * head_dim] axis, narrower than `joined_kv` under GQA.
               ('joined_kv_heads', None),
               # adapters (t5x_lite.peft): the bank of per-task/group slots, LoRA's rank and
               # the soft prompt's positions are small: replicated; their `embed`/`mlp`/
               # `joined_kv` dimension shards like the projection they adapt.
               ('adapters', None), ('lora_rank', None), ('prompt', None)]
_TENSOR = [('mlp', 'tensor'), ('heads', 'tensor'), ('vocab', 'tensor'), ('joined_kv', 'tensor'),
           ('joined_kv_heads', 'tensor')]
# `embed` -> fsdp applies where fsdp is still free: parameters. Activations use fsdp for the
# batch already, so their `embed` falls through to the replicated rule.
RULES: dict[str, list[tuple[str, Any]]] = {
    'dp': _ACTIVATIONS + _REPLICATED,
    'fsdp': _ACTIVATIONS + [('embed', 'fsdp')] + _REPLICATED,
    'tp': _ACTIVATIONS + _TENSOR + _REPLICATED,
    'fsdp_tp': _ACTIVATIONS + _TENSOR + [('embed', 'fsdp')] + _REPLICATED,
}


class PartitioningError(errors.UserError, ValueError):
  """A mesh, batch or parameter shape that cannot be laid out as asked."""


def rules_for(preset: str | Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
  if isinstance(preset, str):
    if preset not in RULES:
      raise PartitioningError(f'unknown partitioning rules {preset!r}; presets: {sorted(RULES)}')
    return list(RULES[preset])
  return [tuple(r) for r in preset]


# --- mesh -----------------------------------------------------------------------------------

def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Sizes for ('data', 'fsdp', 'tensor'); one of them may be -1 (= the remaining devices)."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise PartitioningError(f'mesh axes {sorted(unknown)} unknown; use {MESH_AXES}')
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise PartitioningError(f'only one mesh axis may be -1, got {sizes}')
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise PartitioningError(f'mesh axis sizes must be positive or -1, got {sizes}')
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % known:
      raise PartitioningError(f'mesh {sizes}: {num_devices} devices are not divisible by {known}')
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise PartitioningError(
        f'mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are available; '
        'make the product of the axis sizes equal the device count (or use -1 for one axis).')
  return sizes


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices with Auto axis types (linen needs them)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(shape or {'data': -1}, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# --- shardings ------------------------------------------------------------------------------

def _axis_size(mesh: jax.sharding.Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _path(keypath) -> str:
  """'/'-joined names of a pytree key path (dict keys, attributes, indices)."""
  names = []
  for k in keypath:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return '/'.join(names)


def check_divisible(shapes: Any, specs: Any, mesh: jax.sharding.Mesh, what: str) -> None:
  """Every sharded dimension must divide evenly over its mesh axes."""
  def check(keypath, shape, spec):
    for dim, (size, entry) in enumerate(zip(shape.shape, tuple(spec) + (None,) * 8)):
      n = _axis_size(mesh, entry)
      if size % n:
        raise PartitioningError(
            f'{what} {_path(keypath)} has shape {tuple(shape.shape)}: dimension {dim} ({size}) '
            f'is not divisible by mesh axis {entry} of size {n}. Choose a mesh whose axis sizes '
            f'divide it, or partitioning rules that leave it unsharded.')
  jax.tree_util.tree_map_with_path(check, shapes, specs,
                                   is_leaf=lambda x: isinstance(x, P))


def param_specs(logical_axes: Any, rules: Sequence[tuple[str, Any]]) -> Any:
  """Mesh PartitionSpecs of the parameters from their logical axes."""
  return nn.logical_to_mesh(logical_axes, rules)


def derived_specs(tree_shapes: Any, params_shapes: Any, params_specs: Any) -> Any:
  """Specs for a tree that mirrors the params (optimizer state): a leaf under a parameter's
  path takes the parameter's spec when shapes match, the spec without the reduced dimension
  when it is a factored statistic (Adafactor's row/column second moments), else replicated."""
  flat_params = {_path(k): (v.shape, s) for (k, v), s in zip(
      jax.tree_util.tree_flatten_with_path(params_shapes)[0],
      jax.tree.leaves(params_specs, is_leaf=lambda x: isinstance(x, P)))}

  def spec_for(keypath, leaf):
    path = _path(keypath)
    match = max((p for p in flat_params if f'/{p}/' in f'/{path}/'), key=len, default=None)
    shape = tuple(getattr(leaf, 'shape', ()))
    if match is None or not shape:
      return P()
    p_shape, p_spec = flat_params[match]
    p_spec = tuple(p_spec) + (None,) * (len(p_shape) - len(p_spec))
    if shape == tuple(p_shape):
      return P(*p_spec)
    if len(shape) == len(p_shape) - 1:
      # A square matrix's row and column statistics have the same shape: keep the most
      # sharded candidate (any of them divides the mesh, the shapes being equal).
      candidates = [p_spec[:d] + p_spec[d + 1:] for d in range(len(p_shape))
                    if tuple(p_shape[:d] + p_shape[d + 1:]) == shape]
      if candidates:
        return P(*max(candidates, key=lambda c: sum(e is not None for e in c)))
    return P()
  return jax.tree_util.tree_map_with_path(spec_for, tree_shapes)


def to_shardings(specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
  n = _axis_size(mesh, BATCH_AXES)
  if global_batch_size % n:
    raise PartitioningError(
        f'global batch size {global_batch_size} is not divisible by the {n} batch shards of the '
        f'mesh (data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]}); use a multiple of '
        f'{n}.')


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays split over ('data', 'fsdp')."""
  sharding = batch_sharding(mesh)
  out = {}
  for name, x in local_batch.items():
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, x, global_shape)
  return out


def axis_product(entry, axis_sizes: Mapping[str, int], skip=()) -> int:
  """Devices a PartitionSpec entry (None, an axis, or a tuple of axes) splits a dimension
  over on a mesh of `axis_sizes`, leaving out the axes in `skip`."""
  names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
  return math.prod(axis_sizes[n] for n in names if n not in skip)


def shard_bytes(shape: Sequence[int], spec, itemsize: int, axis_sizes: Mapping[str, int],
                skip=()) -> int:
  """Bytes of the largest shard of an array (dimensions rounded up, as XLA pads them)."""
  spec = tuple(spec or ()) + (None,) * len(shape)
  return math.prod(-(-n // axis_product(e, axis_sizes, skip)) for n, e in zip(shape, spec)) * (
      itemsize)


def per_device_bytes(shapes: Any, shardings: Any) -> int:
  """Bytes one device holds of a sharded tree (from shapes only, nothing allocated)."""
  total = 0
  for shape, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    local = sharding.shard_shape(tuple(shape.shape))
    total += math.prod(local) * np.dtype(shape.dtype).itemsize
  return total


# --- multi-host -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Explicit coordinator settings (GPU clusters); all None = auto-detect (TPU pods, SLURM)."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: Sequence[int] | None = None


_AUTO_ENV = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_JOB_ID',
             'OMPI_COMM_WORLD_SIZE')


def initialize_distributed(config: DistributedConfig | None = None) -> bool:
  """`jax.distributed.initialize` when running as several processes; a no-op on one host.

  Returns whether it initialised. Call before any other jax call.
  """
  config = config or DistributedConfig()
  explicit = config.coordinator_address is not None
  if not explicit and not any(k in os.environ for k in _AUTO_ENV):
    return False
  if explicit and (config.num_processes is None or config.process_id is None):
    raise PartitioningError('coordinator_address needs num_processes and process_id too')
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes,
                             process_id=config.process_id,
                             local_device_ids=config.local_device_ids)
  logging.info('jax.distributed: process %d of %d, %d local devices', jax.process_index(),
               jax.process_count(), jax.local_device_count())
  return True
