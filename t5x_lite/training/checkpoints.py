"""Orbax checkpoints: `MODEL_DIR/checkpoints/<step>/{state, data, meta}`.

- state: the TrainState as a dict (step, params, opt_state, skip counters), restorable onto
  any mesh (the restore target carries the shardings); a params-only state (from `convert`)
  serves warm starts.
- data: the data-iterator state, one JSON file per data shard (DataStateHandler), so a run
  resumes with any process count that divides its `num_data_shards` (recorded in meta).
- meta: JSON: model config, vocabulary, mixture, library versions.
Orbax writes into a temporary directory and renames it when complete, so a checkpoint
half-written when a run was killed is never listed, never restored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from t5x_lite import errors, paths
from t5x_lite.data import pipeline
from t5x_lite.training.state import StateLayout, TrainState

_STATE_FIELDS = ('step', 'params', 'opt_state', 'skipped_steps', 'bad_streak')


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint directory that cannot be read as asked."""


class DataStateHandler:
  """Orbax handler for the data iterator's state: one `shard_<s>-of-<S>.json` per data shard.

  Every process writes the files of the shards it reads; a restore reads the files of the
  shards the process reads now, whoever wrote them. (grain's CheckpointHandler writes one
  file per process and restores only in the same process count.) Checkpoints written by
  grain's handler (`process_<p>-of-<P>.json`) are still read.
  """

  def save(self, directory, item=None, args=None):
    state = args.state if args is not None else item
    if state is None:   # params-only checkpoints carry no data state
      return
    for shard, entry in state['shards'].items():
      name = f'shard_{int(shard):05d}-of-{state["num_shards"]:05d}.json'
      (directory / name).write_text(json.dumps({'batches': state['batches'], **entry}))

  def restore(self, directory, item=None, args=None):
    iterator = args.iterator if args is not None else item
    files = {}
    for path in directory.glob('shard_*-of-*.json'):
      shard, num_shards = map(int, re.fullmatch(r'shard_(\d+)-of-(\d+)\.json', path.name).groups())
      files[shard] = (num_shards, path)
    if files:
      saved = next(iter(files.values()))[0]
      if saved != iterator.num_shards:
        raise CheckpointError(
            f'the data state in {directory} has {saved} data shards, this run reads '
            f'{iterator.num_shards}: resume with num_data_shards={saved} (and a process count '
            f'that divides {saved}).')
      entries = {str(s): json.loads(files[s][1].read_text())
                 for s in iterator.shard_ids if s in files}
      state = {'num_shards': saved, 'shards': entries,
               'batches': next(iter(entries.values()))['batches'] if entries else 0}
    else:
      state = pipeline.merge_states(_legacy_states(directory))
    iterator.set_state(state)
    return iterator

  def structure(self, directory):
    del directory

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f'{cls.__module__}.{cls.__qualname__}'


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  state: dict | None   # DataIterator.get_state(), taken when the save is called


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  iterator: Any        # a pipeline.DataIterator, restored in place


def _legacy_states(directory) -> list[dict]:
  """Per-process states written by grain's handler, in today's per-shard layout."""
  states = [json.loads(p.read_text()) for p in sorted(directory.glob('process_*-of-*.json'))]
  if not states or not all(states):
    raise CheckpointError(f'no data iterator state in {directory}')
  num_shards = sum(len(s['shards']) for s in states)
  return [{'num_shards': num_shards, 'batches': s['batches'],
           'shards': {str(shard): {'iterator': it, 'stats': s['stats'] if i == 0 else {}}
                      for i, (shard, it) in enumerate(zip(s['shards'], s['iterators']))}}
          for s in states]


def resume_data_shards(requested: int | None, meta: dict,
                       process_count: int | None = None) -> int | None:
  """The num_data_shards of a run resuming from a checkpoint with `meta` (None: a fresh run,
  pipeline's default). The checkpoint's count wins, since another count is another data
  stream; asking for a different one, or a process count that does not divide it, fails."""
  saved = meta.get('num_data_shards')
  if saved is None:
    return requested
  process_count = process_count or jax.process_count()
  if requested is not None and requested != saved:
    raise CheckpointError(
        f'num_data_shards={requested} was asked, but the checkpoint at step {meta.get("step")} '
        f'was written with num_data_shards={saved}, and another shard count is another data '
        f'stream. Leave num_data_shards unset (or set it to {saved}) to resume, or train into '
        'a new model_dir.')
  if saved % process_count:
    divisors = [d for d in range(1, saved + 1) if saved % d == 0]
    raise CheckpointError(
        f'the checkpoint at step {meta.get("step")} holds {saved} data shards, which '
        f'{process_count} processes cannot split evenly: resume with a process count that '
        f'divides {saved} ({divisors}), or train into a new model_dir.')
  return saved


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
        data=DataSave(data_iterator.get_state() if data_iterator is not None else None),
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
      items['data'] = DataRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (CheckpointError, pipeline.DataError):
      raise   # the data state's own errors name the problem and the fix
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
