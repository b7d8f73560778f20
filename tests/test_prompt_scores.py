"""Zero-shot claims a reviewer can trust (issue #30, parts 3 and 4): scores over templates
(median, min, max, spread, the headline rule), scores normalised against the trivial
baseline, every example under every template, and seen vs held-out languages at a glance."""

from __future__ import annotations

import contextlib
import io
import json
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_lite import errors, models, partitioning
from t5x_lite.commands import train as train_command
from t5x_lite.data import mixtures, pipeline, registry, tasks, vocab as vocab_lib
from t5x_lite.data.sources import GeneratedSource
from t5x_lite.data.templates import Template
from t5x_lite.evaluation import evaluator as evaluation
from t5x_lite.evaluation import languages as eval_languages
from t5x_lite.evaluation import report

TEMPLATES = [Template('Q0 {x}', '{y}'), Template('Q1 {x}', '{y}'), Template('Q2 {x}', '{y}')]


def hand_task(name='hand', **kwargs):
  """A task whose examples the tests write by hand (its source is never read here)."""
  source = GeneratedSource(lambda rng, split: {'x': '1', 'y': 'a', 'lang': 'en'},
                           {'train': 4, 'validation': 4})
  return tasks.Task(name, source, TEMPLATES, ['accuracy'], **kwargs)


def examples_under_templates(targets, languages=None):
  """Every example under each of the 3 templates, template-major (as all_templates)."""
  return [{'inputs': f'Q{t} {i}', 'targets': y, 'template': t, 'index': i,
           'language': languages[i] if languages else 'en'}
          for t in range(3) for i, y in enumerate(targets)]


TARGETS = ['a', 'b', 'b', 'b']
# Right on 4, 2 and 1 of the 4 examples under templates 0, 1 and 2: 100, 50, 25.
PREDICTIONS = ['a', 'b', 'b', 'b'] + ['a', 'b', 'x', 'x'] + ['x', 'b', 'x', 'x']
RANKED = TARGETS + TARGETS + ['b', 'a', 'a', 'a']   # rank classification: 100, 100, 0


def test_template_stats_and_each_headline_rule_by_hand():
  task, examples = hand_task(), examples_under_templates(TARGETS)
  scores, templates = report.score_task(task, examples, PREDICTIONS, RANKED, 'median')
  assert {t: s['accuracy'] for t, s in templates.items()} == {'0': 100.0, '1': 50.0, '2': 25.0}
  assert {t: s['rank_accuracy'] for t, s in templates.items()} == {
      '0': 100.0, '1': 100.0, '2': 0.0}
  assert scores == {
      'accuracy': 50.0, 'rank_accuracy': 100.0,
      'prompts/median/accuracy': 50.0, 'prompts/min/accuracy': 25.0,
      'prompts/max/accuracy': 100.0, 'prompts/spread/accuracy': 75.0,
      'prompts/median/rank_accuracy': 100.0, 'prompts/min/rank_accuracy': 0.0,
      'prompts/max/rank_accuracy': 100.0, 'prompts/spread/rank_accuracy': 100.0}
  headline = lambda how: report.score_task(task, examples, PREDICTIONS, RANKED, how)[0]
  assert headline('mean')['accuracy'] == pytest.approx(175 / 3)
  assert headline('mean')['rank_accuracy'] == pytest.approx(200 / 3)
  assert (headline('first')['accuracy'], headline('first')['rank_accuracy']) == (100.0, 100.0)
  # Pooled (None): all 12 examples at once; differs from the mean when templates differ in
  # size: drop two examples of template 0 (7 of 12 right -> 5 of 10).
  assert headline(None)['accuracy'] == pytest.approx(700 / 12)
  uneven = report.score_task(task, examples[2:], PREDICTIONS[2:], None, None)[0]
  assert uneven['accuracy'] == 50.0 and uneven['prompts/median/accuracy'] == 50.0
  assert report.score_task(task, examples[2:], PREDICTIONS[2:], None, 'mean')[0][
      'accuracy'] == pytest.approx(175 / 3)
  # One template: its score, no prompts/ keys, whatever the rule.
  assert report.score_task(task, examples[:4], PREDICTIONS[:4], None, 'median') == (
      {'accuracy': 100.0}, {})


def test_the_default_rule_and_the_configured_one():
  rule = report.headline_rule
  assert rule(None, True, 3) == rule(None, True, 4) == 'median'
  assert rule(None, True, 2) == 'mean' and rule(None, True, 1) == 'mean'
  assert rule(None, False, 4) is None   # one sampled template per example: pooled
  assert rule('first', False, 4) == 'first' and rule('mean', True, 5) == 'mean'
  with pytest.raises(errors.UserError, match='template_aggregate must be one of median'):
    evaluation.EvalConfig({'inputs': 8, 'targets': 8}, template_aggregate='max')


def test_normalised_scores_and_their_average_by_hand():
  task, perfect = hand_task(), hand_task('all_a')
  examples = examples_under_templates(TARGETS)
  results = {task.name: report.score_task(task, examples, PREDICTIONS, RANKED, 'median')[0]}
  # The majority answer 'a' is right on 1 of 4 (25) under every template; rank_accuracy's
  # baseline is the same answer. On all_a every target is 'a': its baseline is 100.
  baseline = ['a'] * 12
  baselines = {task.name: report.score_task(task, examples, baseline, baseline, 'median')[0]}
  all_a = examples_under_templates(['a'] * 4)
  results[perfect.name] = report.score_task(perfect, all_a, baseline, None, 'median')[0]
  baselines[perfect.name] = dict(results[perfect.name])
  assert baselines[task.name]['accuracy'] == 25.0
  report.add_averages(results, [task, perfect], {})
  report.add_averages(baselines, [task, perfect], {})
  report.add_normalized(results, baselines, [task, perfect])
  # median 50 against 25: 100 * 25 / 75; rank_accuracy 100 against 25: 100.
  assert results[task.name]['normalized/accuracy'] == pytest.approx(100 / 3)
  assert results[task.name]['normalized/rank_accuracy'] == pytest.approx(100.0)
  assert results[task.name]['normalized/score'] == pytest.approx(100 / 3)
  assert not [k for k in results[perfect.name] if k.startswith('normalized/')]
  assert results['avg']['normalized_score'] == pytest.approx(100 / 3)   # all_a has none
  assert report.normalized(10.0, 40.0) == pytest.approx(-50.0)   # below the baseline
  assert report.normalized(80.0, 100.0) is None and report.normalized(80.0, None) is None

  assert report.prompt_bar(25, 50, 100) == '.....=====|========='
  assert report.prompt_bar(0, 0, 0) == '|' + '.' * 19
  assert report.prompt_bar(-40, 10, float('nan')) == ''
  table = report.format_table(results, baselines).splitlines()
  assert table[0].split() == ['task', 'metric', 'score', 'baseline', 'margin', 'norm',
                              'prompts', '0..100', 'spread']
  accuracy = next(line for line in table if line.startswith('hand ') and 'accuracy ' in line)
  assert accuracy.split() == ['hand', 'accuracy', '50.0', '25.0', '+25.0', '33.3',
                              '.....=====|=========', '75.0']
  assert table[-1].split() == ['average', 'score', '75.0', '62.5', '+12.5', '33.3']
  assert report.table_legend([results]).splitlines() == [
      'norm: 100 * (score - baseline) / (100 - baseline)',
      "prompts 0..100: a task's scores over its templates, '=' lowest to highest, '|' median"]
  # Results without the new keys keep the old columns (older runs, the notebook).
  assert report.format_table({'t': {'accuracy': 1.0}}).splitlines()[0].split() == [
      'task', 'metric', 'score', 'baseline', 'margin']


def test_per_language_keys_aggregate_over_templates_on_their_own():
  task = hand_task(language_field='lang')
  langs = ['en', 'en', 'fr', 'fr']
  examples = examples_under_templates(['a', 'b', 'a', 'b'], langs)
  # Per template (en, fr): (100, 0), (100, 100), (0, 50): task-level 50, 100, 25.
  predictions = ['a', 'b', 'x', 'x'] + ['a', 'b', 'a', 'b'] + ['x', 'x', 'a', 'x']
  scores, templates = report.score_task(task, examples, predictions, None, 'median')
  assert [templates[t]['accuracy'] for t in '012'] == [50.0, 100.0, 25.0]
  assert (scores['accuracy'], scores['en/accuracy'], scores['fr/accuracy']) == (50.0, 100.0, 50.0)
  results = report.add_averages({task.name: scores}, [task], {task.name: ['en', 'fr']})
  assert results['lang'] == {'en/avg': 100.0, 'fr/avg': 50.0}   # as the headline's keys
  assert report.task_score(task, scores, 'fr') == 50.0
  assert report.language_of('fr/accuracy') == 'fr'
  assert report.language_of('prompts/min/accuracy') is None
  assert report.language_of('normalized/score') is None and report.language_of('f1') is None
  # The per-language table still reads the language keys only.
  table = report.format_language_table([task], results, None, {task.name: ['en', 'fr']})
  assert [line.split()[:3] for line in table.splitlines()[2:]] == [
      ['en', 'hand', '100.0'], ['en', 'average', '100.0'],
      ['fr', 'hand', '50.0'], ['fr', 'average', '50.0']]


def test_render_with_a_template_keeps_the_draws():
  """`template` changes the template only: the format and the few-shot exemplars are drawn
  as without it, and without it nothing changes."""
  task = registry.get('builtin_sentiment')   # 4 templates, zero- and few-shot formats
  seen_formats = set()
  for i in range(12):
    drawn = task.render('validation', i, task.eval_rng(i))
    assert task.render('validation', i, task.eval_rng(i), template=drawn['template']) == drawn
    for t in range(len(task.templates)):
      other = task.render('validation', i, task.eval_rng(i), template=t)
      assert other['template'] == t and other['format'] == drawn['format']
      assert other['targets'] == drawn['targets']
      shots = lambda e: e['inputs'].split('\n\n')[:-1]   # the exemplars' text
      if drawn['format'].startswith('fs'):
        assert len(shots(other)) == len(shots(drawn))
    seen_formats.add(drawn['format'])
  assert {'zs_opt', 'fs_opt'} <= seen_formats
  with pytest.raises(errors.UserError, match='has 1 held-out templates, no template 1'):
    task.render('validation', 0, task.eval_rng(0), heldout=True, template=1)


@pytest.fixture(scope='module')
def tiny_eval():
  mesh = partitioning.make_mesh({'data': 2, 'fsdp': -1})
  rules = partitioning.rules_for('fsdp')
  config = models.preset('flan_t5', 'tiny', num_encoder_layers=1, num_decoder_layers=1)
  shardings = partitioning.to_shardings(
      partitioning.param_specs(models.logical_axes(config), rules), mesh)
  rng = np.random.default_rng(0)   # random parameters from numpy: no init to compile
  params = jax.device_put(jax.tree.map(
      lambda x: rng.normal(0.0, x.shape[0] ** -0.5, x.shape).astype(np.float32),
      nn.unbox(models.abstract_params(config))), shardings)
  model, vocab = models.build(config), vocab_lib.get_vocabulary('byte')
  mixture = mixtures.Mixture('prompt_scores', ['builtin_sentiment', 'builtin_number_words'])

  def make(**kwargs):
    return evaluation.Evaluator(model, mixture, vocab, evaluation.EvalConfig(
        {'inputs': 96, 'targets': 8}, batch_size=8, max_examples=5, log_prefix='eval/p',
        **kwargs), mesh, shardings, rules)
  return make, params, vocab


def test_the_prompt_robust_overlay_sets_all_templates_and_the_median():
  import gin
  from t5x_lite import config
  from t5x_lite.evaluation import sets as eval_sets
  gin.clear_config()
  try:
    config.parse_gin(['gin_configs/runs/demo_cpu.gin', 'gin_configs/evals/prompt_robust.gin'],
                     fixed=["MODEL_DIR='/tmp/unused'"])
    train = config.macro('TRAIN')
    sets = eval_sets.from_config(train.eval_mixtures, train.eval_mixture, train.mixture)
  finally:
    gin.clear_config()
  assert [(s.name, s.all_templates, s.template_aggregate, s.heldout) for s in sets] == [
      ('seen', True, 'median', False), ('heldout_tasks', True, 'median', True),
      ('heldout_templates', False, None, True)]
  assert train.keep_best == 'eval/seen/avg/score'   # the headline keys keep their names


def test_default_rendering_is_one_drawn_template_per_example(tiny_eval):
  make, _, vocab = tiny_eval
  evaluator = make()
  fits = pipeline.InputFits(vocab, 96, 0)
  for task in evaluator.tasks:
    expected = [task.render('validation', i, task.eval_rng(i), fits=fits) for i in range(5)]
    got = evaluator.examples[task.name]
    assert [{k: v for k, v in e.items() if k not in ('language', 'index')} for e in got] == (
        expected)
    assert [e['index'] for e in got] == list(range(5))
    assert evaluator.template_aggregate(task) is None


def test_all_templates_scores_every_template_on_the_same_examples(tiny_eval, tmp_path):
  make, params, _ = tiny_eval
  evaluator = make(all_templates=True)
  sentiment, words = evaluator.tasks
  examples = evaluator.examples[sentiment.name]
  k = len(sentiment.templates)
  assert len(examples) == k * 5 and len(evaluator.examples[words.name]) == 3 * 5
  assert [(e['template'], e['index']) for e in examples] == [
      (t, i) for t in range(k) for i in range(5)]
  results = evaluator.evaluate(params, 3, str(tmp_path))
  out = tmp_path / 'eval' / '3' / 'validation'
  lines = [json.loads(line) for line in open(out / 'predictions' / 'builtin_sentiment.jsonl')]
  assert [(r['template'], r['index']) for r in lines] == [
      (t, i) for t in range(k) for i in range(5)]
  for i in range(5):   # the same example under each template: same target and format
    assert len({(r['targets'], r['format']) for r in lines if r['index'] == i}) == 1
    assert len({r['inputs'] for r in lines if r['index'] == i}) == k
  saved = json.load(open(out / 'metrics.json'))
  assert saved['all_templates'] is True
  assert saved['template_aggregate'] == {sentiment.name: 'median', words.name: 'median'}
  assert set(saved['templates'][sentiment.name]) == {str(t) for t in range(k)}
  flat = report.flat_metrics(results, 'eval/p')
  assert sorted(flat) == evaluator.expected_keys()
  assert 'eval/p/builtin_sentiment/prompts/median/rank_accuracy' in flat
  assert 'eval/p/avg/normalized_score' in flat

  # A random model answers alike under every template; to see the headline rule at work,
  # answer right on the first n[template] examples (decoded and rank-classified).
  def answers(right, task, options=False):
    return [(e['targets'] if e['index'] < right[e['template']] else
             next(o for o in e['options'] if o != e['targets']) if options else 'wrong')
            for e in evaluator.examples[task.name]]
  evaluator.predict = lambda params, task: answers([0, 1, 1, 5], task)
  evaluator.rank_classify = lambda params, task: answers([5, 0, 0, 1], task, options=True)
  results = evaluator.evaluate(params, 4, str(tmp_path))
  saved = json.load(open(tmp_path / 'eval' / '4' / 'validation' / 'metrics.json'))
  scores = results[sentiment.name]
  assert [saved['templates'][sentiment.name][str(t)]['accuracy'] for t in range(k)] == [
      0.0, 20.0, 20.0, 100.0]
  assert (scores['accuracy'], scores['rank_accuracy']) == (20.0, 10.0)   # medians
  assert (scores['prompts/min/accuracy'], scores['prompts/max/accuracy'],
          scores['prompts/spread/accuracy']) == (0.0, 100.0, 100.0)
  for lang in evaluator.languages()[words.name]:
    assert results[words.name][f'{lang}/exact_match'] == pytest.approx(np.median(
        [saved['templates'][words.name][str(t)][f'{lang}/exact_match'] for t in range(3)]))
    in_lang = [results[words.name][f'{lang}/exact_match']] + (
        [scores['accuracy']] if lang == 'en' else [])   # sentiment is in English
    assert results['lang'][f'{lang}/avg'] == pytest.approx(np.mean(in_lang))
  assert len({results[words.name][k] for k in results[words.name] if k.endswith(
      '/exact_match') and not k.startswith('prompts/')}) > 1   # the languages differ
  # The baselines line up with the K x N examples (one prediction per source example).
  base = evaluator.baselines()[sentiment.name]
  assert 0 < base['accuracy'] < 100 and base['prompts/spread/accuracy'] == 0.0
  assert scores['normalized/accuracy'] == pytest.approx(
      100 * (20.0 - base['accuracy']) / (100 - base['accuracy']))
  first = make(all_templates=True, template_aggregate='first')
  assert first.template_aggregate(sentiment) == 'first'


def test_expected_keys_of_the_default_rendering(tiny_eval):
  make, params, _ = tiny_eval
  evaluator = make()
  flat = report.flat_metrics(evaluator.evaluate(params, 1), 'eval/p')
  assert sorted(flat) == evaluator.expected_keys()
  assert any('/prompts/spread/' in k for k in flat)   # 5 examples over several templates


# --- Part 4: seen vs held-out languages ------------------------------------------------

def test_training_languages_and_task_families():
  assert eval_languages.training_languages('builtin_crosslingual') == {'en', 'fr', 'zh'}
  assert eval_languages.training_languages('builtin_sentiment') == {'en'}
  family = eval_languages.task_family
  assert family('builtin_xl_arithmetic_de_es', ['de', 'es']) == 'builtin_xl_arithmetic'
  assert family('builtin_xl_arithmetic', ['en', 'fr']) == 'builtin_xl_arithmetic'
  assert family('qa_en', ['fr']) == 'qa_en' and family('en', ['en']) == 'en'


def glance_sets():
  """Two sets of hand-made results: x_a in en/fr and x_b in en (seen), x_a_de_es (held out)."""
  a, b = hand_task('x_a', language_field='lang'), hand_task('x_b', language='en')
  held = hand_task('x_a_de_es', language_field='lang')
  seen = ([a, b], {'x_a': {'accuracy': 70.0, 'en/accuracy': 80.0, 'fr/accuracy': 60.0},
                   'x_b': {'accuracy': 50.0}}, {'x_a': ['en', 'fr'], 'x_b': ['en']})
  heldout = ([held], {'x_a_de_es': {'accuracy': 30.0, 'de/accuracy': 40.0,
                                    'es/accuracy': 20.0}}, {'x_a_de_es': ['de', 'es']})
  return seen, heldout


def test_language_glance_by_hand():
  seen, heldout = glance_sets()
  text = eval_languages.format_language_glance([seen, heldout], {'en', 'fr'})
  lines = text.splitlines()
  assert lines[0] == 'Per language, seen (in the training mixture) vs held-out; tasks x_*:'
  assert lines[1].split() == ['language', 'a', 'b', 'avg']
  assert [line.split() for line in lines[3:]] == [
      ['en', 'seen', '80.0', '50.0', '65.0'],
      ['fr', 'seen', '60.0', '60.0'],
      ['de', 'held-out', '40.0', '40.0'],
      ['es', 'held-out', '20.0', '20.0'],
      ['average', 'seen', '70.0', '50.0', '62.5'],
      ['average', 'held-out', '30.0', '30.0'],
      ['gap', 'held-out', '-', 'seen', '-40.0', '-32.5']]
  fr = lines[4]   # its one score under column a (right-aligned), none under b
  assert fr.index('60.0') + len('60.0') == lines[1].index(' a ') + len(' a')
  assert eval_languages.format_language_glance([seen], {'en', 'fr'}) is None   # none held out
  assert eval_languages.format_language_glance([heldout], {'de', 'es'}) is None


def test_the_crosslingual_demo_prints_the_glance():
  """commands/train.py's _print_results, as `t5x-lite demo --gin_file=gin_configs/runs/
  crosslingual_cpu.gin` calls it: the crosslingual protocol's two sets, the training
  mixture builtin_crosslingual (en/fr/zh)."""
  def fake(set_name, mixture, score):
    tasks_ = mixtures.get_mixture(mixture).tasks
    langs = {t.name: sorted(eval_languages.training_languages(
        mixtures.Mixture('one', [t])) if 'heldout' not in mixture else {'de', 'es'})
        for t in tasks_}
    results = {t.name: {**{n: score for n in t.metric_names},
                        **{f'{l}/{n}': score for l in langs[t.name] for n in t.metric_names}}
               for t in tasks_}
    report.add_averages(results, tasks_, langs)
    config = types.SimpleNamespace(log_prefix=f'eval/{set_name}', split='validation',
                                   heldout_templates=False, all_templates=False)
    evaluator = types.SimpleNamespace(config=config, tasks=tasks_, mixture_name=mixture,
                                      baselines=lambda: None, languages=lambda: langs)
    return evaluator, results
  result = {'evals': [fake('seen_languages', 'builtin_crosslingual', 60.0),
                      fake('heldout_languages', 'builtin_crosslingual_heldout', 20.0)],
            'train_mixture': 'builtin_crosslingual'}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train_command._print_results(result)
  text = out.getvalue()
  glance = text[text.index('Per language, seen'):].splitlines()
  assert glance[0].endswith('; tasks builtin_xl_*:')
  assert glance[1].split() == ['language', 'number_words', 'arithmetic', 'words_to_number',
                               'compare_words', 'word_count', 'avg']
  assert [line.split()[:2] for line in glance[3:8]] == [
      ['en', 'seen'], ['fr', 'seen'], ['zh', 'seen'], ['de', 'held-out'], ['es', 'held-out']]
  assert glance[-1].split()[-1] == '-40.0'   # held-out 20 - seen 60
  assert 'eval/heldout_languages: builtin_crosslingual_heldout on validation' in text
