"""The non-finite guard and the learning-rate schedule agree: a skipped step applies no update
and does not advance the schedule, the logged rate is the one the next update uses, and a
run whose last steps are non-finite fails instead of saving and exiting 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models, partitioning
from t5x_lite.data import pipeline, vocab
from t5x_lite.training import guard, loop, optimizers, state as state_lib, step as step_lib

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
  layout = state_lib.state_layout(CONFIG, optimizer, mesh, rules)
  step = step_lib.jit_train_step(step_lib.make_train_step(
      models.Transformer(CONFIG), optimizer, np.ones(10), learning_rate_fn=
      optimizer_config.learning_rate_fn()), layout, mesh, rules)
  rng = jax.random.key(1)
  fresh = lambda: state_lib.create_state(CONFIG, optimizer, layout, jax.random.key(0))
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
