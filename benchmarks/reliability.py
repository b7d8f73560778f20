"""Reliability: issue #18's catalog of bad inputs and damaged checkpoints, plus `kill -9` at
random moments of a tiny multi-task run, each through the real command line.

- Bad inputs: each must end in one `error: ...` line with exit code 2 ("clear"); exit code 0
  is "silent", a traceback or another code is "unclear". Cases that must succeed (a
  half-written metrics line, a changed mixture) are "handled" when the run finishes and its
  check holds, "silent" otherwise.
- Damaged checkpoints: the newest checkpoint of a run stopped at step 9 is damaged (bit flips,
  truncated array file, deleted manifest / metadata / state, half-written iterator JSON, a
  deleted data shard, a shard file emptied to `{}`, a changed number in a shard file's valid
  JSON, an edited meta); the rerun must move it aside, resume from step 6 and end
  bit-identical to an uninterrupted run. (Runs read 2 data shards: 2 data-state files.)
- Kills: a run is `kill -9`ed at a random moment, mid-checkpoint-save or mid-eval, restarted
  with the same command, and must end with the uninterrupted run's state (bit for bit), its
  metrics.jsonl (one line per step, equal losses) and its eval results.

Prints one JSON line (targets: silent 0, unclear 0, every resume identical, every fallback
good) with every case's outcome.

  python benchmarks/reliability.py [--kills 10] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
RUN = ['--gin_file=gin_configs/models/flan_t5/tiny.gin', '--gin_file=gin_configs/runs/finetune.gin',
       '--gin.MIXTURE_OR_TASK_NAME="builtin_heldout"',
       '--gin.TASK_FEATURE_LENGTHS={"inputs": 64, "targets": 16}', '--gin.BATCH_SIZE=8',
       '--gin.TRAIN_STEPS=12', '--gin.LOG_PERIOD=1', '--gin.CHECKPOINT_PERIOD=3',
       '--gin.EVAL_PERIOD=0', '--gin.loop.TrainConfig.progress_bar=False',
       '--gin.loop.TrainConfig.eval_max_examples=2', '--gin.loop.TrainConfig.num_data_shards=2']
STEPS = 12


def env(devices: int = 1) -> dict:
  return {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def cli(args, devices=1, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 't5x_lite.cli'] + list(args), cwd=REPO,
                        env=env(devices), capture_output=True, text=True, timeout=timeout)


def train(model_dir, *extra, **kwargs):
  return cli(['train', f'--model_dir={model_dir}'] + RUN + list(extra), **kwargs)


# ---------------------------------------------------------------- what a run left behind

def state_of(model_dir, step=None):
  """(step, flat {path: array}) of a run's newest (or given) checkpoint, read with orbax."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(model_dir, 'checkpoints')
  step = step or max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  tree = ocp.PyTreeCheckpointer().restore(directory / str(step) / 'state')
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  data = {p.name: p.read_text() for p in sorted((directory / str(step) / 'data').glob('*.json'))}
  return step, flat, data


def same_state(a, b) -> bool:
  import numpy as np  # pylint: disable=import-outside-toplevel
  (sa, fa, da), (sb, fb, db) = a, b
  return (sa == sb and fa.keys() == fb.keys() and da == db and
          all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa))


def all_finite(model_dir) -> bool:
  import numpy as np  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(model_dir, 'checkpoints')
  steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
  return all(np.isfinite(np.asarray(v, np.float64)).all()
             for s in steps for v in state_of(model_dir, s)[1].values()
             if np.asarray(v).dtype.kind == 'f')


def metrics_lines(model_dir) -> list[dict]:
  path = pathlib.Path(model_dir, 'metrics.jsonl')
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(model_dir) -> list[tuple[int, float]]:
  return [(r['step'], r['train/loss']) for r in metrics_lines(model_dir) if 'train/loss' in r]


def eval_results(model_dir, step=None) -> dict:
  """{relative path: parsed JSON} of every eval metrics file of a run (of `step`'s only)."""
  root = pathlib.Path(model_dir, 'eval', *([str(step)] if step else []))
  return {str(p.relative_to(root)): json.loads(p.read_text())
          for p in sorted(root.rglob('metrics.json'))} if root.exists() else {}


def outcome_of_run(reference, model_dir) -> dict:
  """How a finished run compares with the uninterrupted reference."""
  return {'state': same_state(state_of(reference), state_of(model_dir)),
          'losses': train_losses(reference) == train_losses(model_dir),
          'eval': eval_results(reference, STEPS) == eval_results(model_dir, STEPS) != {}}


# ---------------------------------------------------------------- bad inputs

def classify(proc, expect: str, check=None) -> str:
  """'clear': the one-line error asked for; 'handled': the run that had to succeed did; a
  failed `check` (results overwritten, non-finite weights saved, ...) or exit code 0 where
  an error was due is 'silent'; a traceback or another exit code is 'unclear'."""
  err = proc.stderr.strip().splitlines()
  if check is not None and not check():
    return 'silent'
  if expect == 'error':
    if proc.returncode == 2 and err and err[-1].startswith('error:') and not any(
        line.startswith('Traceback') for line in err):
      return 'clear'
    return 'silent' if proc.returncode == 0 else 'unclear'
  return 'handled' if proc.returncode == 0 else 'unclear'


def bad_input_cases(work: pathlib.Path, reference: str, stopped_at_9: str):
  """(name, thunk -> (proc, expect, check)) for every case of the catalog."""
  def fresh(name):
    return str(work / 'inputs' / name)

  def copy(src, name):
    dst = work / 'inputs' / name
    shutil.copytree(src, dst)
    return str(dst)

  def train_error(name, *extra, devices=1):
    return lambda: (train(fresh(name), *extra, devices=devices), 'error', None)

  cases = [
      ('lr_zero', train_error('lr0', '--gin.LEARNING_RATE=0')),
      ('lr_negative', train_error('lrneg', '--gin.LEARNING_RATE=-1e-3')),
      ('lr_nan_string', train_error('lrnan', '--gin.LEARNING_RATE=nan')),
      ('train_steps_zero', train_error('ts0', '--gin.TRAIN_STEPS=0')),
      ('checkpoint_period_zero', train_error('cp0', '--gin.CHECKPOINT_PERIOD=0')),
      ('log_period_negative', train_error('lpneg', '--gin.LOG_PERIOD=-1')),
      ('misspelled_macro', train_error('typo', '--gin.TRAIN_STEP=3')),
      ('letter_o_for_zero', train_error('1o', '--gin.TRAIN_STEPS=1O')),
      ('model_dir_twice', train_error('md', f'--gin.MODEL_DIR={fresh("other")}')),
      ('unknown_mixture', train_error('mix', '--gin.MIXTURE_OR_TASK_NAME="no_such_mixture"')),
      ('missing_gin_file', train_error('gin', '--gin_file=gin_configs/no_such.gin')),
      ('unknown_configurable_param', train_error('param', '--gin.loop.TrainConfig.no_such=1')),
      ('mesh_not_dividing', train_error('mesh', '--gin.MESH_SHAPE={"data": 3}', devices=2)),
      ('batch_not_divisible', train_error('batch', '--gin.BATCH_SIZE=7', devices=2)),
      ('warm_start_fewer_layers', train_error(
          'fewer', f'--gin.INITIAL_CHECKPOINT_PATH="{reference}"',
          '--gin.t5.T5Config.num_encoder_layers=1', '--gin.t5.T5Config.num_decoder_layers=1')),
      ('warm_start_d_model', train_error(
          'dmodel', f'--gin.INITIAL_CHECKPOINT_PATH="{reference}"', '--gin.t5.T5Config.d_model=32')),
      ('resume_more_decoder_layers', lambda: (train(
          copy(stopped_at_9, 'deeper'), '--gin.t5.T5Config.num_decoder_layers=3'), 'error', None)),
  ]

  def lr_huge():
    model_dir = fresh('lr1e30')
    proc = train(model_dir, '--gin.LEARNING_RATE=1e30', '--gin.CHECKPOINT_PERIOD=1')
    noisy = 'Event loop is closed' in proc.stderr or 'cannot schedule new futures' in proc.stderr
    return proc, 'error', lambda: all_finite(model_dir) and not noisy
  cases.append(('lr_1e30_no_nonfinite_checkpoint', lr_huge))

  def eval_case(name, *flags, damage=None):
    def thunk():
      model_dir = copy(reference, name)
      if damage:
        damage(model_dir)
      before = eval_results(model_dir)
      proc = cli(['eval', f'--model_dir={model_dir}'] + list(flags))
      marker = pathlib.Path(model_dir, 'pwned')
      return proc, 'error', lambda: eval_results(model_dir) == before and not marker.exists()
    return thunk

  def tamper(model_dir):
    marker = pathlib.Path(model_dir, 'pwned')
    path = pathlib.Path(model_dir, 'config.gin')
    path.write_text('from __gin__ import dynamic_registration\nimport os\n' +
                    path.read_text() + f'\nMARKER = @os.system()\nos.system.command = '
                    f'"touch {marker}"\nloop.TrainConfig.seed = %MARKER\n')

  # (eval and infer read only the parameters: damage must hit them or orbax's index; the
  # bit flips of DAMAGE may land in optimizer state, which a correct eval never reads)
  def no_manifest(model_dir):
    DAMAGE['deleted_manifest'](newest_checkpoint(model_dir))

  cases += [
      ('eval_unknown_split', eval_case('split', '--split=valdation')),
      ('eval_missing_step', eval_case('step', '--checkpoint_step=99')),
      ('eval_tampered_config', eval_case('tamper', damage=tamper)),
      ('eval_checkpoint_without_manifest', eval_case('nomanifest', damage=no_manifest)),
  ]

  prompts = work / 'prompts.txt'
  prompts.write_text('Sort the words: b a\nSolve 2 + 2.\n')

  def infer_error(*flags, output=None):
    output = output or str(work / 'inputs' / 'predictions.jsonl')
    return lambda: (cli(['infer', f'--model_dir={reference}', f'--input_file={prompts}',
                         f'--output_file={output}'] + list(flags)), 'error', None)
  cases += [
      ('infer_batch_size_zero', infer_error('--batch_size=0')),
      ('infer_max_decode_length_zero', infer_error('--max_decode_length=0')),
      ('infer_max_input_length_negative', infer_error('--max_input_length=-1')),
      ('infer_output_dir_missing', infer_error(output=str(work / 'no_such_dir' / 'out.jsonl'))),
      ('infer_output_is_directory', infer_error(output=str(work))),
      ('infer_checkpoint_without_metadata', lambda: (cli([
          'infer', f'--model_dir={_damaged(copy(reference, "nometa"), "deleted_meta_metadata")}',
          f'--input_file={prompts}', f'--output_file={work / "inputs" / "p.jsonl"}']),
          'error', None)),
  ]

  def convert_missing_num_heads():
    hf_dir = work / 'inputs' / 'hf'
    proc = cli(['export', f'--model_dir={reference}', f'--hf_dir={hf_dir}'])
    if proc.returncode:
      return proc, 'error', None
    config = json.loads((hf_dir / 'config.json').read_text())
    config.pop('num_heads')
    (hf_dir / 'config.json').write_text(json.dumps(config))
    return cli(['convert', f'--hf_dir={hf_dir}', f'--model_dir={fresh("conv")}']), 'error', None

  def jsonl_null():
    data = work / 'inputs' / 'nulls'
    data.mkdir(parents=True)
    (data / 'train.jsonl').write_text('{"inputs": null, "targets": "x"}\n')
    gin_file = data / 'task.gin'
    gin_file.write_text(
        'from __gin__ import dynamic_registration\nfrom t5x_lite.data import file_tasks\n'
        'MIXTURE_OR_TASK_NAME = @file_tasks.file_task()\nfile_tasks.file_task:\n'
        f'  name = "nulls"\n  files = {{"train": "{data / "train.jsonl"}"}}\n'
        '  templates = [("{inputs}", "{targets}")]\n  metric_names = ["accuracy"]\n')
    return cli(['tasks', f'--gin_file={gin_file}']), 'error', None

  cases += [('convert_missing_num_heads', convert_missing_num_heads),
            ('jsonl_null_field', jsonl_null)]

  def half_line_metrics():
    model_dir = copy(stopped_at_9, 'halfline')
    with open(pathlib.Path(model_dir, 'metrics.jsonl'), 'a') as f:
      f.write('{"step": 10, "train/lo')
    proc = train(model_dir)
    return proc, 'ok', lambda: ('metrics.jsonl' in proc.stderr and
                                train_losses(model_dir) == train_losses(reference))

  def changed_mixture():
    model_dir = copy(stopped_at_9, 'mixture')
    proc = train(model_dir, '--gin.MIXTURE_OR_TASK_NAME="builtin_uppercase"')
    return proc, 'ok', lambda: any('mixture' in json.dumps(r) and 'train/loss' not in r
                                   for r in metrics_lines(model_dir))
  cases += [('metrics_half_written_line', half_line_metrics),
            ('resume_changed_mixture_recorded', changed_mixture)]
  return cases


# ---------------------------------------------------------------- damaged checkpoints

def newest_checkpoint(model_dir) -> pathlib.Path:
  directory = pathlib.Path(model_dir, 'checkpoints')
  return directory / str(max(int(p.name) for p in directory.iterdir() if p.name.isdigit()))


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(checkpoint: pathlib.Path, n: int = 64) -> None:
  """Flip `n` bytes in the middle of the largest array file (its size unchanged)."""
  path = _largest_file(checkpoint / 'state')
  data = bytearray(path.read_bytes())
  start = len(data) // 2
  for i in range(start, min(start + n, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _shard_file(checkpoint: pathlib.Path, shard: int = 0) -> pathlib.Path:
  return checkpoint / 'data' / f'shard_{shard:05d}-of-00002.json'


def changed_number(checkpoint: pathlib.Path) -> None:
  """The first number of a shard's iterator state + 1: valid JSON, another data stream."""
  path = _shard_file(checkpoint)
  path.write_text(re.sub(r'("iterator": [^0-9]*)(\d+)', lambda m: m[1] + str(int(m[2]) + 1),
                         path.read_text(), count=1))


def edited_meta(checkpoint: pathlib.Path) -> None:
  path = checkpoint / 'meta' / 'metadata'
  meta = json.loads(path.read_text())
  meta['model_config']['dropout_rate'] = 0.0
  path.write_text(json.dumps(meta))


def _damaged(model_dir, kind):
  DAMAGE[kind](newest_checkpoint(model_dir))
  return model_dir


DAMAGE = {
    'bit_flip': flip_bytes,
    'truncated_array_file': lambda c: os.truncate(_largest_file(c / 'state'),
                                                  _largest_file(c / 'state').stat().st_size // 2),
    'deleted_manifest': lambda c: [p.unlink() for p in c.rglob('manifest.ocdbt')],
    'deleted_meta_metadata': lambda c: [p.unlink() for p in (c / 'meta').rglob('metadata')],
    'half_written_iterator_json': lambda c: [p.write_text(p.read_text()[:len(p.read_text()) // 2])
                                             for p in (c / 'data').glob('*.json')],
    'deleted_state': lambda c: shutil.rmtree(c / 'state'),
    'deleted_data_shard': lambda c: _shard_file(c, 1).unlink(),
    'data_shard_lost_keys': lambda c: _shard_file(c).write_text('{}'),
    'changed_number_in_data_json': changed_number,
    'edited_meta': edited_meta,
}


def fallback_case(work, reference, stopped_at_9, kind) -> dict:
  model_dir = work / 'damage' / kind
  shutil.copytree(stopped_at_9, model_dir)
  DAMAGE[kind](newest_checkpoint(model_dir))
  proc = train(model_dir)
  moved = list((model_dir / 'checkpoints_broken').glob('9-*'))   # moved aside, not deleted
  result = {'case': kind, 'rc': proc.returncode, 'moved_aside': bool(moved)}
  if proc.returncode == 0:
    result.update(outcome_of_run(reference, model_dir))
  result['ok'] = (proc.returncode == 0 and result['moved_aside'] and
                  all(result.get(k) for k in ('state', 'losses', 'eval')))
  if not result['ok']:
    result['stderr'] = proc.stderr.strip().splitlines()[-1:] or ''
  return result


# ---------------------------------------------------------------- kill -9

def _poll(model_dir: pathlib.Path, moment: str, deadline: float) -> bool:
  """Wait until the run is mid-save (an orbax tmp directory exists) or mid-eval (the run's
  final eval has begun writing); False if the moment never came."""
  while time.time() < deadline:
    if moment == 'save' and any('tmp' in p.name for p in (model_dir / 'checkpoints').glob('*')):
      return True
    if moment == 'eval' and (model_dir / 'eval').exists():
      return True
    time.sleep(0.005)
  return False


def kill_case(work, reference, index, moment, delay) -> dict:
  model_dir = work / 'kills' / f'{index:02d}-{moment}'
  proc = subprocess.Popen([sys.executable, '-m', 't5x_lite.cli', 'train',
                           f'--model_dir={model_dir}'] + RUN, cwd=REPO, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  if moment == 'time':
    time.sleep(delay)
    hit = proc.poll() is None
  else:
    hit = _poll(model_dir, moment, time.time() + 240) and proc.poll() is None
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  rerun = train(model_dir)
  result = {'case': f'{moment}{"" if moment != "time" else f"@{delay:.1f}s"}', 'killed': hit,
            'rc': rerun.returncode}
  if rerun.returncode == 0:
    result.update(outcome_of_run(reference, model_dir))
    steps = [r['step'] for r in metrics_lines(model_dir) if 'train/loss' in r]
    result['one_line_per_step'] = steps == list(range(1, STEPS + 1))
  result['identical'] = rerun.returncode == 0 and all(
      result.get(k) for k in ('state', 'losses', 'eval', 'one_line_per_step'))
  if rerun.returncode:
    result['stderr'] = rerun.stderr.strip().splitlines()[-1:]
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workers', type=int, default=2, help='runs at once')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  start = time.time()
  work = pathlib.Path(tempfile.mkdtemp(prefix='t5x_lite_reliability_'))
  try:
    reference, stopped_at_9 = str(work / 'reference'), str(work / 'stopped_at_9')
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      runs = [pool.submit(train, reference),
              pool.submit(train, stopped_at_9, '--gin.TRAIN_STEPS=9')]
      for run in runs:
        if run.result().returncode:
          raise SystemExit(f'the reference run failed:\n{run.result().stderr[-3000:]}')
    run_seconds = time.time() - t0
    moments = ['save', 'eval'] + ['time'] * max(0, args.kills - 2)
    delays = [rng.uniform(2.0, run_seconds) for _ in moments]
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
      inputs = {name: pool.submit(thunk) for name, thunk in
                bad_input_cases(work, reference, stopped_at_9)}
      fallbacks = [pool.submit(fallback_case, work, reference, stopped_at_9, kind)
                   for kind in DAMAGE]
      kills = [pool.submit(kill_case, work, reference, i, m, d)
               for i, (m, d) in enumerate(zip(moments, delays))]
      input_outcomes = {}
      for name, future in inputs.items():
        proc, expect, check = future.result()
        input_outcomes[name] = {'outcome': classify(proc, expect, check),
                                'said': (proc.stderr.strip().splitlines() or [''])[-1][:200]}
      fallbacks = [f.result() for f in fallbacks]
      kills = [k.result() for k in kills]
    counts = {k: sum(o['outcome'] == k for o in input_outcomes.values())
              for k in ('clear', 'handled', 'silent', 'unclear')}
    print(json.dumps({
        'cases_tried': len(input_outcomes) + len(fallbacks) + len(kills),
        'bad_inputs': len(input_outcomes), 'clear_errors': counts['clear'],
        'handled': counts['handled'], 'silent': counts['silent'], 'unclear': counts['unclear'],
        'kills': len(kills), 'kills_landed': sum(k['killed'] for k in kills),
        'resumes_bit_identical': sum(k['identical'] for k in kills),
        'corrupt_checkpoints': len(fallbacks),
        'fallbacks_good': sum(f['ok'] for f in fallbacks),
        'seconds': round(time.time() - start, 1),
        'inputs': input_outcomes, 'fallbacks': fallbacks, 'kill_runs': kills}))
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
