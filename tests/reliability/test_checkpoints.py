"""Checkpoints that were damaged after they were written (issue #18 items 1, 2, 4; #28 item
2): checksums of the arrays, the data-state files and the meta catch changed bytes, training
moves a damaged newest checkpoint aside and resumes from the newest good one, eval/infer name
the damage, one written before the checksums restores with a warning, and a run failing
during an async save shows only its own error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_lite import models, partitioning
from t5x_lite.training import checkpoints, checksums, optimizers, state as state_lib
from tests.conftest import xla_flags
from tests.training.test_runs import NO_EVAL, REPO, TINY_RUN, cli, finish

RUN = TINY_RUN + NO_EVAL + ['--gin.TRAIN_STEPS=6',   # checkpoints at steps 3 and 6
                            '--gin.loop.TrainConfig.num_data_shards=2']   # 2 data-state files


def _array_files(step_dir):
  return [os.path.join(root, f) for root, _, files in os.walk(os.path.join(step_dir, 'state'))
          for f in files if os.path.basename(root) == 'd']


def flip_bytes(step_dir, n=64):
  """The issue's case: n bytes inverted in the largest array file, its size unchanged."""
  path = max(_array_files(step_dir), key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    data = f.read(n)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  assert os.path.getsize(path) == size


def truncate(step_dir):
  path = max(_array_files(step_dir), key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)


def shard_json(step_dir, shard=0):
  return os.path.join(step_dir, 'data', f'shard_{shard:05d}-of-00002.json')


def half_written_data_json(step_dir):
  text = open(shard_json(step_dir)).read()
  open(shard_json(step_dir), 'w').write(text[:len(text) // 2])


def changed_number_in_data_json(step_dir):
  """The first number of the iterator state + 1 (e.g. its draws): valid JSON, another stream."""
  text = open(shard_json(step_dir)).read()
  changed = re.sub(r'("iterator": [^0-9]*)(\d+)', lambda m: m[1] + str(int(m[2]) + 1), text,
                   count=1)
  assert changed != text and json.loads(changed)
  open(shard_json(step_dir), 'w').write(changed)


def edited_meta(step_dir):
  path = os.path.join(step_dir, 'meta', 'metadata')
  meta = json.load(open(path))
  meta['model_config']['dropout_rate'] = 0.0
  json.dump(meta, open(path, 'w'))


def written_before_checksums(step_dir):
  """The meta of a checkpoint written before #28: no data-file or meta checksums."""
  path = os.path.join(step_dir, 'meta', 'metadata')
  meta = json.load(open(path))
  del meta['data_files'], meta['meta_checksum']
  json.dump(meta, open(path, 'w'))


DAMAGE = {   # name: (damage, kind in checkpoints_broken/<step>-<kind>, words of the reason)
    'bit_flip': (flip_bytes, 'checksum', 'differ from the checksums recorded'),
    'truncated_array_file': (truncate, 'state-unreadable', 'arrays cannot be read'),
    'deleted_manifest': (lambda d: os.remove(os.path.join(d, 'state', 'manifest.ocdbt')),
                         'state-unreadable', 'state/manifest.ocdbt is missing'),
    'deleted_meta': (lambda d: os.remove(os.path.join(d, 'meta', 'metadata')), 'meta',
                     'meta/metadata is missing'),
    'half_written_data_json': (half_written_data_json, 'data', 'data-iterator state'),
    'deleted_state': (lambda d: shutil.rmtree(os.path.join(d, 'state')), 'state-missing',
                      'state/ directory is missing'),
    # #28: the data state verified like the arrays, and the meta itself
    'deleted_data_shard': (lambda d: os.remove(shard_json(d, 1)), 'data',
                           'data-iterator state data/shard_00001-of-00002.json is missing'),
    'data_shard_lost_keys': (lambda d: open(shard_json(d), 'w').write('{}'), 'data',
                             'shard_00000-of-00002.json differs from the checksums'),
    'changed_number_in_data_json': (changed_number_in_data_json, 'data',
                                    'shard_00000-of-00002.json differs from the checksums'),
    'edited_meta': (edited_meta, 'meta', 'meta/metadata was changed since it was saved'),
}


@pytest.fixture(scope='module')
def run6(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('run6'))
  finish(cli(['train', f'--model_dir={model_dir}'] + RUN))
  return model_dir


def damaged_copy(run_dir, tmp_path, name, step=6):
  model_dir = str(tmp_path / name)
  shutil.copytree(run_dir, model_dir)
  DAMAGE[name][0](os.path.join(model_dir, 'checkpoints', str(step)))
  return model_dir


def layout_of(preset='tiny', mesh_shape=None, rules='dp'):
  return state_lib.state_layout(models.build(models.preset('flan_t5', preset)),
                                optimizers.OptimizerConfig().build(),
                                partitioning.make_mesh(mesh_shape or {'data': -1}),
                                partitioning.rules_for(rules))


def assert_same_state(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.mark.parametrize('name', DAMAGE)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_newest_good_one_restored(
    run6, tmp_path, name, capsys, caplog):
  model_dir = damaged_copy(run6, tmp_path, name)
  _, kind, reason = DAMAGE[name]
  ckpt = checkpoints.Checkpointer(model_dir)
  layout = layout_of()
  step, meta = ckpt.newest_good(layout)
  assert (step, meta['step']) == (3, 3)
  assert 'checkpoints/6 is damaged: ' in caplog.text and reason in caplog.text
  moved = os.path.join(model_dir, 'checkpoints_broken', f'6-{kind}')
  assert os.path.isdir(moved) and os.listdir(moved)       # moved, not deleted
  assert ckpt.all_steps() == [3] and checkpoints.Checkpointer(model_dir).all_steps() == [3]
  assert 'resuming from step 3' in capsys.readouterr().out
  state, _ = ckpt.restore(layout, step)
  good, _ = checkpoints.Checkpointer(run6).restore(layout, 3)
  assert_same_state(state, good)


def test_a_bit_flip_that_restores_without_error_is_caught_by_the_checksums(run6, tmp_path):
  model_dir = damaged_copy(run6, tmp_path, 'bit_flip')
  with pytest.raises(checkpoints.CorruptCheckpoint,
                     match=r'\d+ of \d+ arrays differ from the checksums'):
    checkpoints.Checkpointer(model_dir).restore(layout_of(), 6)
  # the same files with the checksum check skipped: orbax reads them without a complaint
  ckpt = checkpoints.Checkpointer(model_dir)
  target = {f: getattr(layout_of().abstract(), f) for f in checkpoints._STATE_FIELDS}
  ckpt.manager.restore(6, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))


def test_no_good_checkpoint_is_an_error_that_lists_them_and_moves_nothing(run6, tmp_path):
  model_dir = damaged_copy(run6, tmp_path, 'deleted_state')
  DAMAGE['deleted_meta'][0](os.path.join(model_dir, 'checkpoints', '3'))
  with pytest.raises(checkpoints.CheckpointError,
                     match='no usable checkpoint .*step 6: the state/ .*step 3: meta/metadata'):
    checkpoints.Checkpointer(model_dir).newest_good(layout_of())
  assert checkpoints.Checkpointer(model_dir).all_steps() == [3, 6]
  assert not os.path.exists(os.path.join(model_dir, 'checkpoints_broken'))


def test_a_checkpoint_of_another_model_is_not_damage_and_stays(run6, tmp_path):
  model_dir = str(tmp_path / 'run')
  shutil.copytree(run6, model_dir)
  with pytest.raises(checkpoints.CheckpointError, match='other arrays than this run') as e:
    checkpoints.Checkpointer(model_dir).newest_good(layout_of('small'))
  assert not isinstance(e.value, checkpoints.CorruptCheckpoint)
  assert checkpoints.Checkpointer(model_dir).all_steps() == [3, 6]


def test_resume_after_damage_reaches_the_uninterrupted_runs_final_state(run6, tmp_path):
  model_dir = damaged_copy(run6, tmp_path, 'truncated_array_file')
  out, err = finish(cli(['train', f'--model_dir={model_dir}'] + RUN))
  assert 'resuming from step 3: the newer checkpoint(s) 6 (its arrays cannot be read' in out
  assert 'is damaged' in err   # the warning log names it too
  assert os.listdir(os.path.join(model_dir, 'checkpoints_broken')) == ['6-state-unreadable']
  layout = layout_of()
  resumed, _ = checkpoints.Checkpointer(model_dir).restore(layout, 6)
  uninterrupted, _ = checkpoints.Checkpointer(run6).restore(layout, 6)
  assert_same_state(resumed, uninterrupted)


@pytest.mark.parametrize('command,name,reason', [
    ('eval', 'deleted_manifest', 'state/manifest.ocdbt is missing'),
    ('infer', 'deleted_meta', 'meta/metadata is missing')])
def test_eval_and_infer_of_a_damaged_step_name_the_damage_in_one_line(
    run6, tmp_path, command, name, reason):
  model_dir = damaged_copy(run6, tmp_path, name)
  args = [command, f'--model_dir={model_dir}', '--checkpoint_step=6']
  if command == 'infer':
    (tmp_path / 'in.txt').write_text('hello\n')
    args += [f'--input_file={tmp_path / "in.txt"}', f'--output_file={tmp_path / "out.jsonl"}']
  proc = cli(args)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 2, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert lines == [f'error: checkpoint {model_dir}/checkpoints/6 is damaged: {reason}'], err
  assert 'Traceback' not in err
  assert checkpoints.Checkpointer(model_dir).all_steps() == [3, 6]   # only training moves


def test_the_meta_records_every_data_state_file_and_itself(run6):
  meta = checkpoints.Checkpointer(run6).meta(6)
  assert sorted(meta['data_files']) == ['shard_00000-of-00002.json', 'shard_00001-of-00002.json']
  for name, digest in meta['data_files'].items():
    assert checksums.digest(open(os.path.join(run6, 'checkpoints', '6', 'data', name),
                                 'rb').read()) == digest
  rest = {k: v for k, v in meta.items() if k != 'meta_checksum'}
  assert meta['meta_checksum'] == checksums.json_digest(rest)


@pytest.mark.parametrize('damage,kind,reason', [
    (None, None, None),
    (lambda d: open(shard_json(d), 'w').write('{}'), 'data',
     'data/shard_00000-of-00002.json lacks batches, iterator, stats'),
    (lambda d: os.remove(shard_json(d, 1)), 'data',
     'data/shard_00001-of-00002.json is missing')])
def test_a_checkpoint_written_before_the_checksums_restores_unverified_with_a_warning(
    run6, tmp_path, caplog, damage, kind, reason):
  """No checksums to compare: a warning naming the step; files that lost keys or shards are
  still damage (not a DataError blaming the mixture, not a stop without fallback)."""
  model_dir = str(tmp_path / 'old')
  shutil.copytree(run6, model_dir)
  written_before_checksums(os.path.join(model_dir, 'checkpoints', '6'))
  if damage:
    damage(os.path.join(model_dir, 'checkpoints', '6'))
  step, _ = checkpoints.Checkpointer(model_dir).newest_good(layout_of())
  if damage is None:
    assert step == 6
    assert (f'checkpoint {model_dir}/checkpoints/6 is unverified: it records no checksums of '
            'its meta, data-iterator state (written by an older version)') in caplog.text
  else:
    assert step == 3 and reason in caplog.text
    assert os.listdir(os.path.join(model_dir, 'checkpoints_broken')) == [f'6-{kind}']


@pytest.mark.parametrize('command', ['infer', 'export'])
def test_infer_and_export_of_a_checkpoint_without_checksums_warn_that_it_is_unverified(
    run6, tmp_path, command):
  """(eval restores through the same Checkpointer.restore_params.)"""
  model_dir = str(tmp_path / 'old')
  shutil.copytree(run6, model_dir)
  written_before_checksums(os.path.join(model_dir, 'checkpoints', '6'))
  args = [command, f'--model_dir={model_dir}']
  if command == 'export':
    args.append(f'--hf_dir={tmp_path / "hf"}')
  else:
    (tmp_path / 'in.txt').write_text('hello\n')
    args += [f'--input_file={tmp_path / "in.txt"}', f'--output_file={tmp_path / "out.jsonl"}']
  _, err = finish(cli(args))
  assert f'checkpoint {model_dir}/checkpoints/6 is unverified' in err


FAIL_AFTER_SAVE = """
import sys
from t5x_lite import cli
from t5x_lite.training import checkpoints
save = checkpoints.Checkpointer.save
def failing_save(self, step, *args, **kwargs):   # the save runs, then the loop fails
  save(self, step, *args, **kwargs)
  raise RuntimeError('the one real error')
checkpoints.Checkpointer.save = failing_save
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_run_failing_during_an_async_save_shows_only_its_own_error(tmp_path):
  model_dir = str(tmp_path / 'run')
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(8)}
  proc = subprocess.run([sys.executable, '-c', FAIL_AFTER_SAVE, 'train',
                         f'--model_dir={model_dir}'] + RUN, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  assert proc.stderr.count('Traceback') == 1, proc.stderr[-5000:]
  assert proc.stderr.rstrip().endswith('RuntimeError: the one real error')
  for noise in ('Event loop is closed', 'cannot schedule new futures'):
    assert noise not in proc.stderr
  assert checkpoints.Checkpointer(model_dir).all_steps() == [3]   # the save in flight completed


def test_checksums_do_not_depend_on_the_sharding_and_see_one_changed_bit():
  x = jax.random.normal(jax.random.key(0), (64, 48))
  tree = {'f32': x, 'bf16': x.astype(jnp.bfloat16), 'i32': jnp.arange(7, dtype=jnp.int32),
          'bool': x > 0, 'scalar': jnp.zeros((), jnp.int32)}
  recorded = checksums.record(tree)
  mesh = partitioning.make_mesh({'data': 4, 'fsdp': 2})
  sharded = jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data', 'fsdp')))
  assert checksums.record({'f32': sharded})['f32'] == recorded['f32']
  assert checksums.record({'f32': np.asarray(x)})['f32'] == recorded['f32']   # host arrays
  one_ulp = np.array(x)
  one_ulp[3, 4] = np.nextafter(one_ulp[3, 4], np.float32(10))
  swapped = np.array(x)
  swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
  for changed in (one_ulp, swapped):
    assert checksums.mismatches({**tree, 'f32': jnp.asarray(changed)}, recorded) == ['f32']
  assert checksums.mismatches(tree, recorded) == []
