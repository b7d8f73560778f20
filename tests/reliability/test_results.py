"""Nothing lost, nothing silent in a run's results (issue #18 items 3, 5-8): no non-finite state
saved and a lower learning rate resumes, an eval cut short is redone, metrics.jsonl keeps one
line per step through kills, eval results are kept per split, infer checks its output first."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from t5x_lite import models
from t5x_lite.rundir import writers
from t5x_lite.commands import infer
from t5x_lite.training import checkpoints, guard, loop, optimizers
from tests.training.test_runs import NO_EVAL, TINY_RUN, cli, finish, losses

CONFIG = models.preset('flan_t5', 'tiny')   # what gin_configs/models/flan_t5/tiny.gin builds


def fail(proc, timeout=600):
  """The one-line error of a command that must fail with exit code 2."""
  _, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 2, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'Traceback' not in err, err[-3000:]
  return last


def train(model_dir, *extra):
  return cli(['train', f'--model_dir={model_dir}'] + TINY_RUN + list(extra))


def train_lines(model_dir):
  return [r['step'] for r in writers.read_metrics(model_dir) if 'train/loss' in r]


@pytest.fixture
def evaluated_run(full_run):
  """10 steps, checkpoints [6, 9, 10], the end-of-run eval of step 10 on 3 examples a task
  (conftest's full_run: read it, copy it to change it)."""
  return full_run[0]


# --- 3. no non-finite state saved; the advice to lower the learning rate works --------------

def test_a_non_finite_update_stops_the_run_before_it_is_saved(tmp_path):
  """AdamW's first update is +-lr per weight: 3.4e38 (+ decay) overflows float32. The step's
  `state_finite` catches it; nothing is checkpointed although every step is a checkpoint step."""
  config = loop.TrainConfig(
      model_dir=str(tmp_path), feature_lengths={'inputs': 64, 'targets': 16}, batch_size=8,
      train_steps=3, log_period=1, checkpoint_period=1, eval_at_end=False, progress_bar=False,
      async_checkpointing=False, optimizer=optimizers.OptimizerConfig(
          name='adamw', learning_rate=3.4e38, weight_decay=1.0))
  with pytest.raises(guard.NonFiniteError, match=(
      r'the update of step 1 made the parameters or optimizer state non-finite; it was not '
      r'saved .*No earlier checkpoint is left: the same command with a lower '
      r'--gin.LEARNING_RATE \(this run: 3.4e\+38\) starts over')):
    loop.train(config, CONFIG)
  assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == []


def test_no_save_during_a_streak_of_skipped_steps_and_a_non_finite_state_stops(tmp_path):
  """A save due mid-streak waits for the next finite step (the final step saves anyway); a
  state that is non-finite on a skipped step came in so (restored or initial)."""
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  g = guard.Guard(5, ckpt, 1e-3)
  g.push({'bad_streak': np.int32(1), 'state_finite': np.bool_(True)}, 3)
  assert not g.should_save(True, final=False)       # due at 3, put off
  g.push({'bad_streak': np.int32(0), 'state_finite': np.bool_(True)}, 4)
  assert g.should_save(False, final=False)          # saved at 4 instead
  assert not g.should_save(False, final=False)
  g.push({'bad_streak': np.int32(2), 'state_finite': np.bool_(True)}, 5)
  assert g.should_save(True, final=True)
  g.push({'bad_streak': np.int32(1), 'state_finite': np.bool_(False)}, 6)
  with pytest.raises(guard.NonFiniteError, match=r'already non-finite before step 6 .*'
                     r'No earlier checkpoint is left'):
    g.should_save(True, final=False)


def test_after_a_non_finite_stop_a_lower_learning_rate_resumes_and_trains_on(evaluated_run,
                                                                             tmp_path):
  """lr 1e30 from step 10: step 11's update blows the weights up (finite, ~1e30), steps 12-16
  are non-finite and skipped. Before, the checkpoints of steps 11-15 (saved mid-streak) held
  those weights and rotated the good ones out, so the advised restart with a lower rate failed
  the same way. Now 11 is moved aside, 12-15 are never saved, and the restart resumes from 10."""
  model_dir = str(tmp_path / 'run')
  shutil.copytree(evaluated_run, model_dir)
  error = fail(train(model_dir, '--gin.TRAIN_STEPS=16', '--gin.CHECKPOINT_PERIOD=1',
                     '--gin.LEARNING_RATE=1e30', *NO_EVAL))
  assert error == (
      'error: 5 consecutive steps had a non-finite loss or gradient (steps 12-16, last at step '
      '16); their updates were skipped. Checkpoints [11] hold the parameters that gave those '
      f'losses: moved to {model_dir}/checkpoints_broken. Restart the same command with a '
      'lower --gin.LEARNING_RATE (this run: 1e+30): it resumes from step 10; or clip gradients '
      '(--gin.optimizers.OptimizerConfig.clip_grad_norm=1.0), or check the data.')
  assert checkpoints.Checkpointer(model_dir).all_steps() == [9, 10]   # 11 rotated 6 out
  assert os.listdir(os.path.join(model_dir, 'checkpoints_broken')) == ['11-non_finite']   # kept
  _, err = finish(train(model_dir, '--gin.TRAIN_STEPS=16', '--gin.CHECKPOINT_PERIOD=1',
                        '--gin.LEARNING_RATE=1e-3', *NO_EVAL))
  assert 'Resuming from step 10' in err
  assert train_lines(model_dir) == list(range(1, 17))     # one line per step
  assert all(np.isfinite(v) for v in losses(model_dir).values())


# --- 5. an eval cut short is redone -----------------------------------------------------------

def test_an_end_of_run_eval_cut_short_is_redone_on_restart(evaluated_run, tmp_path):
  """What a kill during the final eval leaves: predictions of some tasks, maybe the eval line
  of metrics.jsonl, no metrics.json. The restart (train_steps already reached) evaluates step
  10 again, and metrics.jsonl keeps one eval line; a restart of a complete run does not."""
  model_dir = str(tmp_path / 'run')
  shutil.copytree(evaluated_run, model_dir)
  results = os.path.join(model_dir, 'eval', '10', 'validation')
  expected = json.load(open(os.path.join(results, 'metrics.json')))
  os.remove(os.path.join(results, 'metrics.json'))
  open(os.path.join(results, 'predictions', 'builtin_sort.jsonl'), 'w').write('{"inputs": "')
  eval_only = ['--gin.loop.TrainConfig.eval_max_examples=3']
  _, err = finish(train(model_dir, *eval_only))
  assert 'The eval of step 10 did not complete: running it again' in err
  assert json.load(open(os.path.join(results, 'metrics.json'))) == expected
  assert len(open(os.path.join(results, 'predictions', 'builtin_sort.jsonl')).readlines()) == 3
  records = writers.read_metrics(model_dir)
  assert [r['step'] for r in records if 'eval/builtin_qa/f1' in r] == [10]
  assert train_lines(model_dir) == list(range(1, 11))
  _, err = finish(train(model_dir, *eval_only))
  assert 'running it again' not in err and 'Resuming from step 10' in err
  assert len(writers.read_metrics(model_dir)) == len(records)


# --- 6. metrics.jsonl: one line per step, half lines dropped, atomic rewrites -----------------

def _write_lines(path, steps, half=True):
  with open(path, 'w') as f:
    for step in steps:
      f.write(json.dumps({'step': step, 'train/loss': 99.0}) + '\n')
    if half:
      f.write('{"step": 6, "train/lo')   # a kill in the middle of a write


def test_a_half_written_last_line_is_dropped_with_a_warning(tmp_path, caplog):
  path = str(tmp_path / writers.METRICS_FILE)
  _write_lines(path, [1, 2])
  with caplog.at_level(logging.WARNING):
    assert [r['step'] for r in writers.read_metrics(str(tmp_path))] == [1, 2]
  assert f'{path}:3: dropped a half-written line' in caplog.text
  writer = writers.MetricsWriter(str(tmp_path), tensorboard=False)   # repairs before appending
  writer.write(3, {'train/loss': 1.0})
  assert open(path).read().splitlines()[-2:] == [
      '{"step": 2, "train/loss": 99.0}', '{"step": 3, "train/loss": 1.0}']


def test_a_kill_during_a_rewrite_loses_nothing(tmp_path, monkeypatch):
  """The rewrite goes to a temporary file renamed over the original: killed before the rename
  (here: the rename raises), the original is whole."""
  path = str(tmp_path / writers.METRICS_FILE)
  _write_lines(path, [1, 2, 3], half=False)
  before = open(path).read()

  def killed(*args):
    raise KeyboardInterrupt('killed')
  monkeypatch.setattr(writers.os, 'replace', killed)
  with pytest.raises(KeyboardInterrupt):
    writers.MetricsWriter(str(tmp_path), tensorboard=False).truncate_after(1)
  assert open(path).read() == before


@pytest.mark.parametrize('start', ['fresh', 'params_only'])
def test_lines_of_an_attempt_killed_before_its_first_checkpoint_are_not_kept(start, tmp_path):
  """A run killed before its first checkpoint (or a warm start from a converted, params-only
  checkpoint in its model_dir) restarts at step 0: the lines it had logged were appended to
  before; now they are replaced, one line per step."""
  model_dir = str(tmp_path)
  if start == 'params_only':
    ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
    ckpt.save(0, {'params': models.init_params(CONFIG, jax.random.key(3))}, None,
              checkpoints.meta_for(CONFIG, 'byte', None, {'params_only': True}))
    ckpt.close()
  _write_lines(os.path.join(model_dir, writers.METRICS_FILE), [1, 2, 3, 4, 5])
  finish(train(model_dir, '--gin.TRAIN_STEPS=4', *NO_EVAL))
  assert train_lines(model_dir) == [1, 2, 3, 4]
  assert 99.0 not in losses(model_dir).values()


# --- 7. eval results per step and split; an unknown split is an error -------------------------

def test_eval_of_an_unknown_split_fails_before_decoding_and_overwrites_nothing(evaluated_run):
  results = os.path.join(evaluated_run, 'eval', '10', 'validation', 'metrics.json')
  before = open(results).read(), os.path.getmtime(results)
  lines = open(os.path.join(evaluated_run, writers.METRICS_FILE)).read()
  error = fail(cli(['eval', f'--model_dir={evaluated_run}', '--split=valdation']))
  assert error == ("error: no task of 'builtin_curriculum' has a split 'valdation' (did you mean "
                   "'validation'?); their splits: train, validation, test")
  assert (open(results).read(), os.path.getmtime(results)) == before
  assert os.listdir(os.path.join(evaluated_run, 'eval', '10')) == ['validation']
  assert open(os.path.join(evaluated_run, writers.METRICS_FILE)).read() == lines


def test_eval_results_are_stored_per_step_and_split(evaluated_run, tmp_path):
  model_dir = str(tmp_path / 'run')
  shutil.copytree(evaluated_run, model_dir)
  validation = open(os.path.join(model_dir, 'eval', '10', 'validation', 'metrics.json')).read()
  out, _ = finish(cli(['eval', f'--model_dir={model_dir}', '--split=test']))
  assert f'split test -> {model_dir}/eval/10/test' in out
  test = json.load(open(os.path.join(model_dir, 'eval', '10', 'test', 'metrics.json')))
  assert test['split'] == 'test' and test['metrics']['builtin_qa']
  assert len(open(os.path.join(model_dir, 'eval', '10', 'test', 'predictions',
                               'builtin_qa.jsonl')).readlines()) == 3
  assert open(os.path.join(model_dir, 'eval', '10', 'validation', 'metrics.json')).read() == \
      validation
  finish(cli(['eval', f'--model_dir={model_dir}']))   # the run's own split, evaluated again
  records = writers.read_metrics(model_dir)
  assert [r['step'] for r in records if 'eval_test/builtin_qa/f1' in r] == [10]
  assert [r['step'] for r in records if 'eval/builtin_qa/f1' in r] == [10]   # replaced
  # Other decoding settings: a set of its own, named by their digest (or --name).
  out, _ = finish(cli(['eval', f'--model_dir={model_dir}', '--split=test',
                       '--gin_file=gin_configs/decoding/beam4.gin']))
  beam = [d for d in os.listdir(os.path.join(model_dir, 'eval', '10')) if d.startswith('test-')]
  assert len(beam) == 1 and f'{model_dir}/eval/10/{beam[0]}' in out
  result = json.load(open(os.path.join(model_dir, 'eval', '10', beam[0], 'metrics.json')))
  assert result['decoding']['num_beams'] == 4 and result['name'] == beam[0]
  assert json.load(open(os.path.join(model_dir, 'eval', '10', 'test', 'metrics.json'))) == test
  finish(cli(['eval', f'--model_dir={model_dir}', '--name=mine']))
  assert sorted(os.listdir(os.path.join(model_dir, 'eval', '10'))) == sorted(
      ['validation', 'test', beam[0], 'mine'])


# --- 8. infer: output path checked first, non-finite scores as null ---------------------------

def test_infer_checks_its_output_path_before_loading_anything(tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('hello\n')
  missing = tmp_path / 'no_such_dir' / 'out.jsonl'
  # The model_dir does not exist either: the output path is checked first.
  args = ['infer', f'--model_dir={tmp_path / "no_model"}', f'--input_file={prompts}']
  assert fail(cli(args + [f'--output_file={missing}'])) == (
      f'error: --output_file={missing}: the directory {missing.parent} does not exist; '
      'create it first')
  assert fail(cli(args + [f'--output_file={tmp_path}'])) == (
      f'error: --output_file={tmp_path} is a directory; name a file in it')


def test_a_non_finite_score_is_written_as_null(tmp_path):
  """A model whose weights are NaN scores NaN: the output stays valid JSON (null)."""
  model_dir = str(tmp_path / 'nan')
  params = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype),
                        models.init_params(CONFIG, jax.random.key(0)))
  ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
  ckpt.save(0, {'params': params}, None,
            checkpoints.meta_for(CONFIG, 'byte', None, {'params_only': True}))
  ckpt.close()
  pairs = tmp_path / 'pairs.jsonl'
  pairs.write_text(json.dumps({'inputs': 'a', 'targets': 'b'}) + '\n')
  output = tmp_path / 'scores.jsonl'
  finish(cli(['infer', f'--model_dir={model_dir}', '--mode=score', f'--input_file={pairs}',
              f'--output_file={output}', '--batch_size=8']))
  assert json.loads(output.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
      'inputs': 'a', 'targets': 'b', 'score': None}
  assert infer._score(float('-inf')) is None and infer._score(np.float32(-1.5)) == -1.5
