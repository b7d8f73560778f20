"""An adapter run's life around the train step: its spec for a mixture, its frozen base
(loaded from INITIAL_CHECKPOINT_PATH or drawn from the seed), the base's identity checked on
every restore, and the whole params tree rebuilt for eval, infer and export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from t5x_lite import models, partitioning
from t5x_lite.peft import params as peft_params
from t5x_lite.peft.spec import AdapterError, AdapterSpec
from t5x_lite.training import checkpoints, compatibility, state as state_lib


def spec_for_mixture(spec: AdapterSpec | None, mixture) -> AdapterSpec | None:
  """The spec with the mixture's tasks as the task bank's slots (so a batch's task ids are
  slots) and, for group sharing without explicit groups, one group per sub-mixture."""
  if spec is None:
    return None
  names = [t.name for t in mixture.tasks]
  groups = spec.groups
  if not groups and spec.lora and 'group' in spec.lora.banks:
    from t5x_lite.data import mixtures  # pylint: disable=import-outside-toplevel
    groups = tuple((obj.name, tuple(t.name for t in obj.tasks))
                   for obj, _ in mixture._resolved()  # pylint: disable=protected-access
                   if isinstance(obj, mixtures.Mixture))
    if not groups:
      raise AdapterError(
          f'peft sharing={spec.lora.sharing!r} needs task groups: mixture {mixture.name!r} has '
          "no sub-mixtures; bind peft.AdapterSpec.groups = {'group': ['task', ...]}.")
  unknown = sorted({t for _, members in groups for t in members} - set(names))
  if unknown:
    raise AdapterError(f'peft groups name tasks that are not in mixture {mixture.name!r}: '
                       f'{", ".join(unknown)}; its tasks: {", ".join(names)}.')
  return dataclasses.replace(spec, tasks=tuple(names), groups=groups)


def base_shardings(base: models.Model, mesh, rules) -> Any:
  """ShapeDtypeStructs (with shardings) of the base model's parameters: a restore target."""
  shapes = nn.unbox(base.abstract_params())
  specs = partitioning.param_specs(base.logical_axes(), rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, partitioning.to_shardings(specs, mesh))


def load_base(init_from: str | None, step: int | None, base: models.Model, target: Any
              ) -> tuple[Any, str]:
  """(base params sharded as `target`, source description). None when there is no
  INITIAL_CHECKPOINT_PATH: the base is then drawn from the run's seed."""
  if not init_from:
    return None, 'random init (the run\'s seed)'
  source = checkpoints.Checkpointer(init_from, async_save=False)
  try:
    step = source.latest_step() if step is None else step
    if step is None:
      raise AdapterError(f'no checkpoint in the adapter base {init_from}')
    meta = source.meta(step)
    if meta.get('peft'):
      raise AdapterError(f'the adapter base {init_from} is itself an adapter run; use its base '
                         '(or export it merged and convert that) as INITIAL_CHECKPOINT_PATH.')
    compatibility.check(source, step, meta, base.config, target, 'use as adapter base',
                        'An adapter run uses its base\'s model config (its model.gin).')
    return source.restore_params(target, step), f'{source.directory}@{step}'
  finally:
    source.close()


def check_base(recorded: dict | None, identity: dict, where: str) -> None:
  """The base in hand must be the one the adapters were trained on."""
  if not recorded:
    return
  if recorded.get('digest') != identity['digest']:
    raise AdapterError(
        f'{where}: the adapters were trained on base {recorded.get("source")} (digest '
        f'{recorded.get("digest")}), but the base loaded now, {identity["source"]}, has digest '
        f'{identity["digest"]}. Point INITIAL_CHECKPOINT_PATH (or --base) at the original base.')


def restore_for_inference(model_dir: str, step: int | None, mesh=None, rules=None,
                          base_dir: str | None = None):
  """(model config, spec or None, whole params tree, meta) of an adapter run's checkpoint:
  its trainable leaves plus the base it recorded (or `base_dir`), identity checked.
  Arrays are replicated over `mesh` (default: one device)."""
  ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
  try:
    meta = ckpt.meta(step)
    spec = AdapterSpec.from_json(meta.get('peft'))
    config = models.config_from_json(meta['model_config'])
    model = models.build(config, adapters=spec)
    if mesh is None:
      mesh = partitioning.make_mesh({'data': 1}, devices=jax.local_devices()[:1])
    rules = rules or partitioning.rules_for('dp')
    full = nn.unbox(model.abstract_params())
    specs = partitioning.param_specs(model.logical_axes(), rules)
    shardings = partitioning.to_shardings(specs, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          full, shardings)
    trainable_target, frozen_target = peft_params.split(target, spec)
    trainable = ckpt.restore_params(trainable_target, meta['step'])
  finally:
    ckpt.close()
  recorded = meta.get('peft_base') or {}
  source = base_dir or recorded.get('source', '')
  if source.startswith('random init'):
    seed = int(meta.get('seed', 0))
    frozen = state_lib.frozen_from_seed(model, seed, frozen_target)
  else:
    path, _, at = source.rpartition('@') if '@' in source else (source, '', '')
    base_model = model.with_adapters(None)
    base, _ = load_base(path, int(at) if at else None, base_model,
                        base_shardings(base_model, mesh, rules))
    frozen = peft_params.split(base, spec)[1]
  check_base(recorded, peft_params.base_identity(frozen, source), f'{model_dir} step '
             f'{meta["step"]}')
  return config, spec, peft_params.combine(trainable, frozen), meta
