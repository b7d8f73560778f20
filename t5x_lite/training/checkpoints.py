"""Orbax checkpoints: `MODEL_DIR/checkpoints/<step>/{state, data, meta}`.

- state: the TrainState as a dict (step, params, opt_state, skip counters), restorable onto
  any mesh (the restore target carries the shardings); a params-only state (from `convert`)
  serves warm starts.
- data: the data-iterator state, one JSON file per data shard (data_state.py), so a run
  resumes with any process count that divides its `num_data_shards` (recorded in meta).
- meta: JSON: model config, vocabulary, mixture, library versions, per state array its shape,
  dtype and checksum (checksums.py), the sha256 of every data-state file (`data_files`), and
  a sha256 of the meta itself (`meta_checksum`, over its canonical JSON), which every
  restore verifies.
Orbax writes into a temporary directory and renames it when complete, so a checkpoint
half-written when a run was killed is never listed, never restored. One damaged later (bytes
changed, a file truncated or deleted, meta edited) is a CorruptCheckpoint naming what is
wrong: training moves it to `MODEL_DIR/checkpoints_broken/<step>-<kind>` and resumes from the
newest good one (newest_good); eval, infer and export report it and move nothing. One written
before a checksum was recorded restores with a warning that it is unverified.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from t5x_lite import errors, models
from t5x_lite.rundir import paths, provenance
from t5x_lite.data.sources import DataError
from t5x_lite.training import checksums, data_state
from t5x_lite.training.state import StateLayout, TrainState

_STATE_FIELDS = ('step', 'params', 'opt_state', 'skipped_steps', 'bad_streak')


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint directory that cannot be read as asked."""


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


def state_to_dict(state: TrainState) -> dict:
  return {f: getattr(state, f) for f in _STATE_FIELDS}


class CorruptCheckpoint(CheckpointError):
  """A checkpoint whose files are missing, unreadable or changed since they were written
  (not a checkpoint that fits another model: that is a plain CheckpointError)."""

  def __init__(self, directory: str, step: int, reason: str, kind: str):
    super().__init__(f'checkpoint {directory}/{step} is damaged: {reason}')
    self.step, self.reason, self.kind = step, reason, kind


def first_line(e: Exception, limit: int = 300) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + '...'


class Checkpointer:
  """Saves and restores run state in `model_dir/checkpoints`."""

  def __init__(self, model_dir: str, max_to_keep: int | None = None, async_save: bool = True,
               preservation_policy=None):
    """`preservation_policy` replaces `max_to_keep` (e.g. best_checkpoint's: the latest N
    plus the best)."""
    self.model_dir = paths.absolute(model_dir)
    self.directory = paths.under(self.model_dir, 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if preservation_policy else max_to_keep, create=True,
        enable_async_checkpointing=async_save, preservation_policy=preservation_policy)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))
    self._verified = None   # (step, partial, state) of the last newest_good(): restored once
    self._warned: set[int] = set()   # steps whose unverified parts were warned of

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState | dict, data_iterator=None,
           meta: dict | None = None) -> None:
    """Asynchronous: returns once the arrays are copied off the devices. The meta records
    every array's shape, dtype and checksum, every data-state file's checksum (of all
    processes: process 0 writes the meta) and its own, which every restore verifies."""
    state_dict = state if isinstance(state, dict) else state_to_dict(state)
    files = data_state.files_of(data_iterator.get_state()) if data_iterator is not None else None
    meta = dict(meta or {}, step=int(step), versions=provenance.versions(),
                arrays=checksums.record(state_dict))
    if files is not None:
      meta['data_files'] = data_state.record(files)
    meta = json.loads(json.dumps(meta))   # as it reads back (tuples as lists, ...)
    meta['meta_checksum'] = checksums.json_digest(meta)
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state_dict), data=data_state.DataSave(files),
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

  def _corrupt(self, step: int, reason: str, kind: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(self.directory, step, reason, kind)

  def meta(self, step: int | None = None) -> dict:
    """The meta of `step` (default: latest), verified against the checksum it records."""
    step = self._step(step)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
          'meta']
    except Exception as e:  # orbax raises many types for damaged files
      if not (self.step_dir(step) / 'meta' / 'metadata').exists():
        raise self._corrupt(step, 'meta/metadata is missing', 'meta') from e
      raise self._corrupt(step, f'meta/metadata is unreadable ({first_line(e)})', 'meta') from e
    recorded = meta.get('meta_checksum') if isinstance(meta, dict) else None
    if recorded is not None and checksums.json_digest(
        {k: v for k, v in meta.items() if k != 'meta_checksum'}) != recorded:
      raise self._corrupt(step, 'meta/metadata was changed since it was saved (its checksum '
                          'differs)', 'meta')
    return meta

  def _warn_unverified(self, step: int, meta: dict) -> None:
    """Once per step: a checkpoint written before (some of) its checksums were recorded."""
    unverified = [what for what, key in (('arrays', 'arrays'), ('meta', 'meta_checksum'), (
        'data-iterator state', None if meta.get('params_only') else 'data_files'))
                  if key is not None and meta.get(key) is None]
    if unverified and step not in self._warned:
      self._warned.add(step)
      logging.warning('checkpoint %s/%d is unverified: it records no checksums of its %s '
                      '(written by an older version)', self.directory, step,
                      ', '.join(unverified))

  def _restore_state(self, step: int, target: dict, partial: bool = False) -> dict:
    """The state items of `target` at `step`, verified against the checksums recorded at
    save; restored in the stored dtypes (what the checksums cover), then cast to the
    target's. Raises CorruptCheckpoint for damage, CheckpointError for another model."""
    if self._verified is not None and self._verified[:2] == (step, partial):
      state, self._verified = self._verified[2], None
      return state
    meta = self.meta(step)
    self._warn_unverified(step, meta)
    recorded = meta.get('arrays')
    state_dir = self.step_dir(step) / 'state'
    if not state_dir.exists():
      raise self._corrupt(step, 'the state/ directory is missing', 'state-missing')
    stored = target
    if recorded is not None:
      # orbax's own index files, checked first: a restore without them fails on every array
      # at once and floods stderr with 'Event loop is closed' from tensorstore's callbacks.
      needed = ['_METADATA', 'manifest.ocdbt'] + [
          f'{d.name}/manifest.ocdbt' for d in state_dir.glob('ocdbt.process_*')]
      missing = [n for n in needed if not (state_dir / n).exists()]
      if missing:
        verb = 'is' if len(missing) == 1 else 'are'
        raise self._corrupt(step, f'state/{", state/".join(missing)} {verb} missing',
                            'state-unreadable')
      self._check_fits(step, target, recorded, partial)
      stored = jax.tree_util.tree_map_with_path(lambda p, t: jax.ShapeDtypeStruct(
          t.shape, recorded[checksums.path_key(p)]['dtype'], sharding=t.sharding), target)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=stored, restore_args=ocp.checkpoint_utils.construct_restore_args(stored),
          partial_restore=partial)))['state']
    except Exception as e:
      if recorded is None:   # written before checksums: damage and mismatch look alike
        raise CheckpointError(f'cannot restore {self.directory}/{step}: {e}') from e
      raise self._corrupt(step, f'its arrays cannot be read ({first_line(e)})',
                          'state-unreadable') from e
    if recorded is None:   # unverified (warned above)
      return state
    bad = checksums.mismatches(state, recorded)
    if bad:
      names = ', '.join(bad[:3]) + (', ...' if len(bad) > 3 else '')
      raise self._corrupt(step, f'{len(bad)} of {len(recorded)} arrays differ from the '
                          f'checksums recorded when it was saved ({names})', 'checksum')
    return checksums.cast_like(state, target)

  def _check_fits(self, step: int, target: dict, recorded: dict, partial: bool) -> None:
    wanted = {k: list(v.shape) for k, v in checksums.flatten(target).items()}
    differ = [f'{k}: checkpoint {recorded[k]["shape"]}, this run {s}'
              for k, s in wanted.items() if k in recorded and recorded[k]['shape'] != s]
    differ += [f'{k}: only in this run' for k in wanted if k not in recorded]
    if not partial:
      differ += [f'{k}: only in the checkpoint' for k in recorded if k not in wanted]
    if differ:
      raise CheckpointError(
          f'the checkpoint {self.directory}/{step} holds other arrays than this run\'s model '
          f'and optimizer ({len(differ)} differ: {"; ".join(differ[:5])}'
          f'{"; ..." if len(differ) > 5 else ""})')

  def _check_data(self, step: int, meta: dict) -> None:
    """Every data-state file the meta names (or, without their checksums, what it must
    hold), whichever process reads it: all processes decide alike."""
    reason = data_state.problem(self.step_dir(step) / 'data',
                                meta.get('data_files'))
    if reason:
      raise self._corrupt(step, reason, 'data')

  def newest_good(self, layout: StateLayout) -> tuple[int | None, dict]:
    """(step, meta) of the newest checkpoint that restores and verifies onto `layout`
    ((None, {}) without checkpoints). Damaged newer ones are moved to
    `model_dir/checkpoints_broken/<step>-<kind>` (never deleted), with a warning; if none is
    good, nothing moves and a CheckpointError lists them. The verified state is kept for
    the restore() or restore_params() of that step that follows."""
    broken = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.meta(step)
        abstract = layout.abstract()
        if meta.get('params_only'):
          state = self._restore_state(step, {'params': abstract.params}, partial=True)
          self._verified = (step, True, state)   # what _restore_state returns
        else:
          self._check_data(step, meta)
          self._verified = (step, False, self._restore_state(
              step, {f: getattr(abstract, f) for f in _STATE_FIELDS}))
      except CorruptCheckpoint as e:
        logging.warning('%s', e)
        broken.append(e)
        continue
      for e in broken:
        self.move_aside(e.step, e.kind)
      if broken:
        note = (f'resuming from step {step}: the newer checkpoint(s) '
                f'{", ".join(f"{e.step} ({e.reason})" for e in broken)} were damaged and moved '
                f'to {self.broken_dir()}')
        logging.warning('%s', note)
        if jax.process_index() == 0:
          print(note, flush=True)
      return step, meta
    if broken:
      raise CheckpointError(
          f'no usable checkpoint in {self.directory}: '
          f'{"; ".join(f"step {e.step}: {e.reason}" for e in broken)}. Move them away to train '
          'from scratch in this model_dir.')
    return None, {}

  def step_dir(self, step: int) -> epath.Path:
    """checkpoints/<step>/ (paths.under, as every path the library derives)."""
    return epath.Path(paths.under(self.directory, str(int(step))))

  def broken_dir(self) -> str:
    return paths.under(self.model_dir, 'checkpoints_broken')

  def move_aside(self, step: int, kind: str) -> None:
    """Checkpoint `step` out of what orbax lists, to `checkpoints_broken/<step>-<kind>` (`-2`,
    ... if taken), never deleted: damaged ones, and those of a non-finite stop (guard.py).
    Process 0 moves it; every process then rereads the steps."""
    if jax.process_index() == 0:
      broken = epath.Path(self.broken_dir())
      target, n = epath.Path(paths.under(str(broken), f'{step}-{kind}')), 1
      broken.mkdir(parents=True, exist_ok=True)
      while target.exists():
        n += 1
        target = epath.Path(paths.under(str(broken), f'{step}-{kind}-{n}'))
      self.step_dir(step).rename(target)
      logging.warning('moved checkpoint %s/%d (%s) to %s', self.directory, step, kind, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_moved_aside_{step}')
    self.manager.reload()

  def restore(self, layout: StateLayout, step: int | None = None,
              data_iterator=None) -> tuple[TrainState, dict]:
    """The full state at `step` (default: latest), verified and resharded to `layout`;
    restores the data iterator in place when given."""
    step = self._step(step)
    meta = self.meta(step)
    if data_iterator is not None:
      self._check_data(step, meta)
    abstract = layout.abstract()
    state = self._restore_state(step, {f: getattr(abstract, f) for f in _STATE_FIELDS})
    if data_iterator is not None:
      try:
        self.manager.restore(step, args=ocp.args.Composite(
            data=data_state.DataRestore(data_iterator)))
      except (CheckpointError, DataError):
        raise   # the data state's own errors name the problem and the fix
      except Exception as e:
        raise self._corrupt(step, f'the data-iterator state is unreadable ({first_line(e)})',
                            'data') from e
    logging.info('Restored checkpoint %s/%d', self.directory, step)
    return TrainState(**state), meta

  def restore_params(self, params_target: Any, step: int | None = None) -> Any:
    """Only the parameters (from a full or a params-only checkpoint), verified and resharded
    to the target's shardings: warm starts and inference."""
    step = self._step(step)
    return self._restore_state(step, {'params': params_target}, partial=True)['params']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def meta_for(config, vocabulary: str, mixture: str, extra: dict | None = None) -> dict:
  """A checkpoint's meta: the model config with its family (models.config_to_json), the
  vocabulary, the mixture and `extra`."""
  return dict(model_config=models.config_to_json(config), vocabulary=vocabulary,
              mixture=mixture, **(extra or {}))
