"""Names that become paths (issue #28 item 1): task, mixture, eval-set and split names follow
seqio's rule (+ `-`) where they are made, and every path derived from a name stays under its
root, so a crafted config.gin cannot make eval write outside MODEL_DIR or the cache."""

from __future__ import annotations

import json
import os

import gin
import pytest

from t5x_lite import cli, config
from t5x_lite.evaluation import sets as eval_sets
from t5x_lite.rundir import names, paths, writers
from t5x_lite.data import file_tasks, mixtures, registry
from t5x_lite import models
from t5x_lite.training import loop
from tests.reliability.test_config_errors import TINY_GIN


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize('name', ['glue_rte_v2:1.0.0', 'builtin_qa', 'xsum-en', 'wmt#de.fr',
                                  'ç_tâche'])
def test_seqio_style_names_pass(name):
  assert names.check('task', name) == name


@pytest.mark.parametrize('name,bad', [
    ('x/../../../escaped/pwned', "the character '/'"), ('/tmp/owned', "the character '/'"),
    ('a b', "the character ' '"), ('a\\b', "the character '\\\\'"), ('..', 'contain ".."'),
    ('.', 'may not be "."'), ('a..b', 'contain ".."'), ('', 'non-empty'),
    (None, 'non-empty')])
def test_names_that_could_leave_a_directory_are_refused_naming_the_character(name, bad):
  with pytest.raises(names.BadName, match='task name') as e:
    names.check('task', name)
  assert bad in str(e.value) and '\n' not in str(e.value)


def test_every_registered_name_follows_the_rule():
  for name in registry.registered():
    names.check('task', name)


def test_names_are_checked_where_tasks_mixtures_eval_sets_and_splits_are_made(tmp_path):
  data = _jsonl(tmp_path)
  with pytest.raises(names.BadName, match="task name '/tmp/owned'"):
    file_tasks.file_task('/tmp/owned', data, [('{inputs}', '{targets}')], register=False)
  with pytest.raises(names.BadName, match="task 't' split name '../x' has the character '/'"):
    file_tasks.file_task('t', {**data, '../x': data['train']}, [('{inputs}', '{targets}')],
                         register=False)
  with pytest.raises(names.BadName, match="mixture name 'a/b'"):
    mixtures.Mixture('a/b', ['builtin_qa'])
  with pytest.raises(names.BadName, match="eval set name 'x/y'"):
    eval_sets.from_config({'x/y': 'builtin'}, None, 'builtin')
  with pytest.raises(names.BadName, match="eval set 'seen' split name '/else'"):
    eval_sets.from_config({'seen': {'mixture': 'builtin', 'split': '/else'}}, None, 'builtin')
  with pytest.raises(names.BadName, match="eval_split name '/somewhere/else'"):
    loop.TrainConfig(model_dir=str(tmp_path), eval_split='/somewhere/else')


def test_paths_derived_from_names_stay_under_their_root(tmp_path):
  root = str(tmp_path / 'run')
  assert paths.under(root, 'eval', '3', 'glue:1.0') == f'{root}/eval/3/glue:1.0'
  assert paths.under('gs://b/run', 'eval') == 'gs://b/run/eval'
  for parts in (('..', 'x'), ('eval', '../../x'), ('/tmp/owned',), ('a\\..\\b',), ('',),
                ('gs://other/x',), ('.',)):
    with pytest.raises(paths.OutsideRoot):
      paths.under(root, *parts)
  with pytest.raises(paths.OutsideRoot):
    paths.under('gs://b/run', '..', 'other')


@pytest.fixture
def run_dir(tmp_path):
  """A model_dir holding the config.gin that `train` writes for the tiny run."""
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  config.parse_gin(TINY_GIN, fixed=[f'MODEL_DIR={model_dir}'])
  config.model_config(), config.macro('TRAIN')
  (model_dir / 'config.gin').write_text(config.operative_config(config.model_config()))
  gin.clear_config()
  return model_dir


def _jsonl(directory) -> dict:
  for split in ('train', 'validation'):
    with open(directory / f'{split}.jsonl', 'w') as f:
      for i in range(8):
        f.write(json.dumps({'inputs': f'is {i} even?', 'targets': 'yes' if i % 2 else 'no'})
                + '\n')
  return {s: str(directory / f'{s}.jsonl') for s in ('train', 'validation')}


def _task_gin(directory, name: str, extra: str = '', files: dict | None = None) -> str:
  return (f"from t5x_lite.data import file_tasks\nfrom t5x_lite.data import spm_training\n"
          f"MIXTURE_OR_TASK_NAME = @file_tasks.file_task()\n"
          f"file_tasks.file_task.name = {name!r}\n"
          f"file_tasks.file_task.files = {files or _jsonl(directory)!r}\n"
          f"file_tasks.file_task.templates = [('{{inputs}}', '{{targets}}')]\n" + extra)


@pytest.mark.parametrize('attack', ['spm_cache', 'absolute_task', 'eval_split'])
def test_eval_refuses_a_run_config_whose_names_would_write_outside(run_dir, tmp_path, attack,
                                                                  monkeypatch, capsys):
  """The three attacks of the issue, through allowed builders only: each is one line on
  stderr (exit 2) and nothing is written outside the run or the cache."""
  cache = tmp_path / 'a' / 'b' / 'cache'
  monkeypatch.setenv('T5X_LITE_CACHE', str(cache))
  if attack == 'spm_cache':
    name = 'x/../../../escaped/pwned'
    gin_text = _task_gin(tmp_path, name, 'VOCABULARY = @spm_training.mixture_vocabulary()\n'
                         f'spm_training.mixture_vocabulary.mixture = {name!r}\n')
    expected = f"task name {name!r} has the character '/'"
  elif attack == 'absolute_task':
    name = str(tmp_path / 'owned')
    gin_text = _task_gin(tmp_path, name)
    expected = f"task name {name!r} has the character '/'"
  else:
    elsewhere = str(tmp_path / 'elsewhere')
    files = _jsonl(tmp_path)
    gin_text = _task_gin(tmp_path, 'plain', f'loop.TrainConfig.eval_split = {elsewhere!r}\n',
                         files={'train': files['train'], elsewhere: files['validation']})
    expected = f"split name {elsewhere!r} has the character '/'"
  (run_dir / 'config.gin').write_text((run_dir / 'config.gin').read_text() + gin_text)
  before = set(_tree(tmp_path))
  assert cli.main(['eval', f'--model_dir={run_dir}']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and expected in err, err
  assert set(_tree(tmp_path)) == before


def _tree(root):
  return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_a_seqio_style_task_name_trains_and_evaluates(tmp_path):
  """...also in a held-out-template eval set where only some tasks have held-out templates
  (item 8): the set evaluates those and records the others as left out."""
  data = _jsonl(tmp_path)
  glue = file_tasks.file_task('glue_rte_v2:1.0.0', data, [('{inputs}', '{targets}')],
                              heldout_templates=[('Q: {inputs}', '{targets}')],
                              metric_names=['accuracy'], options=['yes', 'no'], register=False)
  other = file_tasks.file_task('other-task', data, [('{inputs}', '{targets}')], register=False)
  mixture = mixtures.Mixture('glue_mix:v1', [glue, other])
  model_dir = tmp_path / 'run'
  loop.train(loop.TrainConfig(
      model_dir=str(model_dir), mixture=mixture, feature_lengths={'inputs': 32, 'targets': 8},
      batch_size=8, train_steps=1, eval_batch_size=8, eval_max_examples=2, progress_bar=False,
      async_checkpointing=False, eval_mixtures={
          'seen': mixture, 'heldout_templates': {'mixture': mixture, 'heldout_templates': True}},
      audit_threshold=1.0),   # the fixture's splits are one file: the audit would refuse it
      models.preset('flan_t5', 'tiny'))
  seen = model_dir / 'eval' / '1' / 'seen'
  assert len((seen / 'predictions' / 'glue_rte_v2:1.0.0.jsonl').read_text().splitlines()) == 2
  heldout = json.loads((model_dir / 'eval' / '1' / 'heldout_templates' / 'metrics.json').read_text())
  assert list(heldout['metrics']) == ['glue_rte_v2:1.0.0', 'avg']
  assert heldout['left_out'] == {'other-task': 'tasks without held-out templates'}
  logged = {k for r in writers.read_metrics(str(model_dir)) for k in r}
  assert {'eval/seen/glue_rte_v2:1.0.0/accuracy', 'eval/seen/other-task/exact_match',
          'eval/heldout_templates/glue_rte_v2:1.0.0/accuracy'} <= logged
  assert not any(k.startswith('eval/heldout_templates/other-task/') for k in logged)
  assert (model_dir / 'checkpoints' / '1').is_dir()


def test_a_held_out_template_set_where_no_task_has_any_is_one_config_error(tmp_path):
  from t5x_lite import evaluation, partitioning, validation  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import vocab  # pylint: disable=import-outside-toplevel
  data = _jsonl(tmp_path)
  tasks = [file_tasks.file_task(n, data, [('{inputs}', '{targets}')], register=False)
           for n in ('a', 'b')]
  with pytest.raises(names.errors.UserError, match="task 'a' has no held-out templates"):
    tasks[0].render('validation', 0, tasks[0].eval_rng(0), heldout=True)
  config = models.preset('flan_t5', 'tiny')
  mesh, rules = partitioning.make_mesh({'data': -1}), partitioning.rules_for('dp')
  with pytest.raises(validation.ConfigError, match=r"the held-out-template eval of 'm' "
                     r'\(validation\) has nothing to evaluate: none of its tasks \(a, b\)'):
    evaluation.Evaluator(models.build(config), mixtures.Mixture('m', tasks),
                         vocab.ByteVocabulary(), evaluation.EvalConfig(
                             {'inputs': 32, 'targets': 8}, batch_size=8, heldout_templates=True),
                         mesh, None, rules)
