"""The evaluation protocol (issue 19): per-language and per-template scores, averages, named
eval sets, the best checkpoint and --checkpoint=best."""

from __future__ import annotations

import functools
import json
import os
import shutil

import numpy as np
import pytest

from t5x_lite import errors, models
from t5x_lite.evaluation import report as eval_report, sets as eval_sets
from t5x_lite.rundir import writers
from t5x_lite.data import builtin_generators as gen
from t5x_lite.data import mixtures, registry, tasks
from t5x_lite.data.sources import GeneratedSource
from t5x_lite.data.templates import Template
from t5x_lite.training import best_checkpoint, checkpoints, loop
from tests.training.test_runs import cli, finish

TINY = models.preset('flan_t5', 'tiny')


def number_words_task(name='number_words_mixed', langs=('en', 'fr', 'zh')):
  return tasks.Task(
      name, GeneratedSource(functools.partial(gen.number_words, langs=langs),
                            {'train': 50, 'validation': 30}, seed=7),
      [Template('Write {number} in {language} words.', '{words}'),
       Template('Spell out {number} in {language}.', '{words}')],
      ['exact_match'], heldout_templates=[Template('{number} in {language}?', '{words}')],
      language_field='lang', baseline='majority')


def rendered(task, n=30):
  return [dict(task.render('validation', i, task.eval_rng(i)),
               language=task.example_language(task.example('validation', i)))
          for i in range(n)]


def test_a_task_with_several_languages_reports_each_and_their_mean():
  task = number_words_task()
  examples = rendered(task)
  # Right in French and Chinese only.
  predictions = [e['targets'] if e['language'] in ('fr', 'zh') else 'wrong' for e in examples]
  scores, templates = eval_report.score_task(task, examples, predictions)
  assert scores['fr/exact_match'] == scores['zh/exact_match'] == 100.0
  assert scores['en/exact_match'] == 0.0
  assert scores['exact_match'] == pytest.approx(200 / 3)   # the mean over languages
  assert set(templates) == {'0', '1'}   # per template id, each over its own examples
  results = eval_report.add_averages({task.name: scores}, [task],
                                     {task.name: ['en', 'fr', 'zh']})
  assert results['lang'] == {'en/avg': 0.0, 'fr/avg': 100.0, 'zh/avg': 100.0}
  assert results['avg'] == {'score': pytest.approx(200 / 3), 'exact_match': pytest.approx(200 / 3)}
  flat = eval_report.flat_metrics(results, 'eval/seen')
  assert flat['eval/seen/number_words_mixed/fr/exact_match'] == 100.0
  assert flat['eval/seen/lang/zh/avg'] == 100.0
  table = eval_report.format_language_table([task], results, None,
                                            {task.name: ['en', 'fr', 'zh']})
  assert [line.split()[:3] for line in table.splitlines()[2:4]] == [
      ['en', 'number_words_mixed', '0.0'], ['en', 'average', '0.0']]


def test_eval_sets_from_gin_style_specs():
  sets = eval_sets.from_config({'seen': 'builtin', 'tpl': {'mixture': 'builtin',
                                                          'heldout_templates': True}},
                               None, 'builtin')
  assert [(s.name, s.log_prefix, s.heldout_templates) for s in sets] == [
      ('seen', 'eval/seen', False), ('tpl', 'eval/tpl', True)]
  assert sets[0].results_name('validation', 'validation') == 'seen'
  assert sets[0].results_name('test', 'validation') == 'seen-test'
  [default] = eval_sets.from_config(None, None, 'builtin')
  assert (default.log_prefix, default.results_name('validation', 'validation')) == ('eval', 'validation')
  with pytest.raises(errors.UserError, match="a dict needs mixture="):
    eval_sets.from_config({'x': {'heldout': True}}, None, 'builtin')
  with pytest.raises(errors.UserError, match="eval set name 'a/b' has the character '/'"):
    eval_sets.from_config({'a/b': 'builtin'}, None, 'builtin')
  with pytest.raises(errors.UserError, match="an eval set may not be named 'avg'"):
    eval_sets.from_config({'avg': 'builtin'}, None, 'builtin')


def test_best_checkpoint_record_ties_nan_and_resume(tmp_path):
  best = best_checkpoint.BestCheckpoint(str(tmp_path), 'eval/avg/score', 'max')
  assert best.update(2, {'eval/avg/score': 10.0})
  assert not best.update(4, {'eval/avg/score': 10.0})    # a tie keeps the earlier step
  assert not best.update(6, {'eval/avg/score': float('nan')})
  assert best.update(8, {'eval/avg/score': 11.0})
  assert best_checkpoint.read(str(tmp_path))['step'] == 8 and best.keep.steps == {8}
  assert best_checkpoint.resolve_step(str(tmp_path), 'best') == 8
  again = best_checkpoint.BestCheckpoint(str(tmp_path), 'eval/avg/score', 'max')
  again.resume_at(6)   # a run resuming at 6 redoes the eval of 8
  assert best_checkpoint.read(str(tmp_path)) is None and again.keep.steps == set()
  with pytest.raises(errors.UserError, match='has no best checkpoint'):
    best_checkpoint.resolve_step(str(tmp_path), 'best')
  with pytest.raises(errors.UserError, match="did you mean 'eval/seen/avg/score'"):
    best_checkpoint.BestCheckpoint(str(tmp_path), 'eval/sen/avg/score').check_key(
        ['eval/seen/avg/score', 'eval/seen/qa/f1'])
  with pytest.raises(errors.UserError, match="must be 'best', 'latest' or a step"):
    best_checkpoint.resolve_step(str(tmp_path), 'newest')


def test_the_best_checkpoint_outlives_max_to_keep(tmp_path):
  keep = best_checkpoint.KeepSteps({2})
  ckpt = checkpoints.Checkpointer(str(tmp_path), 1, async_save=False,
                                  preservation_policy=best_checkpoint.preservation_policy(1, keep))
  for step in range(1, 6):
    ckpt.save(step, {'step': np.int32(step), 'params': {'w': np.full(3, step, np.float32)}})
  assert ckpt.all_steps() == [2, 5]


@pytest.fixture(scope='module')
def sets_run(tmp_path_factory):
  """A tiny in-process run: 4 steps, evals at 2 and 4 on three named sets, keep_best."""
  model_dir = str(tmp_path_factory.mktemp('sets'))
  words = number_words_task()
  registry.register(words, overwrite=True)
  config = loop.TrainConfig(
      model_dir=model_dir, mixture=mixtures.Mixture('m', ['builtin_sentiment', words.name]),
      feature_lengths={'inputs': 64, 'targets': 16}, batch_size=8, train_steps=4, log_period=2,
      checkpoint_period=100, max_to_keep=1, eval_period=2, eval_batch_size=8,
      eval_max_examples=6, progress_bar=False, async_checkpointing=False,
      eval_mixtures={'seen': 'm_eval', 'templates': {'mixture': 'm_eval',
                                                     'heldout_templates': True}},
      keep_best='eval/seen/avg/score')
  registry.register(mixtures.Mixture('m_eval', ['builtin_sentiment', words.name]),
                    overwrite=True)
  result = loop.train(config, TINY)
  return model_dir, result


def test_named_eval_sets_log_per_set_language_and_template(sets_run):
  model_dir, result = sets_run
  records = [r for r in writers.read_metrics(model_dir) if 'eval/seen/avg/score' in r]
  assert [r['step'] for r in records] == [2, 4]
  record = {k: v for r in writers.read_metrics(model_dir) if r['step'] == 4 for k, v in r.items()}
  for key in ('eval/seen/builtin_sentiment/accuracy', 'eval/seen/builtin_sentiment/rank_accuracy',
              'eval/seen/number_words_mixed/fr/exact_match', 'eval/seen/lang/zh/avg',
              'eval/templates/number_words_mixed/exact_match', 'eval/templates/avg/score'):
    assert key in record, key
  seen = json.load(open(os.path.join(model_dir, 'eval', '4', 'seen', 'metrics.json')))
  assert seen['languages']['number_words_mixed'] == ['en', 'fr', 'zh']
  assert set(seen['templates']['builtin_sentiment']) <= {'0', '1', '2', '3'}
  held = json.load(open(os.path.join(model_dir, 'eval', '4', 'templates', 'metrics.json')))
  assert held['heldout_templates'] is True
  line = json.loads(open(os.path.join(model_dir, 'eval', '4', 'templates', 'predictions',
                                      'number_words_mixed.jsonl')).readline())
  assert line['template'] == 0 and line['language'] in ('en', 'fr', 'zh')
  assert line['inputs'].endswith('?')   # the held-out template
  assert [e.config.log_prefix for e, _ in result['evals']] == ['eval/seen', 'eval/templates']


def test_keep_best_keeps_its_checkpoint_beside_the_latest(sets_run):
  model_dir, _ = sets_run
  best = best_checkpoint.read(model_dir)
  assert best['key'] == 'eval/seen/avg/score' and best['step'] in (2, 4)
  values = {r['step']: r['eval/seen/avg/score'] for r in writers.read_metrics(model_dir)
            if 'eval/seen/avg/score' in r}
  assert best['value'] == max(values.values()) and values[best['step']] == best['value']
  assert checkpoints.Checkpointer(model_dir).all_steps() == sorted({best['step'], 4})
  events = [r for r in writers.read_metrics(model_dir) if r.get('event') == 'best_checkpoint']
  assert events and events[-1]['step'] == best['step']
  for name, heldout in (('seen', False), ('templates', True)):   # which set selected it
    record = json.loads(open(os.path.join(model_dir, 'eval', '4', name, 'metrics.json')).read())
    assert record['heldout'] is heldout and record['checkpoint_selected_by'] == {
        'key': 'eval/seen/avg/score', 'set': 'seen', 'heldout': False}


def test_a_keep_best_key_no_eval_writes_fails_before_training(tmp_path):
  config = loop.TrainConfig(
      model_dir=str(tmp_path), mixture='builtin_sentiment', batch_size=8, train_steps=2,
      feature_lengths={'inputs': 48, 'targets': 8}, eval_batch_size=8, eval_max_examples=2,
      progress_bar=False, keep_best='eval/builtin_sentiment/acuracy')
  with pytest.raises(errors.UserError, match="did you mean 'eval/builtin_sentiment/accuracy'"):
    loop.train(config, TINY)
  assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == []


def test_cli_eval_of_the_best_checkpoint_with_heldout_templates(full_run, tmp_path):
  model_dir = str(tmp_path / 'run')
  shutil.copytree(full_run[0], model_dir)
  error = finish_error(cli(['eval', f'--model_dir={model_dir}', '--checkpoint=best']))
  assert error.startswith(f'error: {model_dir} has no best checkpoint')
  with open(os.path.join(model_dir, best_checkpoint.BEST_FILE), 'w') as f:
    json.dump({'step': 9, 'key': 'eval/avg/score', 'mode': 'max', 'value': 1.0}, f)
  out, _ = finish(cli(['eval', f'--model_dir={model_dir}', '--checkpoint=best',
                       '--heldout_templates']))
  [name] = [d for d in os.listdir(os.path.join(model_dir, 'eval', '9'))]
  assert name.startswith('validation-') and f'split validation -> {model_dir}/eval/9/{name}' in out
  result = json.load(open(os.path.join(model_dir, 'eval', '9', name, 'metrics.json')))
  assert result['heldout_templates'] and result['step'] == 9
  assert 'en' in result['languages']['builtin_qa'] or result['languages']['builtin_qa'] == []
  records = writers.read_metrics(model_dir)
  assert [r['step'] for r in records if f'eval_{name}/avg/score' in r] == [9]
  assert 'average' in out and 'baseline' in out


def finish_error(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 2, err[-2000:]
  return err.strip().splitlines()[-1]
