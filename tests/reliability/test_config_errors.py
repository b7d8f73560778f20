"""Configuration (issue #18 items 9, 10, 13): no code runs from a run directory, a --gin
override that nothing reads is an error, and the common gin mistakes are one-line errors."""

from __future__ import annotations

import os
import re

import gin
import pytest

from t5x_lite import cli as cli_lib, config, errors
from t5x_lite.rundir import run_config
from tests.training.test_runs import REPO, TINY_RUN, cli

TINY_GIN = [f[len('--gin_file='):] for f in TINY_RUN if f.startswith('--gin_file=')]


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A model_dir with the config.gin that `train` writes for the tiny run (no checkpoint)."""
  gin.clear_config()
  model_dir = tmp_path_factory.mktemp('run')
  config.parse_gin(TINY_GIN, fixed=[f'MODEL_DIR={model_dir}'])
  config.model_config(), config.macro('TRAIN')
  (model_dir / 'config.gin').write_text(config.operative_config(config.model_config()))
  gin.clear_config()
  return model_dir


# Item 9: the attack of the issue, then the ways around a module check.
ATTACK = "import os\nos.system.command = 'touch {marker}'\nloop.TrainConfig.seed = @os.system()\n"


def test_eval_refuses_a_run_config_that_imports_os_and_runs_nothing(run_dir, tmp_path):
  model_dir = tmp_path / 'tampered'
  model_dir.mkdir()
  marker = tmp_path / 'ran'
  text = (run_dir / 'config.gin').read_text() + ATTACK.format(marker=marker)
  (model_dir / 'config.gin').write_text(text)
  out, err = cli(['eval', f'--model_dir={model_dir}']).communicate(timeout=300)
  assert not marker.exists()
  line = text.splitlines().index('import os') + 1
  assert err.strip() == (
      f'error: {model_dir}/config.gin:{line}: refused: it imports os, which is not part of '
      "t5x_lite. eval reads a run's config.gin as data and runs no code that it names (only "
      "t5x_lite's configs). If you trust this file (e.g. your run imported your own task "
      f'module), pass it yourself: --gin_file={model_dir}/config.gin (your gin files are read '
      'with full gin)'), err
  del out


@pytest.mark.parametrize('tamper,refusal', [
    ("include '/tmp/evil.gin'", "it includes /tmp/evil.gin"),
    ('from t5x_lite import config\nX = @config.os.system()',     # through a module's attribute
     'config.os.system is posix.system, not a t5x_lite config'),
    ("from t5x_lite import config\nconfig.os.system.command = 'id'",
     'config.os.system is posix.system, not a t5x_lite config'),
    ('from t5x_lite.commands import plan\nX = @plan.run_worker()',  # t5x_lite's own subprocess
     'plan.run_worker is t5x_lite.commands.plan.run_worker, not a t5x_lite config'),
    ('from t5x_lite.models import t5\nt5.T5Config.d_model = [@t5.jnp.zeros()]',
     't5.jnp.zeros is jax.numpy.zeros, not a t5x_lite config'),
    ('import subprocess', 'it imports subprocess, which is not part of t5x_lite'),
    ('from t5x_lite import config\nX = @config.nothing()',
     'config.nothing does not resolve through its t5x_lite imports'),
])
def test_run_config_names_only_t5x_lite_configs(run_dir, tamper, refusal):
  text = (run_dir / 'config.gin').read_text() + tamper + '\n'
  with pytest.raises(run_config.UnsafeRunConfig, match='refused: ' + re.escape(refusal)):
    run_config.check('config.gin', text)


def test_the_config_train_writes_reads_back_the_same_run(run_dir):
  config.parse_gin(TINY_GIN, fixed=[f'MODEL_DIR={run_dir}'])
  model, train = config.model_config(), config.macro('TRAIN')
  gin.clear_config()
  run_config.parse(str(run_dir), [])
  assert (config.model_config(), config.macro('TRAIN')) == (model, train)


@pytest.mark.parametrize('name', sorted(
    os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(config.GIN_CONFIGS)
    for f in fs if f.endswith('.gin')))
def test_every_gin_config_of_the_repository_passes_the_run_config_check(name):
  # A run's config.gin holds what these files bind (their includes are checked on their own).
  lines = open(os.path.join(REPO, name)).read().splitlines()
  run_config.check(name, '\n'.join(l for l in lines if not l.startswith('include ')))


def test_a_run_config_the_user_passes_is_read_with_full_gin(tmp_path):
  (tmp_path / 'config.gin').write_text('import os\nX = 1\n')
  run_config.parse(str(tmp_path), [str(tmp_path / 'config.gin')])  # skipped: theirs
  with pytest.raises(run_config.UnsafeRunConfig):
    run_config.parse(str(tmp_path), [])


# Item 10: which --gin override is read, from gin's own config.
@pytest.mark.parametrize('binding,error', [
    ('TRAIN_STEP=3', r'no configuration reads the macro TRAIN_STEP \(did you mean TRAIN_STEPS'),
    ('decoding.DecodingConfig.num_beams=3', 'no configurable decoding.DecodingConfig: no gin '
     'file imports it; add `from t5x_lite import decoding` to a gin file you pass'),
    ('DECODING=3', 'no configuration reads the macro DECODING'),
    ('TRAIN_STEPS=3', None), ('loop.TrainConfig.seed=3', None), ('DROPOUT_RATE=0.0', None),
    ('t5.T5Config.remat=True', None), ('MIXTURE_OR_TASK_NAME="builtin"', None),
])
def test_an_override_nothing_reads_is_an_error(binding, error):
  parse = lambda: config.parse_gin(TINY_GIN, [binding], fixed=['MODEL_DIR=/tmp/m'],
                                   reads=('MODEL_CONFIG', 'TRAIN'))
  if error is None:
    parse()
  else:
    with pytest.raises(errors.UserError, match=error):
      parse()


def test_an_override_without_a_value_is_an_error():
  with pytest.raises(errors.UserError, match=r'^--gin.TRAIN_STEPS: a gin override looks like '
                                             r'--gin.NAME=VALUE$'):
    config.parse_gin(TINY_GIN, ['TRAIN_STEPS'])


def test_macros_reached_through_scoped_references_count_as_read():
  # real_example.gin: DATA_DIR is read by @sst2/file_tasks.file_task() and its siblings.
  config.parse_gin(['gin_configs/mixtures/real_example.gin'], ['DATA_DIR="/d"'],
                   reads=('MIXTURE_OR_TASK_NAME',))
  with pytest.raises(errors.UserError, match='no configuration reads the macro DATA_DIR'):
    config.check_reads(['DATA_DIR="/d"'], ('DECODING',))


# Items 10 and 13 through the command line: one line on stderr, `error: ...`, exit code 2.
BAD_GIN = {
    'syntax.gin': 'from __gin__ import dynamic_registration\nX = = 3\n',
    'typo.gin': ('from __gin__ import dynamic_registration\nfrom t5x_lite.models import t5\n'
                 't5.T5Confg.d_model = 3\n'),
    'param.gin': ('from __gin__ import dynamic_registration\nfrom t5x_lite.models import t5\n'
                  't5.T5Config.d_modle = 3\n'),
    'include.gin': "include 'gin_configs/meshes/no_such_mesh.gin'\n",
    'import.gin': 'from __gin__ import dynamic_registration\nimport no_such_module_xyz\n',
    'noimport.gin': 'from __gin__ import dynamic_registration\nt6.T5Config.d_model = 3\n',
    'train3.gin': 'TRAIN = 3\n',
}
RUN = TINY_RUN[:3]   # model, finetune, builtin mixture
CASES = [
    (['train', '--model_dir={d}/m'] + RUN + ['--gin.TRAIN_STEP=3'],
     'error: --gin.TRAIN_STEP=3: no configuration reads the macro TRAIN_STEP (did you mean '
     'TRAIN_STEPS or TRAIN?); this command reads MODEL_CONFIG, TRAIN and the macros they '
     'reference'),
    (['train', '--model_dir={d}/a'] + RUN + ['--gin.MODEL_DIR={d}/b'],
     'error: --gin.MODEL_DIR={d}/b contradicts --model_dir={d}/a: give the run directory once, '
     'with --model_dir'),
    (['train', '--model_dir={d}/m', '--gin_file=no_such.gin'],
     f'error: gin file no_such.gin not found (searched the current directory and {REPO}); '
     'check the path'),
    (['train', '--model_dir={d}/m', '--gin_file={d}/syntax.gin'],
     "error: {d}/syntax.gin:2: gin syntax error: Unable to parse value. in 'X = = 3'"),
    (['train', '--model_dir={d}/m', '--gin_file={d}/typo.gin'],
     'error: {d}/typo.gin:3: t5.T5Confg: t5x_lite.models.t5 has no T5Confg (did you mean '
     'T5Config?)'),
    (['train', '--model_dir={d}/m', '--gin_file={d}/param.gin'],
     "error: {d}/param.gin:3: t5.T5Config has no parameter 'd_modle' (did you mean d_model?)"),
    (['train', '--model_dir={d}/m', '--gin_file={d}/include.gin'],
     'error: {d}/include.gin:1: gin file gin_configs/meshes/no_such_mesh.gin not found '
     f'(searched the current directory and {REPO}); check the path'),
    (['train', '--model_dir={d}/m', '--gin_file={d}/import.gin'],
     "error: {d}/import.gin:2: cannot import no_such_module_xyz ('import no_such_module_xyz'): "
     'is it installed and on PYTHONPATH?'),
    (['train', '--model_dir={d}/m', '--gin_file={d}/noimport.gin'],
     'error: {d}/noimport.gin:2: t6 is not imported: add the import that defines it (e.g. '
     '`from t5x_lite.models import t5`) after `from __gin__ import dynamic_registration`'),
    (['train', '--model_dir={d}/m'] + RUN + ['--gin.t5.T5Config.d_modle=3'],
     "error: --gin.t5.T5Config.d_modle=3: t5.T5Config has no parameter 'd_modle' (did you "
     'mean d_model?)'),
    (['train', '--model_dir={d}/m'] + RUN + ['--gin.loop.TrainConfg.seed=1'],
     'error: --gin.loop.TrainConfg.seed=1: no configurable loop.TrainConfg (did you mean '
     'loop.TrainConfig?)'),
    (['train', '--model_dir={d}/m'] + RUN[:2],
     'error: the gin files leave MIXTURE_OR_TASK_NAME = %gin.REQUIRED: set it with '
     '--gin.MIXTURE_OR_TASK_NAME=... or a gin file that defines it'),
    (['train', '--model_dir={d}/m', '--gin_file=gin_configs/runs/finetune.gin',
      '--gin_file=gin_configs/mixtures/builtin.gin'],
     'error: the gin files define no MODEL_CONFIG macro: add the gin file that sets it '
     '(--gin_file=...) or --gin.MODEL_CONFIG=...'),
    (['train', '--model_dir={d}/m'] + RUN + ['--gin_file={d}/train3.gin'],
     'error: the gin files must set TRAIN = @loop.TrainConfig() (include '
     'gin_configs/runs/finetune.gin)'),
    (['train', '--model_dir={d}/m'],
     'error: train needs --gin_file (e.g. gin_configs/runs/finetune.gin plus a model and a '
     'mixture); see README.md'),
    (['eval', '--model_dir={d}/empty'],
     "error: {d}/empty/config.gin not found: is {d}/empty a run directory (`t5x-lite train` "
     "writes config.gin there)? Otherwise pass the run's gin files: --gin_file=MODEL.gin "
     '--gin_file=gin_configs/runs/finetune.gin --gin_file=MIXTURE.gin'),
    (['eval', '--model_dir={run}', '--gin.TRAIN_STEP=3'],
     'error: --gin.TRAIN_STEP=3: no configuration reads the macro TRAIN_STEP (did you mean '
     'TRAIN_STEPS or TRAIN?); this command reads MODEL_CONFIG, TRAIN, DECODING and the '
     'macros they reference'),
    (['infer', '--model_dir={run}', '--input_file={d}/in.txt', '--output_file={d}/o.jsonl',
      '--gin.TRAIN_STEPS=3'],
     'error: --gin.TRAIN_STEPS=3: no configuration reads the macro TRAIN_STEPS; this command '
     'reads DECODING and the macros they reference'),
    (['infer', '--model_dir={run}', '--input_file={d}/in.txt', '--output_file={d}/o.jsonl',
      '--gin_file=gin_configs/decoding/beam4.gin', '--gin.decoding.DecodingConfig.num_beam=2'],
     "error: --gin.decoding.DecodingConfig.num_beam=2: decoding.DecodingConfig has no "
     "parameter 'num_beam' (did you mean num_beams or num_samples?)"),
    (['infer', '--model_dir={run}', '--input_file={d}/none.txt', '--output_file={d}/o.jsonl'],
     'error: --input_file={d}/none.txt not found'),
    (['tasks', '--gin.DATA_DIR=/data'],
     'error: --gin.DATA_DIR=/data: no configuration reads the macro DATA_DIR; this command '
     'reads MIXTURE_OR_TASK_NAME and the macros they reference'),
]


def test_bad_configurations_are_one_line_errors(run_dir, tmp_path, capsys, monkeypatch):
  """The first case of each command runs as its own process (stderr holds that one line and
  nothing else, whatever the imports log); the others call the same `main` the console
  script runs, in this process (no interpreter start and imports per case)."""
  for name, text in BAD_GIN.items():
    (tmp_path / name).write_text(text)
  (tmp_path / 'in.txt').write_text('a prompt\n')
  (tmp_path / 'empty').mkdir()
  fill = lambda s: s.format(d=tmp_path, run=run_dir)
  firsts = {args[0]: i for i, (args, _) in reversed(list(enumerate(CASES)))}
  procs = [(cli([fill(a) for a in CASES[i][0]]), fill(CASES[i][1])) for i in firsts.values()]
  monkeypatch.chdir(REPO)   # as the processes: gin files are searched in the cwd first
  for i, (args, line) in enumerate(CASES):
    if i in firsts.values():
      continue
    gin.clear_config()
    code = cli_lib.main([fill(a) for a in args])
    err = capsys.readouterr().err
    assert (code, err.strip()) == (2, fill(line)), (args, err[-2000:])
  for proc, line in procs:
    _, err = proc.communicate(timeout=300)
    assert (proc.returncode, err.strip()) == (2, line), (proc.args, err[-2000:])


def test_an_error_raised_by_code_a_gin_file_imports_keeps_its_traceback(tmp_path):
  (tmp_path / 'broken_tasks.py').write_text("raise ValueError('boom in my task module')\n")
  (tmp_path / 'tasks.gin').write_text('from __gin__ import dynamic_registration\n'
                                      'import broken_tasks\n')
  proc = cli(['tasks', f'--gin_file={tmp_path}/tasks.gin'],
             extra_env={'PYTHONPATH': f'{REPO}:{tmp_path}'})
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1 and 'Traceback' in err and 'boom in my task module' in err, err
