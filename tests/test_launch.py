"""The launchers in launch/: what `--dry-run` prints, that it is exactly what runs, and the
flag errors.

Everything runs through bash with stand-ins for gcloud, gsutil, sbatch, srun, scontrol and
t5x-lite first on PATH (they record their argv under tmp_path), so no cloud tool or cluster is
needed and nothing reaches the network. The printed lines are split into words by bash itself.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / 'launch'

# Values that only survive correct shell quoting (spaces, both kinds of quote, $, a backslash).
TRICKY = '--gin.PROMPT="it\'s a $HOME \\ test"'
GIN = ['--gin_file=gin_configs/runs/finetune.gin', '--gin.BATCH_SIZE=128', TRICKY]

_RECORD = 'n=$(ls "$FAKE_DIR/calls" | wc -l)\n' \
          'printf \'%s\\0\' "${0##*/}" "$@" > "$FAKE_DIR/calls/$(printf %03d "$n")"\n'
FAKES = {
    'gcloud': _RECORD + 'if [ "${4:-}" = "${FAKE_GCLOUD_FAIL:-none}" ]; then exit 7; fi\n',
    'gsutil': _RECORD,
    'sbatch': _RECORD + 'cat > "$FAKE_DIR/sbatch_stdin"\necho "Submitted batch job 42"\n',
    'scontrol': _RECORD + 'printf "gpu007\\ngpu008\\n"\n',
    # Like srun: one task per node, each with its own SLURM_PROCID (FAKE_SRUN_TASKS=1), or
    # simply the command in the current environment.
    'srun': _RECORD + (
        'if [ -n "${FAKE_SRUN_TASKS:-}" ]; then\n'
        '  for ((i = 0; i < SLURM_NNODES; i++)); do\n'
        '    SLURM_PROCID=$i SLURM_NTASKS=$SLURM_NNODES "$@" || exit\n'
        '  done\n'
        'else exec "$@"; fi\n'),
    't5x-lite': _RECORD + 'echo "fake training output"\n'
                'echo "GLIBC_TUNABLES=${GLIBC_TUNABLES:-}"\nexit "${FAKE_TRAIN_RC:-0}"\n',
}


@pytest.fixture
def fake(tmp_path):
  """Stand-in tools first on PATH; `fake.calls()` lists the recorded argvs in call order."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (tmp_path / 'calls').mkdir()
  for name, body in FAKES.items():
    path = bin_dir / name
    path.write_text('#!/usr/bin/env bash\n' + body)
    path.chmod(0o755)

  class Fake:
    dir = tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'FAKE_'))}
    env.update(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', FAKE_DIR=str(tmp_path))

    @staticmethod
    def calls() -> list[list[str]]:
      return [p.read_text().split('\0')[:-1] for p in sorted((tmp_path / 'calls').iterdir())]

    @staticmethod
    def clear() -> None:
      for p in (tmp_path / 'calls').iterdir():
        p.unlink()

  return Fake


def launch(fake, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env={**fake.env, **env}, cwd=fake.dir, timeout=20)


def bash_words(line: str) -> list[str]:
  """The words bash makes of one printed command line."""
  out = subprocess.run(['bash', '-c', 'eval "words=($1)"; printf "%s\\0" "${words[@]}"', '_', line],
                       capture_output=True, text=True, check=True, timeout=10)
  return out.stdout.split('\0')[:-1]


def dry_run_commands(result: subprocess.CompletedProcess) -> list[list[str]]:
  assert result.returncode == 0, result.stderr
  return [bash_words(line) for line in result.stdout.splitlines()]


def option(words: list[str], name: str) -> str:
  values = [w[len(name) + 1:] for w in words if w.startswith(name + '=')]
  assert len(values) == 1, (name, words)
  return values[0]


# --- local.sh --------------------------------------------------------------------------------

def test_local_dry_run_prints_the_train_command(fake):
  result = launch(fake, 'local.sh', '--dry-run', '--model_dir=/tmp/my run', *GIN)
  assert dry_run_commands(result) == [['t5x-lite', 'train', '--model_dir=/tmp/my run', *GIN]]
  assert result.stdout.startswith('t5x-lite train --model_dir=/tmp/my\\ run --gin_file=')
  assert fake.calls() == []  # nothing ran


def test_local_runs_what_dry_run_prints(fake):
  args = ['--gin_file=a.gin', '--model_dir', '/tmp/run', TRICKY]
  printed = dry_run_commands(launch(fake, 'local.sh', *args, '--dry-run'))
  result = launch(fake, 'local.sh', *args)
  assert result.returncode == 0, result.stderr
  assert 'fake training output' in result.stdout
  assert fake.calls() == printed == [['t5x-lite', 'train', *args]]


def test_local_trains_with_a_step_reusing_malloc_unless_told_otherwise(fake):
  fake.env.pop('GLIBC_TUNABLES', None)
  result = launch(fake, 'local.sh', '--model_dir=/tmp/r')
  assert ('GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
          'glibc.malloc.trim_threshold=68719476736\n') in result.stdout
  result = launch(fake, 'local.sh', '--model_dir=/tmp/r', GLIBC_TUNABLES='glibc.malloc.arena_max=2')
  assert 'GLIBC_TUNABLES=glibc.malloc.arena_max=2\n' in result.stdout


def test_local_needs_model_dir(fake):
  for args in (['--gin_file=a.gin'], ['--model_dir=', '--gin_file=a.gin'], []):
    result = launch(fake, 'local.sh', '--dry-run', *args)
    assert result.returncode == 2
    assert 'missing --model_dir' in result.stderr
    assert result.stdout == ''
  assert launch(fake, 'local.sh', '--gin_file=a.gin').returncode == 2
  assert fake.calls() == []


def test_local_passes_the_train_exit_status_on(fake):
  result = launch(fake, 'local.sh', '--model_dir=/tmp/r', FAKE_TRAIN_RC='3')
  assert result.returncode == 3


# --- tpu_vm.sh -------------------------------------------------------------------------------

TPU = ['--name=flan-xl', '--zone=us-central2-b', '--type=v4-32', '--model_dir=gs://bucket/runs/xl']


def test_tpu_vm_dry_run_commands(fake):
  result = launch(fake, 'tpu_vm.sh', *TPU, '--dry-run', '--', *GIN)
  create, setup, train, ls, delete = dry_run_commands(result)
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'flan-xl',
                    '--zone=us-central2-b', '--accelerator-type=v4-32',
                    '--version=tpu-ubuntu2204-base']
  assert result.stdout.startswith('gcloud compute tpus tpu-vm create flan-xl '
                                  '--zone=us-central2-b --accelerator-type=v4-32 ')
  for ssh in (setup, train):
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'flan-xl']
    assert '--zone=us-central2-b' in ssh and '--worker=all' in ssh
  steps = option(setup, '--command').split(' && ')
  assert steps[0] == 'python3 -m pip install -U pip'
  assert bash_words(steps[1]) == ['git', 'clone', '--depth=1',
                                  'https://github.com/t5x-lite/t5x_lite.git', 't5x_lite']
  assert steps[2] == 'cd t5x_lite'
  assert bash_words(steps[3]) == ['python3', '-m', 'pip', 'install', '-e', '.', 'jax[tpu]']
  remote = option(train, '--command')
  assert 'cd t5x_lite && t5x-lite train --model_dir=gs://bucket/runs/xl --gin_file=' in remote
  assert remote.endswith(' 2>&1 | tee -a train.log')  # streamed here, kept on each worker
  assert ls == ['gsutil', 'ls', 'gs://bucket/runs/xl']
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'flan-xl',
                    '--zone=us-central2-b', '--quiet']
  assert fake.calls() == []  # nothing ran


def test_tpu_vm_remote_train_command_keeps_every_flag(fake, tmp_path):
  """Run the printed worker command in bash (as the worker's shell would) with a fake
  t5x-lite: the model_dir and gin flags arrive intact, and the log is kept in train.log."""
  result = launch(fake, 'tpu_vm.sh', *TPU, '--dry-run', '--', *GIN)
  remote = option(dry_run_commands(result)[2], '--command')
  (tmp_path / 't5x_lite').mkdir()
  run = subprocess.run(['bash', '-c', remote], capture_output=True, text=True, cwd=tmp_path,
                       env={**fake.env, 'HOME': str(tmp_path)}, timeout=10)
  assert run.returncode == 0, run.stderr
  assert fake.calls() == [['t5x-lite', 'train', '--model_dir=gs://bucket/runs/xl', *GIN]]
  assert 'fake training output' in run.stdout
  assert 'fake training output' in (tmp_path / 't5x_lite' / 'train.log').read_text()
  # A failed run is not hidden by tee.
  run = subprocess.run(['bash', '-c', remote], capture_output=True, text=True, cwd=tmp_path,
                       env={**fake.env, 'HOME': str(tmp_path), 'FAKE_TRAIN_RC': '3'}, timeout=10)
  assert run.returncode == 3


def test_tpu_vm_options(fake):
  result = launch(fake, 'tpu_vm.sh', '--dry-run', *TPU, '--version=v2-alpha-tpuv5',
                  '--repo=https://example.com/me/t5x lite.git', '--keep', '--', '--gin_file=a.gin')
  commands = dry_run_commands(result)
  assert len(commands) == 4  # --keep: no delete
  assert option(commands[0], '--version') == 'v2-alpha-tpuv5'
  clone = option(commands[1], '--command').split(' && ')[1]
  assert bash_words(clone)[3] == 'https://example.com/me/t5x lite.git'
  assert not any('delete' in c for c in commands)


def test_tpu_vm_runs_what_dry_run_prints(fake):
  printed = dry_run_commands(launch(fake, 'tpu_vm.sh', *TPU, '--dry-run', '--', *GIN))
  result = launch(fake, 'tpu_vm.sh', *TPU, '--', *GIN)
  assert result.returncode == 0, result.stderr
  assert fake.calls() == printed


def test_tpu_vm_deletes_the_slice_when_a_step_fails(fake):
  result = launch(fake, 'tpu_vm.sh', *TPU, '--', *GIN, FAKE_GCLOUD_FAIL='ssh')
  assert result.returncode == 7
  verbs = [c[4] if c[0] == 'gcloud' else c[0] for c in fake.calls()]
  assert verbs == ['create', 'ssh', 'gsutil', 'delete']  # no training after a failed setup
  fake.clear()
  result = launch(fake, 'tpu_vm.sh', *TPU, '--keep', '--', *GIN, FAKE_GCLOUD_FAIL='ssh')
  assert result.returncode == 7
  assert [c[4] for c in fake.calls() if c[0] == 'gcloud'] == ['create', 'ssh']
  fake.clear()
  # If the slice cannot be created there is nothing to delete (it may be someone else's).
  result = launch(fake, 'tpu_vm.sh', *TPU, '--', *GIN, FAKE_GCLOUD_FAIL='create')
  assert result.returncode == 7
  assert [c[4] for c in fake.calls()] == ['create']


@pytest.mark.parametrize('model_dir', ['/tmp/run', 'bucket/run', 'gs://', 's3://b/run'])
def test_tpu_vm_rejects_a_model_dir_outside_gcs(fake, model_dir):
  args = [a for a in TPU if not a.startswith('--model_dir=')] + [f'--model_dir={model_dir}']
  assert_usage_error(fake, 'tpu_vm.sh', args, '--model_dir must be a gs:// path')


# --- gpu_slurm.sh ----------------------------------------------------------------------------

GPU = ['--nodes=2', '--gpus_per_node=8', '--model_dir=/shared/my run']


def sbatch_script(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "sbatch <<'EOF'" and lines[-1] == 'EOF'
  return '\n'.join(lines[1:-1]) + '\n'


def test_gpu_slurm_dry_run_prints_the_batch_script(fake):
  result = launch(fake, 'gpu_slurm.sh', '--dry-run', *GPU, '--', *GIN)
  script = sbatch_script(result)
  assert script.startswith('#!/usr/bin/env bash\n')
  directives = [l for l in script.splitlines() if l.startswith('#SBATCH')]
  assert directives == ['#SBATCH --job-name=t5x_lite', '#SBATCH --nodes=2',
                        '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
                        '#SBATCH --time=24:00:00']
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
  srun = [l for l in script.splitlines() if l.startswith('srun ')]
  assert len(srun) == 1 and 't5x-lite train ' in srun[0]
  for var in ('$COORDINATOR:12345', '$SLURM_NTASKS', '$SLURM_PROCID'):
    assert var in srun[0]
  assert fake.calls() == []  # nothing submitted


def test_gpu_slurm_options(fake):
  result = launch(fake, 'gpu_slurm.sh', '--dry-run', *GPU, '--partition=a100', '--time=2:00:00',
                  '--port=23456', '--', '--gin_file=a.gin')
  script = sbatch_script(result)
  assert '#SBATCH --partition=a100\n' in script
  assert '#SBATCH --time=2:00:00\n' in script
  assert '$COORDINATOR:23456' in script


def run_batch_script(fake, script: str, **env: str) -> list[list[str]]:
  """Run the batch script as SLURM would on the first node, with fake scontrol and srun."""
  env = {**fake.env, 'SLURM_JOB_NODELIST': 'gpu[007-008]', 'SLURM_NNODES': '2', **env}
  run = subprocess.run(['bash', '-c', script], capture_output=True, text=True, env=env,
                       cwd=fake.dir, timeout=10)
  assert run.returncode == 0, run.stderr
  calls = fake.calls()
  assert calls[0] == ['scontrol', 'show', 'hostnames', 'gpu[007-008]']
  assert calls[1][0] == 'srun'
  return [c for c in calls if c[0] == 't5x-lite']


def test_gpu_slurm_per_node_command_uses_slurm_variables(fake):
  script = sbatch_script(launch(fake, 'gpu_slurm.sh', '--dry-run', *GPU, '--', *GIN))
  # One task as srun starts it: SLURM_PROCID and SLURM_NTASKS set by SLURM.
  train = run_batch_script(fake, script, SLURM_NTASKS='2', SLURM_PROCID='1')
  assert train == [['t5x-lite', 'train', '--model_dir=/shared/my run', *GIN,
                    '--coordinator_address=gpu007:12345', '--num_processes=2',
                    '--process_id=1']]


def test_gpu_slurm_every_task_gets_its_own_process_id(fake):
  script = sbatch_script(launch(fake, 'gpu_slurm.sh', '--dry-run', *GPU, '--', *GIN))
  train = run_batch_script(fake, script, FAKE_SRUN_TASKS='1')
  common = ['t5x-lite', 'train', '--model_dir=/shared/my run', *GIN,
            '--coordinator_address=gpu007:12345', '--num_processes=2']
  assert train == [common + ['--process_id=0'], common + ['--process_id=1']]


def test_gpu_slurm_submits_what_dry_run_prints(fake):
  dry = launch(fake, 'gpu_slurm.sh', '--dry-run', *GPU, '--', *GIN)
  # The printed text is itself the command: run it (with the fake sbatch).
  run = subprocess.run(['bash', '-c', dry.stdout], capture_output=True, text=True,
                       env=fake.env, timeout=10)
  assert run.returncode == 0, run.stderr
  printed = (fake.dir / 'sbatch_stdin').read_text()
  assert printed == sbatch_script(dry)
  fake.clear()
  result = launch(fake, 'gpu_slurm.sh', *GPU, '--', *GIN)
  assert result.returncode == 0, result.stderr
  assert 'Submitted batch job 42' in result.stdout
  assert fake.calls() == [['sbatch']]
  assert (fake.dir / 'sbatch_stdin').read_text() == printed


# --- usage errors of tpu_vm.sh and gpu_slurm.sh ----------------------------------------------

def assert_usage_error(fake, script, args, message):
  result = launch(fake, script, '--dry-run', *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stdout == ''
  assert fake.calls() == []
  return result


@pytest.mark.parametrize('script, flags, missing', [
    *[('tpu_vm.sh', TPU, m) for m in ('name', 'zone', 'type', 'model_dir')],
    *[('gpu_slurm.sh', GPU, m) for m in ('nodes', 'gpus_per_node', 'model_dir')]])
def test_missing_flag(fake, script, flags, missing):
  args = [a for a in flags if not a.startswith(f'--{missing}=')]
  assert_usage_error(fake, script, args + ['--', '--gin_file=a.gin'], f'missing --{missing}=')


@pytest.mark.parametrize('script, flags, flag', [  # train flags before `--` are not the launcher's
    *[('tpu_vm.sh', TPU, f) for f in ('--gin_file=a.gin', '--nmae=x', '--dry_run')],
    *[('gpu_slurm.sh', GPU, f) for f in ('--gin_file=a.gin', '--gpus=8', '--nodes')]])
def test_unknown_flag(fake, script, flags, flag):
  result = assert_usage_error(fake, script, flags + [flag], f'unknown flag {flag}')
  assert 'after --' in result.stderr
