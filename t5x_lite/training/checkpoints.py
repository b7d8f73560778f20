"""Orbax checkpoints: `MODEL_DIR/checkpoints/<step>/{state, data, meta}`.

- state: the TrainState as a dict (step, params, opt_state, skip counters), restorable onto
  any mesh (the restore target carries the shardings); a params-only state (from `convert`)
  serves warm starts.
- data: each process's data-iterator state (grain's per-process JSON files).
- meta: JSON: model config, vocabulary, mixture, library versions.
Orbax writes into a temporary directory and renames it when complete, so a checkpoint
half-written when a run was killed is never listed, never restored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from t5x_lite import paths
from t5x_lite.training.state import StateLayout, TrainState

_STATE_FIELDS = ('step', 'params', 'opt_state', 'skipped_steps', 'bad_streak')


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be read as asked."""


class _DataStateSnapshot:
  """The data iterator's state at save time, in the shape grain's handler writes (bytes)."""

  def __init__(self, iterator):
    self.iterator = iterator
    self.snapshot = json.dumps(iterator.get_state()).encode() if iterator is not None else b'{}'

  def get_state(self) -> bytes:
    return self.snapshot

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:  # grain's handler calls it after a restore
    pass


def versions() -> dict[str, str]:
  import flax  # pylint: disable=import-outside-toplevel
  import t5x_lite  # pylint: disable=import-outside-toplevel
  return {'t5x_lite': t5x_lite.__version__, 'jax': jax.__version__, 'flax': flax.__version__,
          'orbax': ocp.__version__ if hasattr(ocp, '__version__') else 'unknown',
          'grain': getattr(grain, '__version__', 'unknown')}


def state_to_dict(state: TrainState) -> dict:
  return {f: getattr(state, f) for f in _STATE_FIELDS}


class Checkpointer:
  """Saves and restores run state in `model_dir/checkpoints`."""

  def __init__(self, model_dir: str, max_to_keep: int | None = None, async_save: bool = True):
    self.directory = paths.join(paths.absolute(model_dir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState | dict, data_iterator=None,
           meta: dict | None = None) -> None:
    """Asynchronous: returns once the arrays are copied off the devices."""
    state_dict = state if isinstance(state, dict) else state_to_dict(state)
    meta = dict(meta or {}, step=int(step), versions=versions())
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state_dict),
        data=grain.checkpoint.CheckpointSave(_DataStateSnapshot(data_iterator)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def _step(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'no complete checkpoint in {self.directory}')
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointError(f'no checkpoint for step {step} in {self.directory}; it has {steps}')
    return step

  def meta(self, step: int | None = None) -> dict:
    step = self._step(step)
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
          'meta']
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f'cannot read the metadata of {self.directory}/{step}: {e}') from e

  def restore(self, layout: StateLayout, step: int | None = None,
              data_iterator=None) -> tuple[TrainState, dict]:
    """The full state at `step` (default: latest), resharded to `layout`; restores the data
    iterator in place when given."""
    step = self._step(step)
    target = {f: getattr(layout.abstract(), f) for f in _STATE_FIELDS}
    items: dict[str, Any] = {
        'state': ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
        'meta': ocp.args.JsonRestore()}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(_DataStateSnapshot(data_iterator))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(
          f'cannot restore {self.directory}/{step} onto this model and optimizer: {e}. A run '
          'resumes with the model config and optimizer it was started with; use --init_from '
          'to warm-start only the parameters.') from e
    logging.info('Restored checkpoint %s/%d', self.directory, step)
    return TrainState(**restored['state']), restored['meta']

  def restore_params(self, params_target: Any, step: int | None = None) -> Any:
    """Only the parameters (from a full or a params-only checkpoint), resharded to the
    target's shardings: warm starts and inference."""
    step = self._step(step)
    target = {'params': params_target}
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
    except Exception as e:
      raise CheckpointError(f'cannot read parameters from {self.directory}/{step} for this '
                            f'model: {e}') from e
    return restored['state']['params']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def meta_for(config, vocabulary: str, mixture: str, extra: dict | None = None) -> dict:
  return dict(model_config=dataclasses.asdict(config), vocabulary=vocabulary, mixture=mixture,
              **(extra or {}))
