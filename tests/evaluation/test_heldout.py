"""Held-out guards (evaluation/heldout.py): trained tasks and templates in held-out sets,
keep_best on a held-out set, the train-start audit, and `t5x-lite audit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from t5x_lite import cli, models
from t5x_lite.data import builtin_tasks, file_tasks, mixtures, registry
from t5x_lite.evaluation import contamination, heldout, sets as eval_sets
from t5x_lite.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ('river mountain yellow quiet engine garden silver window letter market forest candle '
         'harbor violin planet basket thunder lantern meadow pepper').split()


def sentence(i: int, length: int = 16) -> str:
  """A distinct sentence per i (its words drawn by i's digits): no 13-gram in common."""
  rng = __import__('random').Random(i)
  return ' '.join(rng.choice(WORDS) for _ in range(length)) + f' number{i}.'


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def text_task(tmp_path, name, train, validation, template='Rewrite: {text}'):
  write_jsonl(tmp_path / name / 'train.jsonl', [{'text': t, 'answer': 'a'} for t in train])
  write_jsonl(tmp_path / name / 'validation.jsonl',
              [{'text': t, 'answer': 'a'} for t in validation])
  return file_tasks.file_task(
      name, {'train': f'{name}/train.jsonl', 'validation': f'{name}/validation.jsonl'},
      [(template, '{answer}')], data_dir=str(tmp_path),
      heldout_templates=[('Held out: {text}', '{answer}')])


def test_heldout_defaults_and_explicit_flag():
  sets = eval_sets.from_config({
      'seen': 'builtin', 'heldout_tasks': 'builtin_heldout',
      'tpl': {'mixture': 'builtin', 'heldout_templates': True},
      'heldout_not': {'mixture': 'builtin', 'heldout': False},
      'zeroshot': {'mixture': 'builtin_heldout', 'heldout': True}}, None, 'builtin')
  assert [(s.name, s.heldout) for s in sets] == [
      ('seen', False), ('heldout_tasks', True), ('tpl', True), ('heldout_not', False),
      ('zeroshot', True)]


def test_a_trained_task_in_a_heldout_set_is_named_with_its_mixture_path():
  builtin_tasks.register_all()
  inner = mixtures.Mixture('inner_mix', ['builtin_qa', 'builtin_sort'])
  training = mixtures.Mixture('outer_mix', ['builtin_sentiment', inner])
  registry.register(mixtures.Mixture('leaky_heldout', ['builtin_sort_descending',
                                                       'builtin_sort']), overwrite=True)
  sets = eval_sets.from_config({'heldout_tasks': 'leaky_heldout'}, None, training)
  with pytest.raises(heldout.NotHeldOut,
                     match=r"task 'builtin_sort' is in the training mixture "
                           r"\(outer_mix > inner_mix > builtin_sort\)"):
    heldout.check_sets(sets, training)
  heldout.check_sets(eval_sets.from_config({'heldout_tasks': 'builtin_heldout'}, None, training),
                     training)
  # marked not held out: no claim, no check
  heldout.check_sets(eval_sets.from_config(
      {'heldout_tasks': {'mixture': 'leaky_heldout', 'heldout': False}}, None, training),
      training)


def test_a_heldout_template_that_is_trained_on_is_refused(tmp_path):
  a = text_task(tmp_path, 'tpl_a', [sentence(i) for i in range(5)], [sentence(9)],
                template='Held out: {text}')   # trains on b's held-out template
  b = text_task(tmp_path, 'tpl_b', [sentence(i) for i in range(10, 15)], [sentence(19)])
  training = mixtures.Mixture('tpl_train', [a, b])
  sets = eval_sets.from_config({'templates': {'mixture': training, 'heldout_templates': True}},
                               None, training)
  with pytest.raises(heldout.NotHeldOut, match="held-out template 'Held out: {text}' of task "
                                               "'tpl_a' is a training template of task 'tpl_a'"):
    heldout.check_sets(sets, training)


def test_keep_best_on_a_heldout_set_is_refused_unless_allowed():
  sets = eval_sets.from_config({'seen': 'builtin', 'heldout_tasks': 'builtin_heldout'}, None,
                               'builtin')
  with pytest.raises(heldout.NotHeldOut, match="held-out set 'heldout_tasks': its zero-shot "
                                               'score would then be optimistic'):
    heldout.check_keep_best('eval/heldout_tasks/avg/score', sets, allow=False)
  assert heldout.check_keep_best('eval/heldout_tasks/avg/score', sets, allow=True) == {
      'key': 'eval/heldout_tasks/avg/score', 'set': 'heldout_tasks', 'heldout': True}
  assert heldout.check_keep_best('eval/seen/avg/score', sets, allow=False)['heldout'] is False
  assert heldout.check_keep_best(None, sets, allow=False) is None


def _leaky(tmp_path):
  """A training task and a held-out task whose validation shares 2 of 10 examples' text."""
  train = [sentence(i) for i in range(40)]
  leaked = [f'Intro words. {train[3]}', train[7]]   # a 13-gram hit and a duplicate
  validation = leaked + [sentence(100 + i) for i in range(8)]
  return (text_task(tmp_path, 'leak_train', train, [sentence(200)]),
          text_task(tmp_path, 'leak_heldout', [sentence(300)], validation))


def test_the_run_refuses_to_start_above_the_audit_threshold(tmp_path):
  train_task, held = _leaky(tmp_path)
  model_dir = tmp_path / 'run'
  config = loop.TrainConfig(
      model_dir=str(model_dir), mixture=mixtures.Mixture('leak_mix', [train_task]),
      feature_lengths={'inputs': 32, 'targets': 8}, batch_size=8, train_steps=1,
      progress_bar=False, eval_mixtures={'seen': 'leak_train', 'heldout_tasks': held})
  with pytest.raises(heldout.NotHeldOut,
                     match=r'audit_threshold=0.01: heldout_tasks/leak_heldout ~ leak_train: '
                           r'20.0% of its examples'):
    loop.train(config, models.preset("flan_t5", "tiny"))
  report = json.loads((model_dir / 'audit' / 'train_start.json').read_text())
  pair = report['sets']['heldout_tasks']['tasks']['leak_heldout']['pairs']['leak_train']
  assert (pair['contaminated'], pair['ngram'], pair['duplicates']) == (2, 2, 1)
  assert 'seen' not in report['sets']      # only held-out sets at train start
  assert not (model_dir / 'checkpoints').exists()


def test_audit_threshold_one_disables_the_audit(tmp_path):
  train_task, held = _leaky(tmp_path)
  sets = eval_sets.from_config({'heldout_tasks': held}, None, train_task)
  assert heldout.audit_at_start(sets, mixtures.get_mixture(train_task), 'validation', None,
                                1.0, contamination.AuditConfig(), None) is None
  report = heldout.audit_at_start(sets, mixtures.get_mixture(train_task), 'validation', None,
                                  0.25, contamination.AuditConfig(), None)
  assert contamination.max_fraction(report) == pytest.approx(0.2)


def test_cli_audit_writes_tables_and_json_and_fails_above(tmp_path, capsys):
  _leaky(tmp_path)
  gin = tmp_path / 'run.gin'
  gin.write_text(f"""
from __gin__ import dynamic_registration
from t5x_lite.data import file_tasks
from t5x_lite.training import loop
include 'gin_configs/runs/finetune.gin'
MIXTURE_OR_TASK_NAME = @file_tasks.file_mixture()
file_tasks.file_mixture.name = 'cli_leak'
file_tasks.file_mixture.tasks = [@train/file_tasks.file_task()]
train/file_tasks.file_task:
  name = 'cli_leak_train'
  data_dir = '{tmp_path}'
  files = {{'train': 'leak_train/train.jsonl', 'validation': 'leak_train/validation.jsonl'}}
  templates = [('Rewrite: {{text}}', '{{answer}}')]
held/file_tasks.file_task:
  name = 'cli_leak_heldout'
  data_dir = '{tmp_path}'
  files = {{'train': 'leak_heldout/train.jsonl', 'validation': 'leak_heldout/validation.jsonl'}}
  templates = [('Rewrite: {{text}}', '{{answer}}')]
loop.TrainConfig.eval_mixtures = {{'heldout_tasks': @held/file_tasks.file_task()}}
""")
  run = str(tmp_path / 'audit_run')
  assert cli.main(['audit', f'--gin_file={gin}', f'--model_dir={run}']) == 0
  out = capsys.readouterr().out
  assert 'heldout_tasks (held out): 1 tasks, 10 examples (validation)' in out
  row = next(line for line in out.splitlines() if line.startswith('cli_leak_heldout'))
  assert row.split() == ['cli_leak_heldout', 'cli_leak_train', '10', '2', '20.0%', '2', '1',
                         '1', '1']
  report = json.loads(open(os.path.join(run, 'audit', 'audit.json')).read())
  assert report['complete'] and report['train']['cli_leak_train']['scanned'] == 40
  assert cli.main(['audit', f'--gin_file={gin}', f'--model_dir={run}',
                   '--fail_above=0.1']) == 1
  assert 'above --fail_above=0.1' in capsys.readouterr().out
  assert cli.main(['audit', f'--gin_file={gin}', f'--model_dir={run}',
                   '--fail_above=0.2']) == 0
  proc = subprocess.run([sys.executable, '-m', 't5x_lite.cli', 'audit', f'--gin_file={gin}',
                         f'--model_dir={run}', '--fail_above=2'], cwd=REPO, text=True,
                        capture_output=True, env={**os.environ, 'PYTHONPATH': REPO})
  assert proc.returncode == 2 and 'must be a fraction in [0, 1]' in proc.stderr
