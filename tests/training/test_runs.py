"""Whole runs through the CLI: outputs, exact resume after SIGKILL, two processes == one,
convert -> warm start -> export, restore onto another mesh."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from t5x_lite import hf, models, partitioning
from t5x_lite.rundir import writers
from t5x_lite.commands import convert
from t5x_lite.training import checkpoints, data_state, optimizers
from t5x_lite.training import state as state_lib
from tests.hf_models import save_hf_model
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_RUN = [
    '--gin_file=gin_configs/models/flan_t5/tiny.gin', '--gin_file=gin_configs/runs/finetune.gin',
    '--gin_file=gin_configs/mixtures/builtin.gin',
    # A curriculum: stage two from step 3 (a checkpoint), λ ramp over steps 3..8 (covers 6).
    '--gin_file=gin_configs/mixtures/builtin_curriculum.gin', '--gin.CURRICULUM_STEPS=3',
    '--gin.CURRICULUM_RAMP_END=8',
    '--gin.TASK_FEATURE_LENGTHS={"inputs": 64, "targets": 16}', '--gin.BATCH_SIZE=8',
    '--gin.TRAIN_STEPS=10', '--gin.LOG_PERIOD=1', '--gin.CHECKPOINT_PERIOD=3',
    '--gin.EVAL_PERIOD=0', '--gin.DROPOUT_RATE=0.1', '--gin.loop.TrainConfig.progress_bar=False',
]
NO_EVAL = ['--gin.loop.TrainConfig.eval_at_end=False']


def cli(args, devices=8, extra_env=None, **kwargs):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(devices), **(extra_env or {})}
  return subprocess.Popen([sys.executable, '-m', 't5x_lite.cli'] + args, cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out, err


def losses(model_dir):
  return {r['step']: r['train/loss'] for r in writers.read_metrics(model_dir)
          if 'train/loss' in r}


def test_run_writes_metrics_config_tensorboard_checkpoints_and_eval(full_run):
  model_dir, out = full_run
  records = writers.read_metrics(model_dir)
  train = [r for r in records if 'train/loss' in r]
  assert [r['step'] for r in train] == list(range(1, 11))
  for key in ('train/loss', 'train/builtin_qa/loss', 'train/builtin_qa/accuracy',
              'train/tokens_per_second', 'train/learning_rate', 'train/grad_norm',
              'data/examples'):
    assert key in train[-1], key
  assert train[-1]['train/learning_rate'] == pytest.approx(1e-3)
  # The curriculum (builtin_curriculum.gin): rate and λ in force at each log step.
  qa = [(r['train/builtin_qa/rate'], r['train/builtin_qa/loss_weight']) for r in train]
  assert qa[:3] == [(0.0, 0.5)] * 3 and qa[3] == (pytest.approx(0.1), 0.5)   # step 4: batch 3
  assert qa[4][1] == pytest.approx(0.6) and qa[5][1] == pytest.approx(0.7)   # batches 4, 5
  assert qa[9] == (pytest.approx(0.1), 1.0)
  assert all(r['train/builtin_sentiment/loss_weight'] == 1.0 for r in train)
  assert train[0]['train/builtin_sentiment/rate'] == 0.25
  assert sum(r['train/builtin_qa/tokens'] for r in train[:3]) == 0   # stage one: none
  # The priority: arithmetic holds >= 10% of each batch's λ-weighted tokens, exactly 10%
  # where its λ was raised (one log step = one batch: logged λ and tokens are the batch's).
  names = [k.split('/')[1] for k in train[0] if k.endswith('/loss_weight')]
  for r in train:
    mass = {n: r[f'train/{n}/loss_weight'] * r[f'train/{n}/tokens'] for n in names}
    share = mass['builtin_arithmetic'] / sum(mass.values())
    if r['train/builtin_arithmetic/loss_weight'] > 1:
      assert share == pytest.approx(0.1, rel=1e-4)
    elif mass['builtin_arithmetic']:
      assert share >= 0.1 - 1e-6
  assert any(r['train/builtin_arithmetic/loss_weight'] > 1 for r in train)
  evals = [r for r in records if 'eval/builtin_qa/f1' in r]
  assert len(evals) == 1 and evals[0]['step'] == 10
  assert 'TASK_FEATURE_LENGTHS' in open(os.path.join(model_dir, 'config.gin')).read() or \
      "'inputs': 64" in open(os.path.join(model_dir, 'config.gin')).read()
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(model_dir))
  [prov] = glob.glob(os.path.join(model_dir, 'provenance', '*.json'))   # code, diff, versions
  prov = json.load(open(prov))
  assert prov['source']['root'] == REPO and prov['command'][1] == 'train'
  assert checkpoints.Checkpointer(model_dir).all_steps() == [6, 9, 10]   # max_to_keep 3
  eval_dir = os.path.join(model_dir, 'eval', '10', 'validation')   # per step and split
  assert json.load(open(os.path.join(eval_dir, 'metrics.json')))['metrics']['builtin_qa']
  lines = open(os.path.join(eval_dir, 'predictions', 'builtin_sort.jsonl')).read().splitlines()
  assert len(lines) == 3 and set(json.loads(lines[0])) >= {'inputs', 'targets', 'prediction'}
  assert 'builtin_sort' in out and 'baseline' in out   # the per-task table


def test_sigkill_then_restart_gives_the_same_losses(full_run, tmp_path):
  expected = losses(full_run[0])
  model_dir = str(tmp_path)
  proc = cli(['train', f'--model_dir={model_dir}'] + TINY_RUN + NO_EVAL)
  ckpt_dir = os.path.join(model_dir, 'checkpoints')
  deadline = time.time() + 300
  # Kill once a checkpoint is complete (orbax finalises asynchronously), mid-run.
  while time.time() < deadline and not (
      os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = max(losses(model_dir))
  assert done < 10, 'the run finished before it could be killed'
  _, err = finish(cli(['train', f'--model_dir={model_dir}'] + TINY_RUN + NO_EVAL))
  # From 3: at the curriculum's stage boundary; from 6: mid-stage, inside the λ ramp.
  assert 'Resuming from step 3' in err or 'Resuming from step 6' in err
  assert losses(model_dir) == expected   # exact: same data, dropout and updates


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_process_runs(tmp_path_factory):
  """(one, two): 5 steps (checkpoints 3 and 5) of one process reading 2 data shards, and of
  two processes of 4 devices (2 shards: one per process, the default). Read them; copy to
  change them."""
  tmp = tmp_path_factory.mktemp('two_processes')
  run = TINY_RUN + NO_EVAL + ['--gin.TRAIN_STEPS=5']
  one, two = str(tmp / 'one'), str(tmp / 'two')
  reference = cli(['train', f'--model_dir={one}'] + run +
                  ['--gin.loop.TrainConfig.num_data_shards=2'])
  finish(reference)
  port = _free_port()
  procs = [cli(['train', f'--model_dir={two}', f'--coordinator_address=127.0.0.1:{port}',
                '--num_processes=2', f'--process_id={i}'] + run, devices=4) for i in (0, 1)]
  for p in procs:
    finish(p)
  return one, two


def test_two_processes_of_four_devices_match_one_of_eight(two_process_runs):
  one, two = two_process_runs
  assert losses(two) == pytest.approx(losses(one), rel=1e-5)
  assert sorted(losses(two)) == [1, 2, 3, 4, 5]


def test_checkpoint_of_two_processes_resumes_in_one(two_process_runs, tmp_path):
  """The data state is stored per shard and meta records num_data_shards: 2 processes train
  to a checkpoint at step 3 (their later checkpoint removed), 1 process resumes (defaulting
  to the checkpoint's 2 shards) and its losses are those of an uninterrupted 1-process run."""
  import shutil  # pylint: disable=import-outside-toplevel
  ref, model_dir = two_process_runs[0], str(tmp_path / 'run')
  shutil.copytree(two_process_runs[1], model_dir)
  shutil.rmtree(os.path.join(model_dir, 'checkpoints', '5'))
  data_files = os.listdir(os.path.join(model_dir, 'checkpoints', '3', 'data'))
  assert sorted(f for f in data_files if f.startswith('shard_')) == [
      'shard_00000-of-00002.json', 'shard_00001-of-00002.json']   # written by both processes
  meta = checkpoints.Checkpointer(model_dir).meta(3)
  assert meta['num_data_shards'] == 2
  # process 0 wrote the meta: it records the checksums of both processes' files
  assert sorted(meta['data_files']) == sorted(f for f in data_files if f.startswith('shard_'))
  _, err = finish(cli(['train', f'--model_dir={model_dir}'] + TINY_RUN + NO_EVAL +
                      ['--gin.TRAIN_STEPS=5']))
  assert 'Resuming from step 3' in err
  assert sorted(losses(model_dir)) == list(range(1, 6))
  assert losses(model_dir) == pytest.approx(losses(ref), rel=1e-5)


def test_resume_data_shards_keeps_the_checkpoints_count_or_names_the_fix():
  assert checkpoints.resume_data_shards(None, {}, 2) is None       # fresh run: process count
  assert checkpoints.resume_data_shards(3, {'params_only': True}, 1) == 3
  meta = {'num_data_shards': 2, 'step': 3}
  assert checkpoints.resume_data_shards(None, meta, 1) == 2
  assert checkpoints.resume_data_shards(2, meta, 2) == 2
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'num_data_shards=4 was asked, but the checkpoint at step 3 was '
                           r'written with num_data_shards=2.*Leave num_data_shards unset'):
    checkpoints.resume_data_shards(4, meta, 1)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'holds 2 data shards, which 4 processes cannot split evenly: resume '
                           r'with a process count that divides 2 \(\[1, 2\]\)'):
    checkpoints.resume_data_shards(None, meta, 4)


def test_data_state_written_per_process_by_grains_handler_still_restores(tmp_path):
  """Checkpoints from before the per-shard layout (grain's handler: one file per process)
  restore too, here into one process."""
  from etils import epath
  from t5x_lite.data import pipeline
  from tests.data.test_pipeline import VOCAB, config, make_mixture
  cfg = config(num_data_shards=2, seed=3)
  hosts = [pipeline.train_iterator(make_mixture(), VOCAB, cfg, p, 2) for p in (0, 1)]
  for h in hosts:
    next(h), next(h)
  for p, h in enumerate(hosts):   # the old DataIterator.get_state() of each process
    shards = h.get_state()['shards']
    (tmp_path / f'process_{p}-of-2.json').write_text(json.dumps(
        {'shards': h.shard_ids, 'iterators': [shards[str(s)]['iterator'] for s in h.shard_ids],
         'stats': h.stats, 'batches': 2}))
  stats = {k: hosts[0].stats[k] + hosts[1].stats[k] for k in hosts[0].stats}
  expected = [np.concatenate([a['decoder_target_tokens'], b['decoder_target_tokens']])
              for a, b in zip(*([next(h) for _ in range(3)] for h in hosts))]
  one = pipeline.train_iterator(make_mixture(), VOCAB, cfg, 0, 1)
  data_state.DataStateHandler().restore(epath.Path(tmp_path), args=data_state.DataRestore(one))
  assert one.stats == stats and one.batches == 2
  for want in expected:
    np.testing.assert_array_equal(next(one)['decoder_target_tokens'], want)
  for it in hosts + [one]:
    it.close()


def test_convert_warm_start_and_export(tmp_path):
  save_hf_model('flan_t5', tmp_path / 'hf')
  finish(cli(['convert', f'--hf_dir={tmp_path / "hf"}', f'--model_dir={tmp_path / "converted"}']))
  gin_text = open(tmp_path / 'converted' / 'model.gin').read()
  assert 'd_model = 48' in gin_text and 'MODEL_CONFIG' in gin_text
  # export of the converted checkpoint is bit-identical to the original files
  finish(cli(['export', f'--model_dir={tmp_path / "converted"}', f'--hf_dir={tmp_path / "back"}']))
  original = load_file(str(tmp_path / 'hf' / hf.SAFETENSORS))
  back = load_file(str(tmp_path / 'back' / hf.SAFETENSORS))
  assert sorted(back) == sorted(original)
  assert all(np.array_equal(back[k], original[k]) for k in original)
  # Fine-tuning it with a vocabulary larger than its embedding fails early and clearly.
  proc = cli(['train', f'--model_dir={tmp_path / "ft"}',
              f'--gin_file={tmp_path / "converted" / "model.gin"}',
              '--gin_file=gin_configs/runs/finetune.gin', '--gin.MIXTURE_OR_TASK_NAME=builtin',
              f'--gin.INITIAL_CHECKPOINT_PATH={tmp_path / "converted"}', '--gin.VOCABULARY=byte'])
  _, err = proc.communicate(timeout=300)
  assert proc.returncode != 0 and 'has 384 ids but the model embeds only 160' in err


def _stored_dtypes(model_dir):
  ckpt = checkpoints.Checkpointer(str(model_dir), async_save=False)
  dtypes = convert.stored_dtypes(ckpt.directory, ckpt.latest_step())
  ckpt.close()
  return dtypes


def test_convert_of_a_bf16_model_trains_fp32_master_weights(tmp_path):
  """T5X's finetune.gin restores with dtype='float32': a bf16 source trains fp32 weights;
  export writes what the checkpoint stores unless --dtype says otherwise."""
  import torch  # pylint: disable=import-outside-toplevel
  save_hf_model('byt5', tmp_path / 'hf', dtype=torch.bfloat16)
  original = load_file(str(tmp_path / 'hf' / hf.SAFETENSORS))
  finish(cli(['convert', f'--hf_dir={tmp_path / "hf"}', f'--model_dir={tmp_path / "conv"}']))
  assert "param_dtype = 'float32'" in open(tmp_path / 'conv' / 'model.gin').read()
  assert _stored_dtypes(tmp_path / 'conv') == {'bfloat16'}  # the source's tensors, as they are
  # export: by default as stored (bit-identical to the source), or as asked
  finish(cli(['export', f'--model_dir={tmp_path / "conv"}', f'--hf_dir={tmp_path / "bf16"}']))
  finish(cli(['export', f'--model_dir={tmp_path / "conv"}', f'--hf_dir={tmp_path / "fp32"}',
              '--dtype=float32']))
  back, wide = (load_file(str(tmp_path / d / hf.SAFETENSORS)) for d in ('bf16', 'fp32'))
  for name, tensor in original.items():
    assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name
    assert wide[name].dtype == np.float32 and np.array_equal(wide[name], tensor.astype(np.float32))
  assert json.load(open(tmp_path / 'fp32' / 'config.json'))['dtype'] == 'float32'
  # a warm-started run trains (and checkpoints) fp32 parameters
  finish(cli(['train', f'--model_dir={tmp_path / "ft"}',
              f'--gin_file={tmp_path / "conv" / "model.gin"}',
              '--gin_file=gin_configs/runs/finetune.gin', '--gin.MIXTURE_OR_TASK_NAME=builtin',
              f'--gin.INITIAL_CHECKPOINT_PATH={tmp_path / "conv"}',
              '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 8}', '--gin.BATCH_SIZE=8',
              '--gin.TRAIN_STEPS=1', '--gin.loop.TrainConfig.progress_bar=False'] + NO_EVAL))
  assert _stored_dtypes(tmp_path / 'ft') == {'float32'}
  finish(cli(['export', f'--model_dir={tmp_path / "ft"}', f'--hf_dir={tmp_path / "ft_hf"}']))
  assert {t.dtype for t in load_file(str(tmp_path / 'ft_hf' / hf.SAFETENSORS)).values()} == {
      np.dtype(np.float32)}


def test_warm_start_restores_the_given_parameters(tmp_path):
  config = models.preset('byt5', 'tiny')
  params = models.init_params(config, jax.random.key(7))
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'init'), async_save=False)
  ckpt.save(0, {'params': params}, None, checkpoints.meta_for(config, 'byte', None,
                                                              {'params_only': True}))
  ckpt.close()
  mesh = partitioning.make_mesh({'fsdp': -1})
  optimizer = optimizers.OptimizerConfig().build()
  layout = state_lib.state_layout(models.build(config), optimizer, mesh,
                                  partitioning.rules_for('fsdp'))
  restored = checkpoints.Checkpointer(str(tmp_path / 'init')).restore_params(
      layout.abstract().params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(params))
  leaf = restored['encoder']['layers_0']['mlp']['wi_0']
  assert leaf.sharding.spec == layout.specs.params['encoder']['layers_0']['mlp']['wi_0']


def test_restore_onto_a_different_mesh(full_run):
  model_dir = full_run[0]
  config = models.preset('flan_t5', 'tiny')
  optimizer = optimizers.OptimizerConfig().build()
  states = []
  for shape, rules in (({'data': -1}, 'dp'), ({'fsdp': 2, 'tensor': 4}, 'fsdp_tp')):
    mesh = partitioning.make_mesh(shape)
    layout = state_lib.state_layout(models.build(config), optimizer, mesh,
                                    partitioning.rules_for(rules))
    state, meta = checkpoints.Checkpointer(model_dir).restore(layout)
    assert int(state.step) == 10 and meta['vocabulary'] == 'byte'
    states.append(jax.device_get(state))
  jax.tree.map(np.testing.assert_array_equal, states[0].params, states[1].params)


def test_half_written_checkpoints_are_never_picked(full_run, tmp_path):
  import shutil
  model_dir = str(tmp_path / 'run')
  shutil.copytree(full_run[0], model_dir)
  ckpt_dir = os.path.join(model_dir, 'checkpoints')
  # what a kill during an orbax save leaves behind: a temporary directory
  os.makedirs(os.path.join(ckpt_dir, '12.orbax-checkpoint-tmp-1234567'))
  assert checkpoints.Checkpointer(model_dir).latest_step() == 10
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint for step 12'):
    checkpoints.Checkpointer(model_dir).meta(12)
  with pytest.raises(checkpoints.CheckpointError, match='no complete checkpoint'):
    checkpoints.Checkpointer(str(tmp_path / 'empty')).meta()
