"""The launchers in launch/: what `--dry-run` prints, that it is exactly what runs, that the
workers get the code you have, and the flag errors.

Everything runs through bash with stand-ins for gcloud, gsutil, sbatch, srun, scontrol and
t5x-lite first on PATH (they record their argv under tmp_path), so no cloud tool or cluster is
needed and nothing reaches the network. The printed lines are split into words by bash itself.
tpu_vm.sh runs from a copy in a small git checkout (`tree`), whose working tree it ships.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

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
                'printf %s "${PYTHONPATH:-}" > "$FAKE_DIR/pythonpath"\n'
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
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'FAKE_')) and k != 'PYTHONPATH'}
    env.update(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', FAKE_DIR=str(tmp_path),
               TMPDIR=str(tmp_path))

    @staticmethod
    def calls() -> list[list[str]]:
      return [p.read_text().split('\0')[:-1] for p in sorted((tmp_path / 'calls').iterdir())]

    @staticmethod
    def clear() -> None:
      for p in (tmp_path / 'calls').iterdir():
        p.unlink()

  return Fake


def launch(fake, script: str, *args: str, src: pathlib.Path = REPO,
           **env: str) -> subprocess.CompletedProcess:
  """Runs src/launch/SCRIPT (the launchers take the code's tree from their own location)."""
  return subprocess.run(['bash', str(src / 'launch' / script), *args], capture_output=True,
                        text=True, env={**fake.env, **env}, cwd=fake.dir, timeout=60)


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

# local.sh imports t5x_lite from the checkout it is in, whichever t5x-lite is installed.
ENV_SRC = ['env', f'PYTHONPATH={REPO}']


def test_local_dry_run_prints_the_train_command(fake):
  result = launch(fake, 'local.sh', '--dry-run', '--model_dir=/tmp/my run', *GIN)
  assert dry_run_commands(result) == [[*ENV_SRC, 't5x-lite', 'train', '--model_dir=/tmp/my run',
                                       *GIN]]
  assert result.stdout.startswith(
      f'env PYTHONPATH={REPO} t5x-lite train --model_dir=/tmp/my\\ run --gin_file=')
  assert fake.calls() == []  # nothing ran


def test_local_runs_what_dry_run_prints(fake):
  args = ['--gin_file=a.gin', '--model_dir', '/tmp/run', TRICKY]
  printed = dry_run_commands(launch(fake, 'local.sh', *args, '--dry-run'))
  result = launch(fake, 'local.sh', *args)
  assert result.returncode == 0, result.stderr
  assert 'fake training output' in result.stdout
  assert printed == [[*ENV_SRC, 't5x-lite', 'train', *args]]
  assert fake.calls() == [printed[0][2:]]
  assert (fake.dir / 'pythonpath').read_text() == str(REPO)
  launch(fake, 'local.sh', *args, PYTHONPATH='/opt/mine')   # a PYTHONPATH of yours comes after
  assert (fake.dir / 'pythonpath').read_text() == f'{REPO}:/opt/mine'


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
GIT = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-c', 'init.defaultBranch=main']


def git(repo, *args: str) -> str:
  return subprocess.run([*GIT, '-C', str(repo), *args], capture_output=True, text=True,
                        check=True, timeout=30).stdout


@pytest.fixture
def tree(tmp_path):
  """A small git checkout holding tpu_vm.sh and the module that packs the tree, committed."""
  src = tmp_path / 'src'
  for path in ('launch/tpu_vm.sh', 't5x_lite/rundir/provenance.py', 'setup.cfg'):
    (src / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / path, src / path)
  (src / '.gitignore').write_text('*.log\n')
  git(src, 'init', '-q')
  git(src, 'add', '-A')
  git(src, 'commit', '-qm', 'base')
  return src


def archive_path(fake) -> pathlib.Path:
  return fake.dir / 't5x_lite-flan-xl.tar.gz'   # ${TMPDIR}/t5x_lite-NAME.tar.gz


def test_tpu_vm_dry_run_commands(fake, tree):
  result = launch(fake, 'tpu_vm.sh', *TPU, '--dry-run', '--', *GIN, src=tree)
  pack, create, scp, setup, train, ls, delete = dry_run_commands(result)
  assert pack == ['python3', '-I', f'{tree}/t5x_lite/rundir/provenance.py', 'archive',
                  str(archive_path(fake))]
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'flan-xl',
                    '--zone=us-central2-b', '--accelerator-type=v4-32',
                    '--version=tpu-ubuntu2204-base']
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', str(archive_path(fake)),
                 'flan-xl:t5x_lite.tar.gz', '--zone=us-central2-b', '--worker=all']
  for ssh in (setup, train):
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'flan-xl']
    assert '--zone=us-central2-b' in ssh and '--worker=all' in ssh
  assert [bash_words(s) for s in option(setup, '--command').split(' && ')] == [
      ['python3', '-m', 'pip', 'install', '-U', 'pip'], ['rm', '-rf', 't5x_lite'],
      ['mkdir', 't5x_lite'], ['tar', '-xzf', 't5x_lite.tar.gz', '-C', 't5x_lite'],
      ['cd', 't5x_lite'], ['python3', '-m', 'pip', 'install', '-e', '.', 'jax[tpu]']]
  remote = option(train, '--command')
  assert 'cd t5x_lite && t5x-lite train --model_dir=gs://bucket/runs/xl --gin_file=' in remote
  assert remote.endswith(' 2>&1 | tee -a train.log')  # streamed here, kept on each worker
  assert ls == ['gsutil', 'ls', 'gs://bucket/runs/xl']
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'flan-xl',
                    '--zone=us-central2-b', '--quiet']
  assert fake.calls() == [] and not archive_path(fake).exists()  # nothing ran


def test_tpu_vm_ships_the_working_tree_and_its_provenance(fake, tree, tmp_path):
  """A real launch with the fakes: the archive copied to the workers holds the uncommitted
  change and the untracked file (not the ignored or deleted ones) and the commit and diff; the
  workers' setup command unpacks and installs it."""
  commit = git(tree, 'rev-parse', 'HEAD').strip()
  (tree / 'setup.cfg').write_text((tree / 'setup.cfg').read_text() + '# my fix\n')
  (tree / 'gin_configs').mkdir()
  (tree / 'gin_configs' / 'mine.gin').write_text('TRAIN_STEPS = 7\n')
  (tree / 'debug.log').write_text('ignored\n')
  git(tree, 'rm', '-q', '--cached', 'launch/tpu_vm.sh')   # deleted from git, kept on disk:
  (tree / 'launch' / 'tpu_vm.sh').rename(tree / 'launch' / 'tpu.sh')  # an untracked copy runs
  result = launch(fake, 'tpu.sh', *TPU, '--', *GIN, src=tree)
  assert result.returncode == 0, result.stderr
  assert [c[4] if c[0] == 'gcloud' else c[0] for c in fake.calls()] == [
      'create', 'scp', 'ssh', 'ssh', 'gsutil', 'delete']
  shipped = pathlib.Path(fake.calls()[1][5])
  assert shipped == archive_path(fake)
  with tarfile.open(shipped) as tar:
    files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
  assert sorted(files) == ['.gitignore', 'PROVENANCE.diff', 'PROVENANCE.json',
                           'gin_configs/mine.gin', 'launch/tpu.sh', 'setup.cfg',
                           't5x_lite/rundir/provenance.py']
  assert files['setup.cfg'].endswith(b'# my fix\n')
  assert files['gin_configs/mine.gin'] == b'TRAIN_STEPS = 7\n'
  facts = json.loads(files['PROVENANCE.json'])
  assert facts['commit'] == commit and facts['root'] == str(tree)
  assert facts['uncommitted_changes'] == ['launch/tpu_vm.sh', 'setup.cfg']
  assert facts['untracked'] == ['gin_configs/mine.gin', 'launch/tpu.sh']
  assert b'+# my fix' in files['PROVENANCE.diff']
  assert b'+TRAIN_STEPS = 7' in files['PROVENANCE.diff']
  # A worker: the setup command (pip faked) unpacks the archive and installs from it.
  home, tools = tmp_path / 'worker', tmp_path / 'worker_bin'
  home.mkdir(), tools.mkdir()
  (tools / 'python3').write_text('#!/usr/bin/env bash\necho "$PWD $*" >> "$HOME/pip.log"\n')
  (tools / 'python3').chmod(0o755)
  shutil.copy(shipped, home / 't5x_lite.tar.gz')
  setup = option(fake.calls()[2], '--command')
  run = subprocess.run(['bash', '-c', setup], cwd=home, capture_output=True, text=True, timeout=30,
                       env={**fake.env, 'HOME': str(home), 'PATH': f'{tools}:{os.environ["PATH"]}'})
  assert run.returncode == 0, run.stderr
  assert (home / 'pip.log').read_text().splitlines() == [
      f'{home} -m pip install -U pip', f'{home}/t5x_lite -m pip install -e . jax[tpu]']
  assert (home / 't5x_lite' / 'gin_configs' / 'mine.gin').read_text() == 'TRAIN_STEPS = 7\n'
  assert json.loads((home / 't5x_lite' / 'PROVENANCE.json').read_text())['commit'] == commit


def test_tpu_vm_remote_train_command_keeps_every_flag(fake, tree, tmp_path):
  """Run the printed worker command in bash (as the worker's shell would) with a fake
  t5x-lite: the model_dir and gin flags arrive intact, and the log is kept in train.log."""
  result = launch(fake, 'tpu_vm.sh', *TPU, '--dry-run', '--', *GIN, src=tree)
  remote = option(dry_run_commands(result)[4], '--command')
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


def test_tpu_vm_options(fake, tree):
  result = launch(fake, 'tpu_vm.sh', '--dry-run', *TPU, '--version=v2-alpha-tpuv5', '--keep',
                  '--', '--gin_file=a.gin', src=tree)
  commands = dry_run_commands(result)
  assert len(commands) == 6  # --keep: no delete
  assert option(commands[1], '--version') == 'v2-alpha-tpuv5'
  assert not any('delete' in c for c in commands)


@pytest.mark.parametrize('repo, url, ref', [
    ('https://example.com/me/t5x lite.git', 'https://example.com/me/t5x lite.git', None),
    ('https://me@example.com/me/t5x.git', 'https://me@example.com/me/t5x.git', None),
    ('https://example.com/me/t5x.git@feature/x', 'https://example.com/me/t5x.git', 'feature/x'),
    ('git@github.com:me/t5x.git', 'git@github.com:me/t5x.git', None),
    ('git@github.com:me/t5x.git@0a1b2c3', 'git@github.com:me/t5x.git', '0a1b2c3')])
def test_tpu_vm_repo_is_cloned_instead(fake, tmp_path, repo, url, ref):
  """--repo=URL[@REF]: the workers clone it (at REF); nothing is packed or copied, so this
  also works from a tree that is not a git checkout."""
  plain = tmp_path / 'plain' / 'launch'
  plain.mkdir(parents=True)
  shutil.copy2(REPO / 'launch' / 'tpu_vm.sh', plain)
  commands = dry_run_commands(launch(fake, 'tpu_vm.sh', '--dry-run', *TPU, f'--repo={repo}',
                                     src=plain.parent))
  assert [c[4] if c[0] == 'gcloud' else c[0] for c in commands] == [
      'create', 'ssh', 'ssh', 'gsutil', 'delete']
  steps = [bash_words(s) for s in option(commands[1], '--command').split(' && ')]
  get = [['git', 'clone', '--depth=1', url, 't5x_lite']] if ref is None else [
      ['git', 'clone', url, 't5x_lite'], ['git', '-C', 't5x_lite', 'checkout', ref]]
  assert steps == [['python3', '-m', 'pip', 'install', '-U', 'pip'], ['rm', '-rf', 't5x_lite'],
                   *get, ['cd', 't5x_lite'],
                   ['python3', '-m', 'pip', 'install', '-e', '.', 'jax[tpu]']]


@pytest.mark.parametrize('repo', ['https://example.com/me/t5x.git@', '@v1'])
def test_tpu_vm_repo_needs_a_url_and_a_ref(fake, tree, repo):
  assert_usage_error(fake, 'tpu_vm.sh', [*TPU, f'--repo={repo}'], 'needs a URL and a non-empty REF',
                     src=tree)


def test_tpu_vm_outside_a_git_checkout_fails_before_creating_anything(fake, tmp_path):
  plain = tmp_path / 'plain'
  for path in ('launch/tpu_vm.sh', 't5x_lite/rundir/provenance.py'):
    (plain / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / path, plain / path)
  for dry in (['--dry-run'], []):
    result = launch(fake, 'tpu_vm.sh', *dry, *TPU, src=plain)
    assert result.returncode == 2
    assert 'is not a git checkout' in result.stderr and '--repo=URL[@REF]' in result.stderr
    assert result.stdout == '' and fake.calls() == []


def test_tpu_vm_runs_what_dry_run_prints(fake, tree):
  printed = dry_run_commands(launch(fake, 'tpu_vm.sh', *TPU, '--dry-run', '--', *GIN, src=tree))
  result = launch(fake, 'tpu_vm.sh', *TPU, '--', *GIN, src=tree)
  assert result.returncode == 0, result.stderr
  assert printed[0][:2] == ['python3', '-I'] and archive_path(fake).is_file()  # not a fake
  assert fake.calls() == printed[1:]


def test_tpu_vm_deletes_the_slice_when_a_step_fails(fake, tree):
  def verbs():
    return [c[4] if c[0] == 'gcloud' else c[0] for c in fake.calls()]
  for step, ran in (('scp', ['create', 'scp']), ('ssh', ['create', 'scp', 'ssh'])):
    fake.clear()
    result = launch(fake, 'tpu_vm.sh', *TPU, '--', *GIN, FAKE_GCLOUD_FAIL=step, src=tree)
    assert result.returncode == 7
    assert verbs() == ran + ['gsutil', 'delete']  # no training after a failed setup
  fake.clear()
  result = launch(fake, 'tpu_vm.sh', *TPU, '--keep', '--', *GIN, FAKE_GCLOUD_FAIL='ssh', src=tree)
  assert result.returncode == 7
  assert [c[4] for c in fake.calls() if c[0] == 'gcloud'] == ['create', 'scp', 'ssh']
  fake.clear()
  # If the slice cannot be created there is nothing to delete (it may be someone else's).
  result = launch(fake, 'tpu_vm.sh', *TPU, '--', *GIN, FAKE_GCLOUD_FAIL='create', src=tree)
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
  assert f'\nexport PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}\nCOORDINATOR=' in script
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
  assert (fake.dir / 'pythonpath').read_text() == str(REPO)


def test_gpu_slurm_nodes_import_the_checkout_the_script_is_in(fake, tmp_path):
  """Whatever t5x-lite the nodes have installed, the job runs this checkout's code (a copy
  here, in a directory with a space), ahead of a PYTHONPATH of yours."""
  src = tmp_path / 'my src'
  (src / 'launch').mkdir(parents=True)
  shutil.copy2(REPO / 'launch' / 'gpu_slurm.sh', src / 'launch')
  script = sbatch_script(launch(fake, 'gpu_slurm.sh', '--dry-run', *GPU, src=src))
  run_batch_script(fake, script, SLURM_NTASKS='2', SLURM_PROCID='0', PYTHONPATH='/opt/mine')
  assert (fake.dir / 'pythonpath').read_text() == f'{src}:/opt/mine'


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

def assert_usage_error(fake, script, args, message, src=REPO):
  result = launch(fake, script, '--dry-run', *args, src=src)
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
