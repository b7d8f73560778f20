"""Rate and λ schedules, task priorities: values, sampled proportions, exact resume."""

import gin
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import validation
from t5x_lite.data import mixtures, pipeline, schedules
from t5x_lite.data.vocab import ByteVocabulary
from t5x_lite.training import losses

TASKS = ['builtin_sort', 'builtin_arithmetic', 'builtin_compare']
LENGTHS = {'inputs': 64, 'targets': 16}


def _examples_per_task(batch, num_tasks=3):
  """Examples (segments) of each task in a batch."""
  seg, ids = batch['decoder_segment_ids'], batch['decoder_task_ids']
  starts = (seg > 0) & np.concatenate([np.ones((seg.shape[0], 1), bool),
                                       seg[:, 1:] != seg[:, :-1]], axis=1)
  return np.bincount(ids[starts], minlength=num_tasks)


def test_stage_and_interpolation_values():
  stages = schedules.Stages([(3, {'a': 1}), (8, {'a': 1, 'b': 2}), (None, {'b': 1})])
  assert [stages.at(s) for s in (0, 2, 3, 7, 8, 10**6)] == [
      {'a': 1}, {'a': 1}, {'a': 1, 'b': 2}, {'a': 1, 'b': 2}, {'b': 1}, {'b': 1}]
  assert stages.key_steps() == [0, 3, 8]
  ramp = schedules.Interpolate({'a': 1.0}, {'a': 0.0, 'b': 4.0}, start_step=10, end_step=30)
  assert ramp.at(0) == {'a': 1.0, 'b': 0.0} and ramp.at(30) == ramp.at(99) == {'a': 0.0, 'b': 4.0}
  assert ramp.at(20) == {'a': 0.5, 'b': 2.0}   # the midpoint: the mean of the two sets
  for bad in ([(3, {'a': 1}), (3, {'a': 1})], [(None, {'a': 1}), (5, {'a': 1})],
              [(3, {'a': -1})], []):
    with pytest.raises(validation.ConfigError):
      schedules.Stages(bad)
  with pytest.raises(validation.ConfigError, match='end_step'):
    schedules.Interpolate({'a': 1}, {'a': 2}, start_step=5, end_step=5)


def test_mixture_rates_and_loss_weights_follow_the_schedules():
  mix = mixtures.Mixture(
      'cur', [('builtin_sort', 1.0), mixtures.Mixture('sub', TASKS[1:])],
      rate_schedule=schedules.Stages([(5, {'builtin_sort': 1}), (None, {'builtin_sort': 1,
                                                                      'sub': 3})]),
      loss_weights={'builtin_compare': 3.0},
      loss_weight_schedule=schedules.Interpolate({'builtin_sort': 0.0}, {'builtin_sort': 2.0},
                                                 end_step=10))
  mix.check_schedules()
  np.testing.assert_allclose(mix.rates_at(4), [1, 0, 0])
  np.testing.assert_allclose(mix.rates_at(5), [0.25, 0.375, 0.375])   # sub shares its 3/4
  np.testing.assert_allclose(mix.loss_weights_at(5), [1.0, 1.0, 3.0])
  np.testing.assert_allclose(mix.loss_weights_at(20), [2.0, 1.0, 3.0])
  assert mix.sampled_tasks() == [True, True, True]
  with pytest.raises(validation.ConfigError, match="names \\['nope'\\]"):
    mixtures.Mixture('bad', TASKS, rate_schedule=schedules.Stages(
        [(None, {'nope': 1})])).check_schedules()
  with pytest.raises(validation.ConfigError, match='every rate is 0 from step 4'):
    mixtures.Mixture('bad', TASKS, rate_schedule=schedules.Stages(
        [(4, {'builtin_sort': 1}), (None, {'builtin_sort': 0})])).check_schedules()


def test_sampled_proportions_follow_each_stage_over_20k_examples():
  """Two stages of 20,000 examples each (unpacked: every example of batch s is drawn for
  step s). Binomial sd at 20k is <= 0.0035: tolerance 0.015 (> 4 sd)."""
  stages = [(20, {'builtin_sort': 1, 'builtin_arithmetic': 3}),
            (None, {'builtin_arithmetic': 1, 'builtin_compare': 1, 'builtin_sort': 2})]
  mix = mixtures.Mixture('staged', TASKS, rate_schedule=schedules.Stages(stages))
  it = pipeline.train_iterator(mix, ByteVocabulary(), pipeline.PipelineConfig(
      LENGTHS, batch_size=1000, pack=False, prefetch=0), 0, 1)
  counts = [np.zeros(3), np.zeros(3)]
  for step in range(40):
    counts[step >= 20] += _examples_per_task(next(it))
  assert counts[0].sum() == counts[1].sum() == 20000
  np.testing.assert_allclose(counts[0] / 20000, [0.25, 0.75, 0.0], atol=0.015)
  assert counts[0][2] == 0
  np.testing.assert_allclose(counts[1] / 20000, [0.5, 0.25, 0.25], atol=0.015)


def test_interpolated_rates_at_the_midpoint():
  """Linear from sort only to arithmetic only over steps 0..10: at step 5 both 0.5; the
  examples of steps 3..7 (rates 0.7 .. 0.3, mean 0.5), 5000, within 0.03 (4 sd); the ramp's
  first and last steps sample one task only."""
  mix = mixtures.Mixture('ramp', TASKS[:2], rate_schedule=schedules.Interpolate(
      {'builtin_sort': 1}, {'builtin_arithmetic': 1}, start_step=0, end_step=10))
  np.testing.assert_allclose(mix.rates_at(5), [0.5, 0.5])
  np.testing.assert_allclose(mix.rates_at(3), [0.7, 0.3])
  it = pipeline.train_iterator(mix, ByteVocabulary(), pipeline.PipelineConfig(
      LENGTHS, batch_size=1000, pack=False, prefetch=0), 0, 1)
  assert _examples_per_task(next(it), 2)[1] == 0
  next(it), next(it)
  counts = sum(_examples_per_task(next(it), 2) for _ in range(5))
  assert counts.sum() == 5000 and abs(counts[0] / 5000 - 0.5) < 0.03
  next(it), next(it)
  assert _examples_per_task(next(it), 2)[0] == 0   # step 10: arithmetic only


@pytest.mark.parametrize('pack', [True, False])
def test_resume_before_at_and_after_a_stage_boundary_gives_the_same_batches(pack):
  """Packed (the packer re-reads the round it was emitting on restore) and unpacked, two
  data shards, a prefetch thread: restoring the state saved before step k gives batches
  k.. of the uninterrupted stream, at k = the boundary (6), just before and after it, and
  mid-stage."""
  mix = mixtures.Mixture('staged', TASKS, rate_schedule=schedules.Stages(
      [(6, {'builtin_sort': 1}), (None, {'builtin_arithmetic': 1, 'builtin_compare': 1})]))
  config = pipeline.PipelineConfig(LENGTHS, batch_size=8, pack=pack, num_data_shards=2)
  it = pipeline.train_iterator(mix, ByteVocabulary(), config, 0, 1)
  states, batches = [], []
  for _ in range(12):
    states.append(it.get_state())
    batches.append(next(it))
  first_stage = sum(_examples_per_task(b) for b in batches[:5])
  assert first_stage[1:].sum() == 0   # before the boundary (and its packing lag): sort only
  assert sum(_examples_per_task(b) for b in batches[9:])[0] == 0
  for k in (3, 5, 6, 7):
    resumed = pipeline.train_iterator(mix, ByteVocabulary(), config, 0, 1)
    resumed.set_state(states[k])
    for step in range(k, 12):
      batch = next(resumed)
      for name, value in batch.items():
        np.testing.assert_array_equal(value, batches[step][name], err_msg=f'{k} {step} {name}')


def _token_batch(tokens_per_task):
  """One row per task, its first n tokens real."""
  length = max(tokens_per_task)
  weights = np.zeros((len(tokens_per_task), length), np.int32)
  ids = np.full_like(weights, -1)
  for t, n in enumerate(tokens_per_task):
    weights[t, :n], ids[t, :n] = 1, t
  return {'decoder_loss_weights': jnp.asarray(weights), 'decoder_task_ids': jnp.asarray(ids),
          'decoder_segment_ids': jnp.asarray(weights)}


def test_priority_raises_a_group_to_its_floor_and_the_top_group_wins():
  batch = _token_batch([10, 30, 60])   # tasks 0, 1, 2 hold 10%, 30%, 60% of the tokens
  lam = jnp.asarray([1.0, 1.0, 1.0])

  def shares(weights):
    mass = np.asarray(weights) * np.array([10, 30, 60])
    return mass / mass.sum()

  # One group {task 0} with floor 0.25: its λ rises to make its share exactly 0.25.
  out = losses.prioritized_loss_weights(lam, batch, np.array([0, -1, -1]), [0.25])
  np.testing.assert_allclose(shares(out)[0], 0.25, rtol=1e-6)
  np.testing.assert_allclose(out[1:], [1.0, 1.0])
  # A group already above its floor, or absent from the batch, is left alone.
  np.testing.assert_allclose(losses.prioritized_loss_weights(
      lam, batch, np.array([-1, -1, 0]), [0.5]), lam)
  np.testing.assert_allclose(losses.prioritized_loss_weights(
      lam, _token_batch([0, 30, 60]), np.array([0, -1, -1]), [0.5]), lam)
  # Conflicting floors: task 0 (top, 0.5) then task 1 (0.5); the lower group is raised first
  # and the top group's floor holds exactly at the end.
  out = losses.prioritized_loss_weights(lam, batch, np.array([0, 1, -1]), [0.5, 0.5])
  np.testing.assert_allclose(shares(out)[0], 0.5, rtol=1e-6)
  assert out[1] > 1.0 and shares(out)[1] < 0.5
  # λ of a task in the batch scales its own mass: a scheduled λ of 2 counts double.
  out = losses.prioritized_loss_weights(jnp.asarray([2.0, 1.0, 1.0]), batch,
                                        np.array([0, -1, -1]), [0.25])
  np.testing.assert_allclose(shares(out)[0], 0.25, rtol=1e-6)


def test_priority_names_are_checked():
  mix = mixtures.Mixture('p', TASKS, priority=schedules.Priority([(['builtin_sort'], 0.3),
                                                                  ('builtin_compare', 0.2)]))
  groups, floors = mix.priority_groups()
  np.testing.assert_array_equal(groups, [0, -1, 1])
  np.testing.assert_allclose(floors, [0.3, 0.2])
  with pytest.raises(validation.ConfigError, match="'nope'"):
    mixtures.Mixture('p', TASKS, priority=schedules.Priority([('nope', 0.3)])).priority_groups()
  with pytest.raises(validation.ConfigError, match='two priority groups'):
    mixtures.Mixture('p', TASKS, priority=schedules.Priority(
        [('builtin_sort', 0.3), ('builtin_sort', 0.1)])).priority_groups()
  with pytest.raises(validation.ConfigError, match='floor'):
    schedules.Priority([('builtin_sort', 1.0)])


def test_cli_tasks_shows_a_gin_curriculum_stage_by_stage(capsys):
  from t5x_lite import cli  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  try:
    assert cli.main(['tasks', '--gin_file=gin_configs/mixtures/builtin_curriculum.gin',
                     '--gin.CURRICULUM_STEPS=5', '--gin.CURRICULUM_RAMP_END=9']) == 0
  finally:
    gin.clear_config()
  out = capsys.readouterr().out
  table = out[out.index('mixture builtin_curriculum'):]
  assert [line.strip() for line in table.splitlines() if 'from step' in line][:3] == [
      'from step 0:', 'from step 5:', 'from step 9:']
  rows = [line.split() for line in table.splitlines() if line.strip().startswith('builtin_qa ')]
  assert [(r[2], r[5]) for r in rows[:3]] == [('0.000', '0.5'), ('0.100', '0.5'),
                                               ('0.100', '1')]


def test_a_state_from_another_mixture_or_schedule_is_a_clear_error():
  staged = mixtures.Mixture('a', TASKS, rate_schedule=schedules.Stages(
      [(None, {'builtin_sort': 1, 'builtin_arithmetic': 1})]))
  wider = mixtures.Mixture('c', TASKS, rate_schedule=schedules.Stages(
      [(None, {n: 1 for n in TASKS})]))
  config = pipeline.PipelineConfig(LENGTHS, batch_size=8)

  def state_of(mix):
    it = pipeline.train_iterator(mix, ByteVocabulary(), config, 0, 1)
    next(it)
    return it.get_state()
  for saved, resumed, message in ((staged, mixtures.Mixture('b', TASKS), 'does not fit'),
                                  (mixtures.Mixture('b', TASKS), staged, 'without a rate'),
                                  (staged, wider, 'of 3 sampled tasks')):
    it = pipeline.train_iterator(resumed, ByteVocabulary(), config, 0, 1)
    with pytest.raises(pipeline.DataError, match=message):
      it.set_state(state_of(saved))
