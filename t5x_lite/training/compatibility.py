"""Does a checkpoint fit this run's model? Checked before every restore, from what the
checkpoint records: its model config (`meta['model_config']`, checkpoints.meta_for) and its
tensor shapes (orbax's metadata of the `state` item: nothing is read).

Without it a warm start from a 2+2-layer checkpoint into a 1+1-layer model silently dropped
layers (orbax's partial restore ignores extra tensors), 2 -> 3 decoder layers failed inside
jax and a d_model change named no tensor. A mismatch now lists the differing config fields
and tensors (name, checkpoint shape, run shape).

A warm start that keeps only what fits is an explicit option (`TrainConfig.init_from_partial`,
gin INITIAL_CHECKPOINT_PARTIAL): tensors with the same name and shape load, the others keep
their fresh initialization, and the log lists both. T5X's RestoreCheckpointConfig is strict by
default and its `fallback_to_scratch` initializes only tensors missing from the checkpoint
(t5x/utils.py); the partial option also skips tensors whose shape differs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from t5x_lite import errors, validation
from t5x_lite import models
from t5x_lite.peft import spec as peft_spec
from t5x_lite.training import state as state_lib

# Fields a run may change without changing the model (dropout, compute and storage dtypes
# are cast on restore, rematerialization).
RUN_SETTINGS = ('dropout_rate', 'dtype', 'param_dtype', 'remat')
SHOWN = 12   # differences listed in an error; the rest are counted


class MismatchError(errors.UserError, ValueError):
  """A checkpoint whose model is not this run's (not a damaged checkpoint: never moved aside)."""


def flat(tree: Any) -> dict[str, Any]:
  """{'encoder/layers_0/mlp/wi_0': leaf}, in the tree's leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf for path, leaf in leaves}


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {name: tuple(leaf.shape) for name, leaf in flat(tree).items()}


def checkpoint_shapes(ckpt, step: int, meta: Mapping[str, Any]) -> dict[str, tuple] | None:
  """The parameter shapes a checkpoint stores: those its meta recorded at save (checkpoints.py),
  else orbax's metadata; None when neither can be read (a damaged checkpoint: the restore
  itself then says what is wrong). The recorded shapes come first: orbax's metadata read of a
  checkpoint that lost its manifest floods stderr with tensorstore's callback errors."""
  if meta.get('arrays'):
    return {name[len('params/'):]: tuple(entry['shape'])
            for name, entry in meta['arrays'].items() if name.startswith('params/')}
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(ckpt.step_dir(step) / 'state')
    return flat_shapes(tree['params'])
  except Exception as e:  # pylint: disable=broad-except
    logging.info('no tensor metadata in %s/%d (%s); shapes not compared', ckpt.directory, step, e)
    return None


def _recorded_config(recorded: Mapping[str, Any]) -> dict[str, Any]:
  """A checkpoint's model config with today's defaults for fields older metas lack."""
  try:
    return models.config_to_json(models.config_from_json(recorded, fill_defaults=True))
  except (TypeError, validation.ConfigError):
    return dict(recorded)


@dataclasses.dataclass
class Comparison:
  """How a checkpoint's model differs from a run's."""
  source: str
  fields: list[tuple[str, Any, Any]]                 # (field, checkpoint, run)
  tensors: list[tuple[str, Any, Any]]                # (name, checkpoint shape, run shape)
  matching: list[str]                                # tensors that load as they are
  unused: int = 0                                    # checkpoint tensors this run has not
  differing: int = 0                                 # tensors in `tensors` (a layer: several)

  @property
  def ok(self) -> bool:
    return not self.fields and not self.tensors

  def describe(self) -> str:
    parts = []
    if self.fields:
      parts.append('model config: ' + ', '.join(
          f'{name} {ours!r} in the checkpoint, {theirs!r} in this run'
          for name, ours, theirs in self.fields))
    if self.tensors:
      shown = [f'{name} {_shape(c)} -> {_shape(r)}' for name, c, r in self.tensors[:SHOWN]]
      more = len(self.tensors) - SHOWN
      parts.append(f'{self.differing} tensor(s) (checkpoint -> run): ' + ', '.join(shown) +
                   (f' and {more} more' if more > 0 else ''))
    return '; '.join(parts)

  def error(self, action: str, fix: str) -> MismatchError:
    return MismatchError(f'cannot {action} {self.source}: its model differs from this run\'s: '
                         f'{self.describe()}. {fix}')


def _shape(shape) -> str:
  if isinstance(shape, str):
    return shape
  return 'absent' if shape is None else str(list(shape))


def compare(ckpt, step: int, meta: Mapping[str, Any], model_config: Any,
            params_target: Any) -> Comparison:
  """The differences between checkpoint `step` of `ckpt` (with its `meta`) and a run of
  `model_config` whose parameters are `params_target` (arrays or shape structs)."""
  fields = []
  if meta.get('model_config'):
    recorded, run = _recorded_config(meta['model_config']), models.config_to_json(model_config)
    fields = [(name, recorded.get(name), value) for name, value in run.items()
              if name not in RUN_SETTINGS and recorded.get(name) != value]
  run_shapes = flat_shapes(params_target)
  stored = checkpoint_shapes(ckpt, step, meta)
  if stored is None:
    return Comparison(f'{ckpt.directory}/{step}', fields, [], sorted(run_shapes))
  tensors = [(name, stored.get(name), run_shapes.get(name))
             for name in sorted(set(stored) | set(run_shapes))
             if stored.get(name) != run_shapes.get(name)]
  matching = sorted(n for n in run_shapes if stored.get(n) == run_shapes[n])
  return Comparison(f'{ckpt.directory}/{step}', fields, _by_layer(tensors, stored, run_shapes),
                    matching, len(stored) - len(matching), len(tensors))


def _layer(name: str) -> str | None:
  parts = name.split('/')
  for i, part in enumerate(parts):
    if part.startswith('layers_'):
      return '/'.join(parts[:i + 1])
  return None


def _by_layer(tensors, stored, run):
  """A layer that only one side has is one entry, 'decoder/layers_2/* (14 tensors)', with
  'present' for its shapes; other differences stay per tensor."""
  only = {}
  for side, other in ((stored, run), (run, stored)):
    layers = {_layer(n) for n in side} - {_layer(n) for n in other} - {None}
    only.update({layer: side is stored for layer in layers})
  out, seen = [], set()
  for name, ckpt_shape, run_shape in tensors:
    layer = _layer(name)
    if layer not in only:
      out.append((name, ckpt_shape, run_shape))
    elif layer not in seen:
      seen.add(layer)
      count = sum(_layer(n) == layer for n in (stored if only[layer] else run))
      out.append((f'{layer}/* ({count} tensors)', 'present' if only[layer] else None,
                  None if only[layer] else 'present'))
  return out


def check(ckpt, step: int, meta: Mapping[str, Any], model_config: Any,
          params_target: Any, action: str, fix: str) -> None:
  """Raise MismatchError naming every difference unless the checkpoint is this model's."""
  comparison = compare(ckpt, step, meta, model_config, params_target)
  if not comparison.ok:
    raise comparison.error(action, fix)


RESUME_FIX = ('A run resumes with the model it was started with: restore its model config, or '
              'train the new model in another model_dir (INITIAL_CHECKPOINT_PATH warm-starts it '
              'from this one).')
WARM_START_FIX = ('Use the checkpoint\'s model config (e.g. the model.gin `t5x-lite convert` '
                  'wrote), or set INITIAL_CHECKPOINT_PARTIAL=True (loop.TrainConfig.'
                  'init_from_partial) to load only the tensors that match.')


def check_model_dir(ckpt, model_config: Any, params_target: Any,
                    adapters: Any = None) -> None:
  """Before a run restores from its own model_dir: the newest checkpoint (a converted one is
  a warm start, any other a resume) must be this model's, with the same adapters (or none).
  A checkpoint too damaged to say is left to the restore, which moves it aside."""
  step = ckpt.latest_step()
  if step is None:
    return
  try:
    meta = ckpt.meta(step)
  except errors.UserError:
    return
  if not meta.get('params_only'):
    peft_spec.check_same_spec(meta, adapters, f'{ckpt.directory} step {step}')
  elif adapters is not None:
    raise peft_spec.AdapterError(
        f'{ckpt.directory} holds a converted checkpoint: an adapter run reads its base from '
        'INITIAL_CHECKPOINT_PATH; point it there and train the adapters in another model_dir.')
  if meta.get('params_only'):   # a partial warm start reads another directory
    check(ckpt, step, meta, model_config, params_target, 'warm-start from',
          'Use the checkpoint\'s model config (the model.gin `t5x-lite convert` wrote), or '
          'convert into another directory and warm-start from it with INITIAL_CHECKPOINT_PATH '
          'and INITIAL_CHECKPOINT_PARTIAL=True.')
  else:
    check(ckpt, step, meta, model_config, params_target, 'resume from', RESUME_FIX)


def warm_start(source, step: int | None, model: models.Model, optimizer, layout, rng,
               partial: bool = False):
  """A fresh TrainState of `model` with the parameters of `source` (a Checkpointer) at `step`
  (default: latest); with `partial`, only the tensors that match, the others freshly
  initialized."""
  step = source.latest_step() if step is None else step
  if step is None:
    raise MismatchError(f'no checkpoint to warm-start from in {source.directory}')
  target = layout.abstract().params
  comparison = compare(source, step, source.meta(step), model.config, target)
  if comparison.ok:
    params = source.restore_params(target, step)
    return state_lib.create_state(model, optimizer, layout, rng, params=params)
  if not partial:
    raise comparison.error('warm-start from', WARM_START_FIX)
  keep = set(comparison.matching)
  subset = _nested({n: leaf for n, leaf in flat(target).items() if n in keep})
  loaded = flat(source.restore_params(subset, step)) if subset else {}
  fresh = flat(state_lib.create_state(model, optimizer, layout, rng).params)
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target),
                                        [loaded.get(n, leaf) for n, leaf in fresh.items()])
  skipped = [t for t in comparison.tensors if t[2] is not None]
  unused = [t[0] for t in comparison.tensors if t[2] is None]
  logging.warning(
      'Partial warm start from %s: loaded %d tensor(s), %d freshly initialized (%s), %d of the '
      'checkpoint unused (%s)%s', comparison.source, len(loaded), len(fresh) - len(loaded),
      ', '.join(f'{n} {_shape(c)} -> {_shape(r)}' for n, c, r in skipped) or 'none',
      comparison.unused, ', '.join(unused) or 'none',
      f'; {comparison.describe().split("; ")[0]}' if comparison.fields else '')
  return state_lib.create_state(model, optimizer, layout, rng, params=params)


def _nested(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for name, leaf in flat.items():
    node = out
    *parents, last = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def note_mixture_change(meta: Mapping[str, Any], mixture: str, writer, step: int) -> None:
  """A run resumed with another mixture than its checkpoint's trains on another data stream
  from here on: warn, and record it in metrics.jsonl at the step resumed from."""
  before = meta.get('mixture')
  if before is None or before == mixture:
    return
  logging.warning('Resuming step %d with mixture %r; the checkpoint was trained on %r (the '
                  'data stream changes here; recorded in metrics.jsonl)', step, mixture, before)
  writer.event(step, 'mixture_changed', checkpoint_mixture=before, mixture=mixture)
