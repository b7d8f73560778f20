"""Warm start and resume check the architecture (issue #18 item 12): a checkpoint of another
model is refused before anything is restored, naming the differing config fields and tensors;
a partial warm start is an explicit option; a resume with another mixture is recorded."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from t5x_lite import cli, hf, models, partitioning
from t5x_lite.rundir import writers
from t5x_lite.commands import convert
from t5x_lite.training import checkpoints, checksums, compatibility, loop, optimizers
from t5x_lite.training import state as state_lib
from tests.hf_models import save_hf_model

TINY = models.preset('flan_t5', 'tiny')   # 2 + 2 layers, d_model 64
OPTIMIZER = optimizers.OptimizerConfig().build()


def save_params_only(directory, config, seed=0):
  params = models.init_params(config, jax.random.key(seed))
  ckpt = checkpoints.Checkpointer(str(directory), async_save=False)
  ckpt.save(0, {'params': params}, None, checkpoints.meta_for(config, 'byte', None,
                                                              {'params_only': True}))
  ckpt.close()
  return jax.device_get(params)


def warm_start(directory, config, partial=False):
  model = models.build(config)
  layout = state_lib.state_layout(model, OPTIMIZER, partitioning.make_mesh({'data': -1}),
                                  partitioning.rules_for('dp'))
  source = checkpoints.Checkpointer(str(directory), async_save=False)
  return compatibility.warm_start(source, None, model, OPTIMIZER, layout, jax.random.key(1),
                                  partial=partial)


@pytest.fixture(scope='module')
def two_plus_two(tmp_path_factory):
  directory = tmp_path_factory.mktemp('init22')
  return directory, save_params_only(directory, TINY)


def test_one_plus_one_from_two_plus_two_is_refused_naming_fields_and_tensors(two_plus_two):
  small = TINY.replace(num_encoder_layers=1, num_decoder_layers=1)
  with pytest.raises(compatibility.MismatchError) as info:
    warm_start(two_plus_two[0], small)
  message = str(info.value)
  assert 'cannot warm-start from' in message and '/checkpoints/0' in message
  assert 'num_encoder_layers 2 in the checkpoint, 1 in this run' in message
  assert 'num_decoder_layers 2 in the checkpoint, 1 in this run' in message
  assert '23 tensor(s) (checkpoint -> run)' in message
  assert 'encoder/layers_1/* (9 tensors) present -> absent' in message   # dropped, named
  assert 'decoder/layers_1/* (14 tensors) present -> absent' in message
  assert 'INITIAL_CHECKPOINT_PARTIAL=True' in message and '\n' not in message


def test_two_to_three_decoder_layers_is_refused_before_jax(two_plus_two):
  deeper = TINY.replace(num_decoder_layers=3)
  with pytest.raises(compatibility.MismatchError,
                     match=r'num_decoder_layers 2 in the checkpoint, 3 in this run.*'
                           r'decoder/layers_2/\* \(14 tensors\) absent -> present'):
    warm_start(two_plus_two[0], deeper)


def test_a_d_model_change_names_tensors_and_shapes(two_plus_two):
  wider = TINY.replace(d_model=32)
  with pytest.raises(compatibility.MismatchError) as info:
    warm_start(two_plus_two[0], wider)
  message = str(info.value)
  assert 'd_model 64 in the checkpoint, 32 in this run' in message
  assert 'decoder/decoder_norm/scale [64] -> [32]' in message
  assert ' more' in message   # every tensor differs: the first ones are listed, the rest counted


def test_partial_warm_start_loads_what_matches_and_logs_the_rest(two_plus_two, caplog):
  directory, saved = two_plus_two
  deeper = TINY.replace(num_decoder_layers=3)
  with caplog.at_level(logging.WARNING):
    state = warm_start(directory, deeper, partial=True)
  params = jax.device_get(state.params)
  # every tensor of the checkpoint that this model has is loaded as it is
  np.testing.assert_array_equal(params['encoder']['layers_1']['mlp']['wi_0'],
                                saved['encoder']['layers_1']['mlp']['wi_0'])
  np.testing.assert_array_equal(params['decoder']['layers_1']['self_attention']['query'],
                                saved['decoder']['layers_1']['self_attention']['query'])
  new = params['decoder']['layers_2']['mlp']['wi_0']
  assert new.shape == (64, 128) and np.isfinite(new).all() and new.std() > 0  # a fresh init
  assert not np.array_equal(new, saved['decoder']['layers_1']['mlp']['wi_0'])
  log = caplog.text
  assert 'Partial warm start from' in log and 'freshly initialized' in log
  assert ('loaded 52 tensor(s), 14 freshly initialized (decoder/layers_2/* (14 tensors) absent '
          '-> present), 0 of the checkpoint unused (none); model config: num_decoder_layers 2 '
          'in the checkpoint, 3 in this run') in log
  # a 1+1 model from the same checkpoint: the checkpoint's second layers are listed unused
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    warm_start(directory, TINY.replace(num_encoder_layers=1, num_decoder_layers=1), partial=True)
  assert '23 of the checkpoint unused (decoder/layers_1/* (14 tensors), encoder/layers_1/* (9 ' \
         'tensors))' in caplog.text


def test_the_same_model_warm_starts_exactly(two_plus_two):
  directory, saved = two_plus_two
  params = jax.device_get(warm_start(directory, TINY.replace(dropout_rate=0.1)).params)
  jax.tree.map(np.testing.assert_array_equal, params, saved)


def test_warm_start_from_another_model_fails_in_train_before_any_step(two_plus_two, tmp_path):
  config = loop.TrainConfig(
      model_dir=str(tmp_path), feature_lengths={'inputs': 32, 'targets': 8}, batch_size=8,
      train_steps=1, eval_at_end=False, progress_bar=False, async_checkpointing=False,
      init_from=str(two_plus_two[0]))
  with pytest.raises(compatibility.MismatchError, match='num_decoder_layers 2 in the checkpoint'):
    loop.train(config, TINY.replace(num_decoder_layers=3))
  assert not (tmp_path / 'metrics.jsonl').exists() or not writers.read_metrics(str(tmp_path))


def test_a_converted_checkpoint_in_the_run_directory_is_checked_too(two_plus_two, tmp_path):
  import shutil
  shutil.copytree(two_plus_two[0], tmp_path / 'run')
  with pytest.raises(compatibility.MismatchError,
                     match=r'cannot warm-start from .*num_decoder_layers 2 in the checkpoint, 3 '
                           r'.*convert into another directory'):
    loop.train(_run_config(str(tmp_path / 'run'), 'builtin'), TINY.replace(num_decoder_layers=3))


@pytest.fixture(scope='module')
def one_step_run(tmp_path_factory):
  """A tiny run of one step (checkpoint 1) on the builtin mixture."""
  model_dir = str(tmp_path_factory.mktemp('run'))
  loop.train(_run_config(model_dir, 'builtin'), TINY)
  return model_dir


def _run_config(model_dir, mixture, **kw):
  kw = {'train_steps': 1, **kw}
  return loop.TrainConfig(
      model_dir=model_dir, mixture=mixture, feature_lengths={'inputs': 32, 'targets': 8},
      batch_size=8, log_period=1, eval_at_end=False, progress_bar=False,
      async_checkpointing=False, **kw)


def test_resume_with_another_mixture_warns_and_records_it(one_step_run, tmp_path, caplog):
  import shutil
  model_dir = str(tmp_path / 'run')
  shutil.copytree(one_step_run, model_dir)
  with caplog.at_level(logging.WARNING):
    loop.train(_run_config(model_dir, 'builtin_heldout'), TINY)   # restores step 1, no steps
  assert "Resuming step 1 with mixture 'builtin_heldout'; the checkpoint was trained on " \
         "'builtin'" in caplog.text
  events = [r for r in writers.read_metrics(model_dir) if r.get('event')]
  assert events == [{'step': 1, 'event': 'mixture_changed', 'checkpoint_mixture': 'builtin',
                     'mixture': 'builtin_heldout'}]
  loop.train(_run_config(model_dir, 'builtin'), TINY)   # the same mixture: nothing recorded
  assert len([r for r in writers.read_metrics(model_dir) if r.get('event')]) == 1


def test_resume_with_another_model_names_the_difference(one_step_run):
  with pytest.raises(compatibility.MismatchError,
                     match=r'cannot resume from .*/checkpoints/1: .*d_ff 128 in the checkpoint, '
                           r'256 in this run.*mlp/wi_0 \[64, 128\] -> \[64, 256\].*'
                           r'A run resumes with the model it was started with'):
    loop.train(_run_config(one_step_run, 'builtin', train_steps=2), TINY.replace(d_ff=256))


def test_convert_config_missing_num_heads_names_the_key(tmp_path, capsys):
  save_hf_model('flan_t5', tmp_path / 'hf')
  capsys.readouterr()   # transformers' progress bar
  config_file = tmp_path / 'hf' / 'config.json'
  config = json.loads(config_file.read_text())
  del config['num_heads']
  config_file.write_text(json.dumps(config))
  rc = cli.main(['convert', f'--hf_dir={tmp_path / "hf"}', f'--model_dir={tmp_path / "out"}'])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith('error: config.json lacks num_heads'), err
  config['d_kv'] = '64'
  config['num_heads'] = 4
  config_file.write_text(json.dumps(config))
  with pytest.raises(hf.ConversionError, match=r"d_kv='64'; it must be a positive integer"):
    hf.load(str(tmp_path / 'hf'))


def test_load_params_checks_the_recorded_config_against_the_tensors(two_plus_two, tmp_path):
  import shutil
  shutil.copytree(two_plus_two[0], tmp_path / 'm')
  meta_file = tmp_path / 'm' / 'checkpoints' / '0' / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  meta['model_config']['num_decoder_layers'] = 1   # a meta that lies about the tensors
  del meta['meta_checksum']   # as written so (an edit after the save is damage: its checksum)
  meta['meta_checksum'] = checksums.json_digest(meta)
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(compatibility.MismatchError,
                     match=r'cannot load .*decoder/layers_1/\* \(14 tensors\) present -> '
                           r'absent'):
    convert.load_params(str(tmp_path / 'm'))
