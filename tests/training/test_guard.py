"""The non-finite guard and the learning-rate schedule agree: a skipped step applies no update
and does not advance the schedule, the logged rate is the one the next update uses, a run
whose last steps are non-finite fails instead of saving and exiting 0, and keep_best never
names a step without a checkpoint (a skipped eval step, a checkpoint the stop moved aside)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models, partitioning
from t5x_lite.rundir import writers
from t5x_lite.data import pipeline, vocab
from t5x_lite.training import (best_checkpoint, checkpoints, guard, loop, optimizers,
                               state as state_lib, step as step_lib)

CONFIG = models.preset('flan_t5', 'tiny')   # dropout 0: a step depends on its count only


@pytest.fixture(scope='module')
def batch():
  it = pipeline.train_iterator('builtin', vocab.ByteVocabulary(), pipeline.PipelineConfig(
      {'inputs': 64, 'targets': 16}, batch_size=8, prefetch=0), 0, 1)
  out = next(it)
  it.close()
  return out


def test_a_skipped_step_leaves_its_learning_rate_to_the_next_update(batch):
  optimizer_config = optimizers.OptimizerConfig(learning_rate=1e-2, schedule='warmup',
                                                warmup_steps=4)
  optimizer = optimizer_config.build()
  mesh = partitioning.make_mesh({'data': 1}, jax.devices()[:1])
  rules = partitioning.rules_for('dp')
  model = models.build(CONFIG)
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  step = step_lib.jit_train_step(step_lib.make_train_step(
      model, optimizer, np.ones(10), learning_rate_fn=
      optimizer_config.learning_rate_fn()), layout, mesh, rules)
  rng = jax.random.key(1)
  fresh = lambda: state_lib.create_state(model, optimizer, layout, jax.random.key(0))
  batch = partitioning.global_batch(batch, mesh)

  reference, ref_metrics = step(fresh(), batch, rng)      # the first update, uninterrupted
  state = fresh()
  clean = jax.device_get(state.params)
  poisoned = jax.tree.map(np.copy, clean)
  poisoned['decoder']['decoder_norm']['scale'][:] = np.nan
  state, skipped = step(state.replace(params=jax.device_put(poisoned)), batch, rng)
  assert not skipped['finite'] and int(skipped['bad_streak']) == 1
  state, metrics = step(state.replace(params=jax.device_put(clean)), batch, rng)
  assert metrics['finite'] and int(metrics['bad_streak']) == 0
  assert int(state.step) == 2 and int(state.skipped_steps) == 1
  assert float(skipped['learning_rate']) == float(metrics['learning_rate']) == \
      float(ref_metrics['learning_rate'])
  # The update after the skip is the first update: same schedule step, same optimizer count.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(reference.params))
  state, after = step(state, batch, rng)
  _, second = step(reference, batch, rng)
  assert float(after['learning_rate']) == float(second['learning_rate']) == \
      pytest.approx(1e-2 / 4)


def test_a_non_finite_final_step_fails_the_run_before_it_is_saved(tmp_path):
  """lr 1e30: step 1 is finite and blows the weights up, step 2's loss overflows. With
  max_bad_steps=1 the streak ends the run at its last step, before the final checkpoint."""
  config = loop.TrainConfig(
      model_dir=str(tmp_path), feature_lengths={'inputs': 64, 'targets': 16}, batch_size=8,
      train_steps=2, log_period=1, checkpoint_period=100, eval_at_end=False, max_bad_steps=1,
      mesh_shape={'data': -1}, progress_bar=False, async_checkpointing=False,
      optimizer=optimizers.OptimizerConfig(learning_rate=1e30))
  with pytest.raises(guard.NonFiniteError, match=r'1 consecutive steps .*last at step 2\)'):
    loop.train(config, CONFIG, operative_config=None)
  assert not (tmp_path / 'checkpoints').exists() or not any(
      p.name.isdigit() for p in (tmp_path / 'checkpoints').iterdir())


def _nan_loss_weights_at(monkeypatch, steps):
  """The loop's train step, with NaN loss weights (λ) at the given steps (1-based): a finite
  state whose loss and gradient are NaN, so those steps are skipped."""
  real = step_lib.jit_train_step

  def jit_train_step(*args, **kwargs):
    run = real(*args, **kwargs)
    calls = []

    def poisoned(state, batch, rng, frozen=None, task_loss_weights=None):
      calls.append(1)
      if len(calls) in steps:
        task_loss_weights = np.full_like(run.task_loss_weights, np.nan)
      return run(state, batch, rng, frozen, task_loss_weights)
    return poisoned
  monkeypatch.setattr(step_lib, 'jit_train_step', jit_train_step)


def _best_run(tmp_path, **kwargs):
  return loop.TrainConfig(**{
      'model_dir': str(tmp_path), 'mixture': 'builtin_sentiment', 'batch_size': 8,
      'feature_lengths': {'inputs': 48, 'targets': 8}, 'eval_batch_size': 8,
      'eval_max_examples': 2, 'checkpoint_period': 100, 'max_to_keep': 3, 'eval_period': 2,
      'progress_bar': False, 'async_checkpointing': False,
      'keep_best': 'eval/builtin_sentiment/accuracy', **kwargs})


def test_keep_best_never_names_a_skipped_eval_step_whose_save_was_put_off(tmp_path, monkeypatch):
  """#28 item 3: step 2 (an eval step) is skipped: its save waits for step 3, its eval runs but
  cannot be the best (the first eval would be), so --checkpoint=best always has a checkpoint."""
  _nan_loss_weights_at(monkeypatch, {2})
  loop.train(_best_run(tmp_path, train_steps=4), CONFIG)
  records = writers.read_metrics(str(tmp_path))
  assert [r['step'] for r in records if 'eval/builtin_sentiment/accuracy' in r] == [2, 4]
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [3, 4]   # the save of 2, put off to the next finite step
  events = [r['step'] for r in records if r.get('event') == 'best_checkpoint']
  assert events == [4]
  step = best_checkpoint.resolve_step(str(tmp_path), 'best')
  assert step == 4 and step in ckpt.all_steps()
  ckpt.restore_params(state_lib.state_layout(
      models.build(CONFIG), optimizers.OptimizerConfig().build(),
      partitioning.make_mesh({'data': -1}), partitioning.rules_for('dp')).abstract().params, step)


def test_a_best_checkpoint_moved_aside_by_a_non_finite_stop_is_no_longer_the_best(tmp_path):
  """lr 1e30: step 1 (finite) is saved, evaluated and the best; step 2's loss overflows and
  the stop moves checkpoint 1 aside: the best record goes with it."""
  config = _best_run(tmp_path, train_steps=2, eval_period=1, max_bad_steps=1,
                     optimizer=optimizers.OptimizerConfig(learning_rate=1e30))
  with pytest.raises(guard.NonFiniteError, match='Checkpoints \\[1\\] hold the parameters'):
    loop.train(config, CONFIG)
  events = [r['step'] for r in writers.read_metrics(str(tmp_path))
            if r.get('event') == 'best_checkpoint']
  assert events == [1] and checkpoints.Checkpointer(str(tmp_path)).all_steps() == []
  assert best_checkpoint.read(str(tmp_path)) is None
