"""Tasks, mixtures, rates, templates and the registry."""

import collections

import numpy as np
import pytest

from t5x_lite.data import mixtures, pipeline, registry, tasks, templates, vocab
from t5x_lite.data.sources import GeneratedSource
from t5x_lite.data.templates import Template


def _color_example(rng, split):
  color = ['red', 'green', 'blue'][int(rng.integers(3))]
  return {'text': f'the sky looks {color} today', 'answer': color, 'id': int(rng.integers(1e9))}


def _task(name, n_train=100, **kwargs):
  source = GeneratedSource(_color_example, {'train': n_train, 'validation': 10}, seed=1)
  kwargs.setdefault('templates', [Template('What color? {text}{options_}'),
                                  Template('{text}\nName the color.')])
  return tasks.Task(name, source, **kwargs)


def test_examples_proportional_cap_and_temperature_match_seqio():
  small, large = _task('small', n_train=100), _task('large', n_train=10_000)
  rate = mixtures.examples_proportional(maximum=3000, temperature=2.0)
  assert rate(small) == pytest.approx(100 ** 0.5)
  assert rate(large) == pytest.approx(3000 ** 0.5)      # cap first, then r ** (1/T)
  scaled = mixtures.examples_proportional(maximum=150, scale=2.0)
  assert scaled(small) == 150 and scaled(large) == 150
  mix = mixtures.Mixture('m', [small, large], default_rate=rate)
  rates = dict((t.name, r) for t, r in mix.tasks_and_rates())
  assert rates['small'] == pytest.approx(10 / (10 + 3000 ** 0.5))
  assert sum(rates.values()) == pytest.approx(1.0)


def test_nested_mixtures_share_their_rate_and_keep_loss_weights():
  a, b, c = _task('a'), _task('b'), _task('c')
  inner = mixtures.Mixture('inner', [(a, 1.0), (b, 3.0)], loss_weights={'b': 0.5})
  outer = mixtures.Mixture('outer', [(inner, 2.0), (c, 2.0)], loss_weights={'c': 2.0})
  rates = {t.name: r for t, r in outer.tasks_and_rates()}
  assert rates == pytest.approx({'a': 0.125, 'b': 0.375, 'c': 0.5})
  np.testing.assert_array_equal(outer.loss_weights(), [1.0, 0.5, 2.0])  # order of .tasks
  assert [t.name for t in outer.tasks] == ['a', 'b', 'c']


def test_function_rates_on_two_levels_of_sub_mixtures_use_their_example_counts():
  """A callable rate on a sub-mixture sees seqio's `Mixture.num_input_examples` (the sum over
  its leaf tasks), and the sub-mixture's share is split by its own normalised rates."""
  a, b, c, d = (_task('a', 100), _task('b', 300), _task('c', 500), _task('d', 50))
  inner = mixtures.Mixture('inner', [a, b], default_rate=mixtures.examples_proportional())
  assert inner.num_examples('train') == 400 and inner.num_examples('validation') == 20
  # inner: min(400, 400) = 400, c: min(500, 400) = 400 -> 1/2 each; a 1/4 and b 3/4 of inner
  middle = mixtures.Mixture('middle', [inner, c],
                            default_rate=mixtures.examples_proportional(maximum=400))
  assert middle.num_examples('train') == 900
  # middle: 900 ** (1/2) = 30 against d's fixed 10 -> 3/4 and 1/4
  outer = mixtures.Mixture('outer', [(middle, mixtures.examples_proportional(temperature=2.0)),
                                     (d, 10.0)])
  rates = {t.name: r for t, r in outer.tasks_and_rates()}
  assert rates == pytest.approx({'a': 0.75 * 0.5 * 0.25, 'b': 0.75 * 0.5 * 0.75,
                                 'c': 0.75 * 0.5, 'd': 0.25})
  assert [t.name for t in outer.tasks] == ['a', 'b', 'c', 'd'] == list(rates)
  assert outer.num_examples('train') == 950 and outer.splits == ('train', 'validation')


def test_registry_errors_name_close_matches_and_all_names():
  task = registry.register(_task('colors_test'), overwrite=True)
  try:
    assert registry.get('colors_test') is task
    with pytest.raises(KeyError, match=r"unknown task or mixture 'colours_test'.*"
                                        r"Did you mean \['colors_test'\].*Registered: \["):
      registry.get('colours_test')
    with pytest.raises(ValueError, match='already registered'):
      registry.register(_task('colors_test'))
    assert mixtures.get_mixture('colors_test').tasks == [task]
  finally:
    registry.remove('colors_test')


def test_bad_task_definitions_fail_early():
  with pytest.raises(ValueError, match="unknown metric 'acuracy'.*accuracy"):
    _task('x', metric_names=['acuracy'])
  with pytest.raises(ValueError, match='unknown formats'):
    _task('x', template_mix={'zero_shot': 1.0})
  with pytest.raises(ValueError, match='at least one template'):
    _task('x', templates=[])
  with pytest.raises(ValueError, match='rates must be'):
    mixtures.Mixture('m', [(_task('a'), 0.0)]).tasks_and_rates()


def test_templates_render_options_and_fewshot_without_the_example_itself():
  options = ['red', 'green', 'blue']
  task = _task('t', options=options, num_fewshot=3,
               template_mix={'zs_opt': 1, 'zs_noopt': 1, 'fs_opt': 1, 'fs_noopt': 1})
  example = task.example('train', 5)
  r = task.render('train', 5, np.random.default_rng(0), fmt='zs_opt')
  assert r['inputs'].count('OPTIONS:\n- red\n- green\n- blue') == 1
  assert r['targets'] == example['answer'] and r['options'] == options
  r = task.render('train', 5, np.random.default_rng(0), fmt='zs_noopt')
  assert 'OPTIONS' not in r['inputs'] and example['text'] in r['inputs']
  for seed in range(10):
    r = task.render('train', 5, np.random.default_rng(seed), fmt='fs_opt')
    assert r['inputs'].count('OPTIONS:') == 4          # 3 exemplars + the query
    assert r['inputs'].count('the sky looks') == 4
    assert r['inputs'].endswith(templates.options_block(options)) or \
        r['inputs'].endswith('Name the color.' + templates.options_block(options))
  # Exemplars never repeat the evaluated example (ids tell the examples apart).
  shown = collections.Counter()
  tiny = _task('tiny', n_train=4, num_fewshot=3, template_mix={'fs_noopt': 1},
               templates=[Template('{text} #{id}', '{answer}')])
  for seed in range(20):
    text = tiny.render('train', 2, np.random.default_rng(seed))['inputs']
    own = f"#{tiny.example('train', 2)['id']}"
    assert text.count(own) == 1 and text.rstrip().endswith(own)
    shown[text.count('#')] += 1
  assert shown == {4: 20}


def test_fit_exemplars_ranks_exemplars_by_tokens_where_fits_counts_them():
  """Fitting is decided in tokens: with bytes as tokens, 20 'é' (20 characters, 40 tokens)
  is longer than 30 'b', so it goes first and the other exemplar stays. A `fits` without
  `tokens` ranks by characters (dropping 'b' first, then both)."""
  template = Template('{text}', '{answer}')
  shots = [({'text': 'é' * 20, 'answer': 'x'}, None), ({'text': 'b' * 30, 'answer': 'x'}, None)]
  query = {'text': 'q' * 10, 'answer': 'y'}
  fits = pipeline.InputFits(vocab.ByteVocabulary(), 50)   # 'b' * 30 + query: 44 + EOS
  assert fits.tokens('é' * 20) == 40 and fits.tokens('b' * 30) == 30
  assert templates.fit_exemplars(template, query, 'fs_noopt', None, shots, fits) == (
      'b' * 30 + '\nx\n\n' + 'q' * 10, 'y', 1)
  by_chars = lambda text: len(text.encode()) + 1 <= 50
  assert templates.fit_exemplars(template, query, 'fs_noopt', None, shots, by_chars) == (
      'q' * 10, 'y', 2)


def test_a_fewshot_prompt_left_without_exemplars_reports_its_zero_shot_format():
  """All exemplars dropped (or none to draw): the format reported is the zero-shot one the
  prompt renders as, options or not as drawn, and the text is exactly that format's."""
  options = ['red', 'green', 'blue']
  task = _task('t', options=options, num_fewshot=2)
  question_only = lambda text: text.count('the sky looks') == 1
  for fmt, zero_shot in (('fs_opt', 'zs_opt'), ('fs_noopt', 'zs_noopt')):
    for seed in range(5):
      r = task.render('train', 5, np.random.default_rng(seed), fmt=fmt, fits=question_only)
      assert r['format'] == zero_shot and r['exemplars_dropped'] == 2
      assert (r['inputs'], r['targets']) == templates.format_example(
          task.templates[r['template']], task.example('train', 5), zero_shot, options)
      zs = task.render('train', 5, np.random.default_rng(seed), fmt=zero_shot)
      assert (zs['inputs'], zs['template']) == (r['inputs'], r['template'])
      one = task.render('train', 5, np.random.default_rng(seed), fmt=fmt,
                        fits=lambda text: text.count('the sky looks') <= 2)
      assert one['format'] == fmt and one['exemplars_dropped'] == 1
      assert task.render('train', 5, np.random.default_rng(seed), fmt=fmt)['format'] == fmt
  alone = _task('alone', n_train=1, num_fewshot=2, template_mix={'fs_noopt': 1})
  r = alone.render('train', 0, np.random.default_rng(0))   # no other example to show
  assert (r['format'], r['exemplars_dropped']) == ('zs_noopt', 0)
  assert templates.rendered_format('fs_opt', 1) == 'fs_opt'
  assert templates.rendered_format('zs_noopt', 0) == 'zs_noopt'


def test_template_mix_is_sampled_by_weight():
  task = _task('t', options=['red', 'green', 'blue'],
               template_mix={'zs_opt': 3, 'zs_noopt': 1})
  rng = np.random.default_rng(0)
  formats = collections.Counter(task.render('train', i % 100, rng)['format'] for i in range(4000))
  assert formats['zs_opt'] / 4000 == pytest.approx(0.75, abs=0.03)


def test_missing_template_field_names_the_field():
  task = _task('t', templates=[Template('{question}')])
  with pytest.raises(KeyError, match="needs field 'question'"):
    task.render('train', 0, np.random.default_rng(0))


def test_baselines_and_references():
  task = _task('t', metric_names=['accuracy'], baseline='majority')
  refs = task.references('validation')
  assert len(refs) == 10 and set(refs) <= {'red', 'green', 'blue'}
  majority = collections.Counter(task.references('train')).most_common(1)[0][0]
  expected = 100 * sum(r == majority for r in refs) / 10
  assert task.baseline_score('validation') == {'accuracy': pytest.approx(expected)}
  copy = _task('c', metric_names=['exact_match', 'f1'], baseline='copy:text')
  scores = copy.baseline_score('validation')
  assert scores['exact_match'] == 0 and 0 < scores['f1'] < 50
