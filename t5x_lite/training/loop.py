"""The training loop: data -> sharded train step -> metrics, checkpoints and periodic eval.

A run started on a model_dir with checkpoints resumes from the latest complete one (state
and data iterator), so a killed run restarted with the same command continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm

from t5x_lite import decoding, errors, evaluation, partitioning, validation
from t5x_lite.evaluation import contamination, heldout, sets as eval_sets
from t5x_lite.rundir import names, paths, provenance, writers
from t5x_lite.data import feature_converters, mixtures, pipeline, vocab as vocab_lib
from t5x_lite.training import (best_checkpoint, checkpoints, guard as guard_lib, losses,
                               optimizers, start as start_lib, step as step_lib)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. Field names follow T5X's gin macros where it has them."""
  model_dir: str
  mixture: Any = 'builtin'                          # MIXTURE_OR_TASK_NAME (name or object)
  vocabulary: str = 'byte'                          # 'byte' or a spiece.model path
  feature_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {'inputs': 512, 'targets': 128})   # TASK_FEATURE_LENGTHS
  batch_size: int = 128                             # BATCH_SIZE (global)
  train_steps: int = 1000                           # TRAIN_STEPS (total, resumes included)
  seed: int = 0                                     # SEED
  pack: bool = True
  mesh_shape: Mapping[str, int] = dataclasses.field(default_factory=lambda: {'data': -1})
  partitioning: str = 'dp'                          # dp | fsdp | tp | fsdp_tp
  optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig()
  microbatches: int = 1                             # gradient accumulation
  loss: step_lib.LossConfig = step_lib.LossConfig()
  log_period: int = 100                             # LOG_PERIOD
  checkpoint_period: int = 1000                     # CHECKPOINT_PERIOD
  max_to_keep: int | None = 3
  async_checkpointing: bool = True
  eval_period: int = 0                              # EVAL_PERIOD; 0: only at the end
  eval_at_end: bool = True
  eval_mixture: Any = None                          # default: the training mixture
  eval_mixtures: Any = None                         # named eval sets (eval_sets.py)
  eval_split: str = 'validation'
  eval_batch_size: int = 64
  eval_max_examples: int | None = None              # per task
  eval_decoding: decoding.DecodingConfig = decoding.DecodingConfig()
  keep_best: str | None = None                      # e.g. 'eval/heldout/avg/score'
  keep_best_mode: str = 'max'                       # or 'min' (a loss)
  keep_best_allow_heldout: bool = False             # select on a held-out set anyway
  audit_threshold: float = 0.01                     # held-out sets: most contaminated
                                                    # fraction of a task (1.0: no audit)
  audit: contamination.AuditConfig = contamination.AuditConfig(   # the train-start audit:
      max_train_examples=20_000, time_budget_s=20.0)  # a sample, bounded in time
  init_from: str | None = None                      # INITIAL_CHECKPOINT_PATH (params only)
  init_from_partial: bool = False                   # INITIAL_CHECKPOINT_PARTIAL: load only
                                                    # the tensors that match, init the rest
  adapters: Any = None                              # peft.AdapterSpec: train adapters beside
                                                    # a frozen base (INITIAL_CHECKPOINT_PATH)
  feature_converter: Any = None                     # FEATURE_CONVERTER_CLS: default, the
                                                    # model's (`for_kind(model.feature_kind)`);
                                                    # e.g. DecoderOnlyFeatureConverter(
                                                    # loss_on_targets_only=False)
  max_bad_steps: int = 5                            # consecutive non-finite steps tolerated
  num_data_shards: int | None = None                # default: processes; resume: checkpoint's
  progress_bar: bool = True

  def __post_init__(self):
    names.check('eval_split', self.eval_split)   # a directory under MODEL_DIR/eval/<step>/
    validation.check(self, {
        'feature_lengths': '> 0', 'batch_size': '> 0', 'train_steps': '> 0',
        'microbatches': '>= 1', 'log_period': '> 0', 'checkpoint_period': '> 0',
        'max_to_keep': '>= 1', 'eval_period': '>= 0', 'eval_batch_size': '> 0',
        'eval_max_examples': '> 0', 'max_bad_steps': '>= 1', 'num_data_shards': '>= 1',
        'audit_threshold': '[0, 1]'}, {
        'mixture': 'MIXTURE_OR_TASK_NAME', 'vocabulary': 'VOCABULARY',
        'feature_lengths': 'TASK_FEATURE_LENGTHS', 'batch_size': 'BATCH_SIZE',
        'train_steps': 'TRAIN_STEPS', 'seed': 'SEED', 'mesh_shape': 'MESH_SHAPE',
        'partitioning': 'PARTITIONING', 'log_period': 'LOG_PERIOD',
        'checkpoint_period': 'CHECKPOINT_PERIOD', 'eval_period': 'EVAL_PERIOD',
        'init_from': 'INITIAL_CHECKPOINT_PATH', 'init_from_partial': 'INITIAL_CHECKPOINT_PARTIAL'})


class TrainingError(errors.UserError, RuntimeError):
  pass


def _check_vocab(model_config: Any, vocab: vocab_lib.Vocabulary) -> None:
  if vocab.vocab_size > model_config.vocab_size:
    raise TrainingError(
        f'the vocabulary {vocab.spec!r} has {vocab.vocab_size} ids but the model embeds only '
        f'{model_config.vocab_size}; use a model config with vocab_size >= {vocab.vocab_size}.')


_PROBE = 'The quick brown fox, 1234 ünïcode!'


def _check_init_vocabulary(init_from: str | None, vocab: vocab_lib.Vocabulary) -> None:
  """A warm start's ids must mean the same tokens: the vocabulary the checkpoint records
  against the run's (same spec, or the same ids of a probe text where the files moved)."""
  if not init_from:
    return
  source = checkpoints.Checkpointer(init_from, async_save=False)
  try:
    recorded = source.meta().get('vocabulary') if source.latest_step() is not None else None
  finally:
    source.close()
  if not recorded or recorded == vocab.spec:
    return
  try:
    theirs = vocab_lib.get_vocabulary(recorded)
  except errors.UserError as e:
    logging.warning('INITIAL_CHECKPOINT_PATH %s records the vocabulary %r, which cannot be read '
                    'here (%s): not compared with this run\'s %r', init_from, recorded, e,
                    vocab.spec)
    return
  if (type(theirs), theirs.encode(_PROBE), theirs.eos_id) != (
      type(vocab), vocab.encode(_PROBE), vocab.eos_id):
    raise TrainingError(
        f'INITIAL_CHECKPOINT_PATH {init_from} was trained with the vocabulary {recorded!r}, '
        f'but this run uses {vocab.spec!r}: its ids would mean other tokens. Set VOCABULARY '
        f'to {recorded!r} (give a converted model.gin after the run config, whose VOCABULARY '
        'it then overrides).')


def _to_scalars(metrics: Mapping[str, Any], task_names, rates) -> dict[str, float]:
  """Logged metrics; per task also the sampling rate in force at the log step and the mean
  λ applied over the period (after any schedule and priority)."""
  summary = losses.summarize(metrics, task_names)
  out = {f'train/{k}': float(v) for k, v in summary.items()}
  for k in ('grad_norm', 'learning_rate'):
    if k in metrics:
      out[f'train/{k}'] = float(metrics[k])
  for i, name in enumerate(task_names):
    out[f'train/{name}/rate'] = float(rates[i])
    if 'loss_weights' in metrics:
      out[f'train/{name}/loss_weight'] = float(metrics['loss_weights'][i])
  return out


def train(config: TrainConfig, model_config: Any,
          operative_config: str | None = None) -> dict[str, Any]:
  """Train (or resume) to `config.train_steps`; returns the final eval results and the
  last logged training metrics. What the run opens is closed in order also when it fails,
  so an error shows as itself, not under the checkpoint threads' tracebacks."""
  opened: list = []
  try:
    result = _train(config, model_config, operative_config, opened)
  except BaseException:
    _close_in_order(opened, failing=True)
    raise
  _close_in_order(opened, failing=False)
  return result


def _train(config: TrainConfig, model_config: Any, operative_config: str | None,
           opened: list) -> dict[str, Any]:
  model_dir = _open_model_dir(config, operative_config)
  mesh, rules = _mesh(config)
  vocab = vocab_lib.get_vocabulary(config.vocabulary)
  _check_vocab(model_config, vocab)
  _check_init_vocabulary(config.init_from, vocab)
  mixture = mixtures.get_mixture(config.mixture)
  mixture.check_schedules()
  sets = eval_sets.from_config(config.eval_mixtures, config.eval_mixture, mixture)
  heldout.check_sets(sets, mixture)
  selected_by = heldout.check_keep_best(config.keep_best, sets, config.keep_best_allow_heldout)
  heldout.audit_at_start(sets, mixture, config.eval_split, config.eval_max_examples,
                         config.audit_threshold, config.audit, model_dir)
  start = start_lib.for_run(config, model_config, mixture, mesh, rules)
  best = (best_checkpoint.BestCheckpoint(model_dir, config.keep_best, config.keep_best_mode)
          if config.keep_best else None)
  ckpt = checkpoints.Checkpointer(
      model_dir, config.max_to_keep, config.async_checkpointing,
      best and best_checkpoint.preservation_policy(config.max_to_keep, best.keep))
  converter = feature_converter(config, start.model)
  start.check_model_dir(ckpt)   # before restoring
  opened.append(ckpt)
  latest, latest_meta = ckpt.newest_good(start.layout)   # damaged newer ones: moved aside
  data = pipeline.train_iterator(mixture, vocab, pipeline.PipelineConfig(
      config.feature_lengths, config.batch_size, seed=config.seed, pack=config.pack,
      num_data_shards=checkpoints.resume_data_shards(config.num_data_shards, latest_meta),
      prompt_length=start.prompt_length, feature_converter=converter))
  opened.append(data)
  writer = writers.MetricsWriter(model_dir)
  opened.insert(1, writer)
  state = start.begin(ckpt, latest, latest_meta, data, writer)
  meta = {**checkpoints.meta_for(model_config, vocab.spec, mixture.name, {
      'feature_lengths': dict(config.feature_lengths), 'num_data_shards': data.num_shards,
      'seed': config.seed}), 'feature_converter': converter.options(), **start.record()}
  first = int(state.step)
  # A kill during the eval of the step resumed from: redo it (the restored params are that
  # step's); an earlier step's missing eval would need its checkpoint's params and is not.
  redo = [first > 0 and _eval_due(config, first) and not evaluation.completed(
      model_dir, first, s.results_name(s.split or config.eval_split, config.eval_split))
          for s in sets]
  if best:
    best.resume_at(first)
  writer.truncate_after(first)   # lines after `first` are logged again: one line per step
  train_step = step_lib.jit_train_step(step_lib.make_train_step(
      start.model, start.optimizer, mixture.loss_weights(), config.loss, config.microbatches,
      config.optimizer.learning_rate_fn(), mixture.priority_groups()), start.layout, mesh, rules)
  evaluators = []
  if (config.train_steps > first or any(redo)) and (config.eval_period or config.eval_at_end):
    evaluators = eval_sets.evaluators(
        sets, start.served(), vocab, config.feature_lengths, config.eval_batch_size,
        config.eval_split, config.eval_max_examples, config.eval_decoding, mesh, rules,
        selected_by=selected_by, feature_converter=converter)
    if best:
      best.check_key([k for e in evaluators for k in e.expected_keys()])
  run = _Run(config, start, mixture, model_dir, mesh, ckpt, data, writer, best, evaluators,
             meta)
  results: list = []
  if any(redo):
    logging.warning('The eval of step %d did not complete: running it again', first)
    results = _evaluate(run, start.params(state), first, only=redo)
  state, results, last_logged = _steps(run, train_step, state, results)
  return {'eval': results[0] if results else {}, 'train': last_logged, 'state': state,
          'frozen': start.frozen or None,
          'evaluator': evaluators[0] if evaluators else None,
          'evals': [(e, r) for e, r in zip(evaluators, results)]}


@dataclasses.dataclass
class _Run:
  """What the steps of a run read and write, opened by `_train`."""
  config: TrainConfig
  start: start_lib.Start
  mixture: Any
  model_dir: str
  mesh: Any
  ckpt: checkpoints.Checkpointer
  data: Any
  writer: writers.MetricsWriter
  best: best_checkpoint.BestCheckpoint | None
  evaluators: list
  meta: dict


_SEGMENT_IDS = ('encoder_segment_ids', 'decoder_segment_ids')


def feature_converter(config: TrainConfig, model: Any) -> feature_converters.FeatureConverter:
  """The run's feature converter (T5X's FEATURE_CONVERTER_CLS): TrainConfig.feature_converter,
  else the one of the model's batch form (`Model.feature_kind`); it must make that form."""
  converter = config.feature_converter or feature_converters.for_kind(model.feature_kind)
  if not isinstance(converter, feature_converters.FeatureConverter):
    raise TrainingError(f'loop.TrainConfig.feature_converter must be a feature converter '
                        f'(e.g. @feature_converters.DecoderOnlyFeatureConverter()), got '
                        f'{converter!r}')
  if converter.kind != model.feature_kind:
    raise TrainingError(
        f'loop.TrainConfig.feature_converter {type(converter).__name__} makes '
        f'{converter.kind} batches, but the {model.family} model reads {model.feature_kind} '
        f'batches: use {feature_converters.CONVERTERS[model.feature_kind].__name__}')
  return converter


def _open_model_dir(config: TrainConfig, operative_config: str | None) -> str:
  """MODEL_DIR with this launch's provenance and its operative config.gin."""
  model_dir = paths.absolute(config.model_dir)
  paths.makedirs(model_dir)
  provenance.record(model_dir)   # MODEL_DIR/provenance/: this launch's code, diff, versions
  if operative_config is not None and jax.process_index() == 0:
    with paths.open_file(paths.join(model_dir, 'config.gin'), 'w') as f:
      f.write(operative_config)
  return model_dir


def _mesh(config: TrainConfig):
  """(mesh, logical-axis rules), the batch checked against them."""
  mesh = partitioning.make_mesh(config.mesh_shape)
  partitioning.check_batch_size(config.batch_size, mesh)
  if config.batch_size % config.microbatches or (
      (config.batch_size // config.microbatches) % (mesh.shape['data'] * mesh.shape['fsdp'])):
    raise TrainingError(f'batch size {config.batch_size} must split into {config.microbatches} '
                        'microbatches that each divide over the data x fsdp devices')
  return mesh, partitioning.rules_for(config.partitioning)


def _steps(run: _Run, train_step, state, results: list):
  """Train from `state.step` to TRAIN_STEPS: log, checkpoint, evaluate on their periods.
  Returns (state, the last eval results, the last logged metrics)."""
  config, data, writer, start = run.config, run.data, run.writer, run.start
  task_names = [t.name for t in run.mixture.tasks]
  dropout_rng = jax.random.fold_in(start.rng, 1)
  scheduled_weights = run.mixture.loss_weight_schedule is not None   # else the step's own λ
  first = int(state.step)
  bar = tqdm.tqdm(total=config.train_steps, initial=first, disable=not config.progress_bar or
                  jax.process_index() != 0, desc='train', dynamic_ncols=True)
  period_sums, period_steps, period_tokens, period_start = None, 0, 0, time.perf_counter()
  last_logged: dict[str, float] = {}
  guard = guard_lib.Guard(config.max_bad_steps, run.ckpt, config.optimizer.learning_rate,
                          run.best)
  for step in range(first, config.train_steps):
    local = next(data)
    period_tokens += sum(int((local[k] > 0).sum()) for k in _SEGMENT_IDS if k in local)
    weights = run.mixture.loss_weights_at(step) if scheduled_weights else None
    state, metrics = train_step(state, partitioning.global_batch(local, run.mesh), dropout_rng,
                                start.frozen, weights)
    done = step + 1
    guard.push(metrics, done)   # checks the previous step's (computed by now: no stall)
    period_sums = metrics if period_sums is None else _add(period_sums, metrics)
    period_steps += 1
    bar.update(1)
    if done % config.log_period == 0 or done == config.train_steps:
      scalars = _to_scalars(_mean_of_scalars(jax.device_get(period_sums), period_steps),
                            task_names, run.mixture.rates_at(step))
      elapsed = time.perf_counter() - period_start
      scalars['train/tokens_per_second'] = period_tokens / elapsed
      scalars['train/steps_per_second'] = period_steps / elapsed
      scalars['train/skipped_steps'] = float(state.skipped_steps)
      for k in ('examples', 'truncated_examples', 'exemplars_dropped'):
        scalars[f'data/{k}'] = float(data.stats[k])
      writer.write(done, scalars)
      last_logged = scalars
      bar.set_postfix(loss=f'{scalars["train/loss"]:.3f}',
                      tok_s=f'{scalars["train/tokens_per_second"]:.0f}')
      period_sums, period_steps, period_tokens, period_start = None, 0, 0, time.perf_counter()
    saved = guard.should_save(done % config.checkpoint_period == 0 or done == config.train_steps
                              or bool(run.best and _eval_due(config, done)),   # a best: its step's
                              final=done == config.train_steps)   # nothing non-finite is saved
    if saved:
      run.ckpt.save(done, state, data, run.meta)
    if run.evaluators and _eval_due(config, done):
      results = _evaluate(run, start.params(state), done, saved=saved)
  bar.close()
  return state, results, last_logged


def _evaluate(run: _Run, params, step: int, only=None, saved: bool = True) -> list:
  """Every eval set (or those `only` marks), then the best-checkpoint update, which only a
  `saved` step enters: a skipped (non-finite) step's save is put off (guard.py), and a best
  record must name a checkpoint (`--checkpoint=best`)."""
  evaluators, model_dir, writer, best = run.evaluators, run.model_dir, run.writer, run.best
  results = [e.evaluate(params, step, model_dir, writer) if only is None or only[i] else {}
             for i, e in enumerate(evaluators)]
  if best and not saved:
    logging.warning('step %d skipped its update (non-finite) and has no checkpoint: its eval '
                    'is not a keep_best candidate', step)
  elif best:
    flat = {k: v for e, r in zip(evaluators, results)
            for k, v in evaluation.flat_metrics(r, e.config.log_prefix).items()}
    if best.update(step, flat):
      writer.event(step, 'best_checkpoint', key=best.key, value=best.record['value'])
      logging.info('Best checkpoint so far: step %d (%s = %.4f)', step, best.key,
                   best.record['value'])
  return results


def _eval_due(config: TrainConfig, step: int) -> bool:
  return bool((config.eval_period and step % config.eval_period == 0)
              or (config.eval_at_end and step == config.train_steps))


def _add(a, b):
  return {k: a[k] + b[k] if k != 'finite' else a[k] & b[k] for k in a}


def _mean_of_scalars(sums: Mapping[str, np.ndarray], n: int) -> dict:
  """Per-task sums stay sums (summarize divides them); scalar step metrics are averaged."""
  out = dict(sums)
  for k in ('grad_norm', 'learning_rate', 'loss', 'loss_weights'):
    if k in out:
      out[k] = out[k] / n
  return out


def _close_in_order(opened: list, failing: bool) -> None:
  """Close a run's checkpointer, writer and data iterator, in that order. The checkpointer
  first waits for an in-flight async save: left running while the interpreter exits, orbax's
  threads print ~100 'cannot schedule new futures' / 'Event loop is closed' tracebacks over
  the run's real error. On a failing run a close that fails too is one warning, never
  raised over the real error."""
  for resource in opened:
    try:
      resource.close()
    except Exception as e:  # pylint: disable=broad-except
      if not failing:
        raise
      logging.warning('while stopping after an error, closing %s failed too: %s',
                      type(resource).__name__, checkpoints.first_line(e))
