"""UniMax rates (Chung et al. 2023, Algorithm 1): the allocation, its limits, nesting, sizes in
tokens, gin and the run-config check, and the proportions the pipeline realises."""

import math
import pickle

import gin
import numpy as np
import pytest

from t5x_lite import cli, config, validation
from t5x_lite.data import mixtures, pipeline, tasks, unimax
from t5x_lite.data.sources import GeneratedSource
from t5x_lite.data.templates import Template
from t5x_lite.data.vocab import ByteVocabulary
from t5x_lite.rundir import run_config


def _example(rng, split):
  return {'text': f'item {int(rng.integers(1000))}', 'answer': str(int(rng.integers(10)))}


def _task(name, n_train):
  return tasks.Task(name, GeneratedSource(_example, {'train': n_train, 'validation': 5}),
                    [Template('{text}')])


# The hand-computed example, items deliberately not in size order: sizes 4000, 50, 1000, 200
# examples, budget 3000, N = 4 epochs. Smallest first, B = what is left:
#   u (50):    offered 3000 / 4 = 750,  cap 4 * 50 = 200    -> 200  (B = 2800)
#   u (200):   offered 2800 / 3 = 933.3, cap 4 * 200 = 800  -> 800  (B = 2000)
#   u (1000):  offered 2000 / 2 = 1000, cap 4000            -> 1000 (B = 1000)
#   u (4000):  offered 1000 / 1 = 1000, cap 16000           -> 1000 (B = 0)
# Rates: 1000/3000, 200/3000, 1000/3000, 800/3000 = 1/3, 1/15, 1/3, 4/15; epochs: 0.25, 4, 1, 4.
SIZES = {'um_d': 4000, 'um_a': 50, 'um_c': 1000, 'um_b': 200}
ALLOCATION = [1000, 200, 1000, 800]
RATES = [1 / 3, 1 / 15, 1 / 3, 4 / 15]


def _hand_mixture(name='um_hand'):
  return mixtures.Mixture(name, [_task(n, s) for n, s in SIZES.items()],
                          default_rate=mixtures.unimax(budget=3000, max_epochs=4))


def test_algorithm_1_on_a_hand_computed_example():
  np.testing.assert_allclose(unimax.allocate(list(SIZES.values()), 3000, 4), ALLOCATION)
  mix = _hand_mixture()
  assert [t.name for t, _ in mix.tasks_and_rates()] == list(SIZES)
  np.testing.assert_allclose([r for _, r in mix.tasks_and_rates()], RATES)
  # The capped items use exactly N epochs; the others share what is left equally.
  epochs = np.array(ALLOCATION) / np.array(list(SIZES.values()))
  np.testing.assert_allclose(epochs, [0.25, 4, 1, 4])
  # One more: the cap binds for the two small items only; an uncapped item never caps a
  # larger one, so the rest get the same share.
  np.testing.assert_allclose(unimax.allocate([10, 30, 500, 600, 700], 1000, 2),
                             [20, 60, 920 / 3, 920 / 3, 920 / 3])


def test_degenerate_cases():
  sizes = list(SIZES.values())
  # A budget above N epochs of all the data: every item is capped, U = N * size, so the
  # rates are examples-proportional (sum(U) = 21000 < budget).
  np.testing.assert_allclose(unimax.allocate(sizes, 10**6, 4), np.multiply(sizes, 4))
  rich = mixtures.Mixture('um_rich', [_task(n, s) for n, s in SIZES.items()],
                          default_rate=mixtures.unimax(budget=10**6, max_epochs=4))
  proportional = mixtures.Mixture('um_prop', rich.tasks,
                                  default_rate=mixtures.examples_proportional())
  np.testing.assert_allclose(rich.rates_at(0), proportional.rates_at(0))
  np.testing.assert_allclose(rich.rates_at(0), np.divide(sizes, sum(sizes)))
  # N = infinity (None or inf): no cap, uniform over the items whatever the budget.
  for n in (None, math.inf):
    for budget in (10, 3000, 10**9):
      np.testing.assert_allclose(unimax.allocate(sizes, budget, n), [budget / 4] * 4)
  # One huge task: the small ones take N epochs, the huge one the rest of the budget.
  np.testing.assert_allclose(unimax.allocate([10, 10**9, 20], 10**4, 1), [10, 9970, 20])
  huge = mixtures.Mixture('um_huge', [_task('um_tiny', 10), _task('um_big', 100_000)],
                          default_rate=mixtures.unimax(budget=1000, max_epochs=3))
  np.testing.assert_allclose(huge.rates_at(0), [0.03, 0.97])
  # A single item is all of the mixture; equal sizes are uniform at any cap.
  only = mixtures.Mixture('um_one', [_task('um_only', 7)],
                          default_rate=mixtures.unimax(budget=10**6, max_epochs=1))
  assert only.rates_at(0).tolist() == [1.0]
  np.testing.assert_allclose(unimax.allocate([5, 5, 5], 100, 2), [10, 10, 10])
  np.testing.assert_allclose(unimax.allocate([5, 5, 5], 12, 2), [4, 4, 4])


def test_sub_mixtures_count_their_tasks_and_number_rates_read_as_allocations():
  a, b, c, d = _task('um_a', 50), _task('um_b', 200), _task('um_c', 1000), _task('um_d', 4000)
  # inner: a 50, b 200, budget 250, N 1 -> U = 50, 200 (both capped): 1/5, 4/5 of inner.
  inner = mixtures.Mixture('um_inner', [a, b],
                           default_rate=mixtures.unimax(budget=250, max_epochs=1))
  # outer: inner counts 250 examples; c 1000, d 4000; budget 3000, N 2:
  #   inner: offered 1000, cap 500 -> 500 (B = 2500); c: offered 1250, cap 2000 -> 1250;
  #   d: 1250. Rates 1/6, 5/12, 5/12; a and b share inner's 1/6 as 1/5 and 4/5.
  outer = mixtures.Mixture('um_outer', [inner, c, d],
                           default_rate=mixtures.unimax(budget=3000, max_epochs=2))
  rates = {t.name: r for t, r in outer.tasks_and_rates()}
  assert rates == pytest.approx({'um_a': 1 / 30, 'um_b': 4 / 30, 'um_c': 5 / 12,
                                 'um_d': 5 / 12})
  # Sizes in tokens: a sub-mixture not named sums its tasks' sizes (a 100 + b 400 = 500);
  #   inner: offered 1000, cap 1000 -> 1000; c 2000 tokens: offered 1000 -> 1000; d: 1000.
  tokens = mixtures.unimax(budget=3000, max_epochs=2, sizes={
      'um_a': 100, 'um_b': 400, 'um_c': 2000, 'um_d': 8000})
  by_tokens = mixtures.Mixture('um_tok', [inner, c, d], default_rate=tokens)
  np.testing.assert_allclose(by_tokens.rates_at(0), [1 / 15, 4 / 15, 1 / 3, 1 / 3])
  # Naming the sub-mixture itself takes that size instead: inner 300 -> capped at 600.
  named = mixtures.Mixture('um_named', [inner, c, d], default_rate=mixtures.unimax(
      budget=3000, max_epochs=2, sizes={'um_inner': 300, 'um_c': 2000, 'um_d': 8000}))
  np.testing.assert_allclose(named.rates_at(0), [0.2 * 0.2, 0.2 * 0.8, 0.4, 0.4])
  with pytest.raises(validation.ConfigError, match=r"'um_outer' nor its tasks \['um_d'\]"):
    mixtures.Mixture('um_missing', [outer], default_rate=mixtures.unimax(
        budget=10, max_epochs=1, sizes={'um_a': 1, 'um_b': 1, 'um_c': 1})).rates_at(0)
  # A number beside a UniMax pool reads as an allocation in the budget's unit: c and d share
  # 3000 (1500 each, uncapped at N 2), a fixed 1500 is a third of 4500.
  fixed = mixtures.Mixture('um_fixed', [(a, 1500.0), c, d],
                           default_rate=mixtures.unimax(budget=3000, max_epochs=2))
  np.testing.assert_allclose(fixed.rates_at(0), [1 / 3, 1 / 3, 1 / 3])


def test_settings_are_checked():
  for bad in (dict(budget=0, max_epochs=1), dict(budget=-5, max_epochs=1),
              dict(budget=math.inf, max_epochs=1), dict(budget=True, max_epochs=1),
              dict(budget=100, max_epochs=0), dict(budget=100, max_epochs='4'),
              dict(budget=100, max_epochs=1, sizes={'x': 0}),
              dict(budget=100, max_epochs=1, sizes={'x': -3})):
    with pytest.raises(validation.ConfigError, match='UniMax'):
      mixtures.unimax(**bad)
  with pytest.raises(validation.ConfigError, match='finite and >= 0'):
    unimax.allocate([1, -1], 10, 1)


def test_gin_run_config_pickle_and_the_tasks_listing(tmp_path, capsys):
  text = """
from __gin__ import dynamic_registration
from t5x_lite.data import mixtures
MIXTURE_OR_TASK_NAME = @mixtures.Mixture()
mixtures.Mixture:
  name = 'um_gin'
  tasks = ['builtin_sort', 'builtin_arithmetic', 'builtin_compare']
  default_rate = @mixtures.unimax()
mixtures.unimax:
  budget = 30000
  max_epochs = 2
  sizes = {'builtin_sort': 1000, 'builtin_arithmetic': 4000, 'builtin_compare': 100000}
"""
  run_config.check('config.gin', text)   # eval may rebuild it from a run's config.gin
  gin.clear_config()
  try:
    gin.parse_config(text)
    mix = config.macro('MIXTURE_OR_TASK_NAME')
    operative = gin.operative_config_str()
  finally:
    gin.clear_config()
  run_config.check('config.gin', operative)
  # sort: offered 10000, cap 2000; arithmetic: offered 14000, cap 8000; compare: 20000.
  np.testing.assert_allclose(mix.rates_at(0), [1 / 15, 4 / 15, 2 / 3])
  again = pickle.loads(pickle.dumps(mix))   # grain workers get the mixture pickled
  assert again == mix and hash(again.default_rate) == hash(mix.default_rate)
  np.testing.assert_allclose(again.rates_at(0), mix.rates_at(0))
  path = tmp_path / 'um.gin'
  path.write_text(text)
  gin.clear_config()
  try:
    assert cli.main(['tasks', f'--gin_file={path}']) == 0
  finally:
    gin.clear_config()
  out = capsys.readouterr().out
  table = out[out.index('mixture um_gin: 3 tasks'):].split('\nmixture ')[0].split('\n\n')[0]
  rows = {line.split()[0]: line.split()[2] for line in table.splitlines()[1:]}
  assert rows == {'builtin_sort': '0.067', 'builtin_arithmetic': '0.267',
                  'builtin_compare': '0.667'}


def test_realised_proportions_through_the_pipeline_over_20k_examples():
  """20,000 unpacked examples of the hand-computed mixture: each task's share within 4
  binomial sigmas (sqrt(p (1 - p) / 20000) <= 0.0034) of its UniMax rate."""
  it = pipeline.train_iterator(_hand_mixture('um_pipe'), ByteVocabulary(), pipeline.PipelineConfig(
      {'inputs': 16, 'targets': 4}, batch_size=1000, pack=False, prefetch=0), 0, 1)
  counts = np.zeros(4)
  for _ in range(20):
    counts += np.bincount(next(it)['decoder_task_ids'][:, 0], minlength=4)
  it.close()
  assert counts.sum() == 20_000
  p = np.array(RATES)
  np.testing.assert_array_less(np.abs(counts / 20_000 - p), 4 * np.sqrt(p * (1 - p) / 20_000))
