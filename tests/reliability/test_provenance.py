"""provenance.record: a run's model_dir says which code ran (commit, a diff that `git apply`
turns back into the tree, untracked files, versions, command line), from git, from the
launcher's PROVENANCE files, or 'unknown' without failing."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5x_lite.rundir import provenance

GIT = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-c', 'init.defaultBranch=main']


def git(repo, *args: str) -> str:
  return subprocess.run([*GIT, '-C', str(repo), *args], capture_output=True, text=True,
                        check=True, timeout=30).stdout


def make_repo(path: pathlib.Path) -> str:
  """A committed tree (a.txt, gone.txt, .gitignore), then: a.txt edited, gone.txt deleted,
  new.txt untracked, a staged new file, an ignored file. Returns the commit."""
  path.mkdir()
  git(path, 'init', '-q')
  (path / 'a.txt').write_text('one\n')
  (path / 'gone.txt').write_text('bye\n')
  (path / '.gitignore').write_text('*.log\n')
  git(path, 'add', '-A')
  git(path, 'commit', '-qm', 'base')
  (path / 'a.txt').write_text('one\ntwo\n')
  (path / 'gone.txt').unlink()
  (path / 'new.txt').write_text('untracked\n')
  (path / 'staged.txt').write_text('staged\n')
  git(path, 'add', 'staged.txt')
  (path / 'run.log').write_text('ignored\n')
  return git(path, 'rev-parse', 'HEAD').strip()


def read(path: str) -> dict:
  return json.loads(pathlib.Path(path).read_text())


def apply_to_commit(repo: pathlib.Path, commit: str, diff: pathlib.Path, out: pathlib.Path):
  """A clean checkout of `commit` with `diff` applied: the tree the run had."""
  subprocess.run([*GIT, 'clone', '-q', str(repo), str(out)], check=True, timeout=30)
  git(out, 'checkout', '-q', commit)
  git(out, 'apply', str(diff))


def test_record_in_a_git_checkout_with_changes(tmp_path):
  repo = tmp_path / 'repo'
  commit = make_repo(repo)
  path = provenance.record(str(tmp_path / 'run'), root=repo)
  info = read(path)
  src = info['source']
  assert src['origin'] == 'git' and src['commit'] == commit
  assert src['uncommitted_changes'] == ['a.txt', 'gone.txt', 'staged.txt']
  assert src['untracked'] == ['new.txt'] and src['untracked_not_in_diff'] == []
  assert info['versions']['jax'] == jax.__version__
  assert info['versions']['numpy'] == np.__version__
  assert info['versions']['flax'] == importlib.metadata.version('flax')
  assert set(info['versions']) == {'t5x_lite', 'python', *provenance.PACKAGES}
  assert info['versions']['python'] == sys.version.split()[0]
  assert info['command'] == sys.argv
  assert info['process_count'] == 1 and info['device_count'] == jax.device_count()
  # The diff turns the commit back into the tree that ran (the ignored file is not part of it).
  diff = pathlib.Path(path).with_name(src['diff'])
  assert diff.name == pathlib.Path(path).stem + '.diff'
  apply_to_commit(repo, commit, diff, tmp_path / 'again')
  for name in ('a.txt', 'new.txt', 'staged.txt'):
    assert (tmp_path / 'again' / name).read_text() == (repo / name).read_text()
  assert not (tmp_path / 'again' / 'gone.txt').exists()
  assert not (tmp_path / 'again' / 'run.log').exists()
  assert git(repo, 'diff', '--cached', '--name-only') == 'staged.txt\n'  # index untouched
  # One record per launch: a resumed run keeps the history.
  second = provenance.record(str(tmp_path / 'run'), root=repo)
  assert second != path
  assert len(list((tmp_path / 'run' / 'provenance').glob('*.json'))) == 2


def test_large_untracked_files_are_listed_not_copied(tmp_path, monkeypatch):
  repo = tmp_path / 'repo'
  make_repo(repo)
  (repo / 'data.jsonl').write_text('x' * 100)
  monkeypatch.setattr(provenance, 'MAX_UNTRACKED_IN_DIFF', 50)
  facts, diff = provenance.source(repo)
  assert facts['untracked'] == ['data.jsonl', 'new.txt']
  assert facts['untracked_not_in_diff'] == ['data.jsonl']
  assert b'new.txt' in diff and b'data.jsonl' not in diff


def test_a_clean_checkout_has_no_diff(tmp_path):
  repo = tmp_path / 'repo'
  repo.mkdir()
  git(repo, 'init', '-q')
  (repo / 'a.txt').write_text('one\n')
  git(repo, 'add', '-A')
  git(repo, 'commit', '-qm', 'base')
  info = read(provenance.record(str(tmp_path / 'run'), root=repo))
  assert info['source']['uncommitted_changes'] == [] and info['source']['diff'] is None
  assert not list((tmp_path / 'run' / 'provenance').glob('*.diff'))


@pytest.mark.parametrize('case', ['git missing', 'not a checkout', 'inside another checkout'])
def test_without_git_the_facts_are_unknown(tmp_path, monkeypatch, case):
  repo = tmp_path / 'repo'
  make_repo(repo)
  root = repo
  if case == 'git missing':
    (tmp_path / 'empty').mkdir()
    monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  elif case == 'not a checkout':
    root = tmp_path / 'plain'
    root.mkdir()
  else:  # e.g. site-packages of a venv inside a checkout: not the code's own repository
    root = repo / 'venv'
    root.mkdir()
  info = read(provenance.record(str(tmp_path / 'run'), root=root))
  assert info['source'] == {'origin': 'unknown', 'root': str(root), 'commit': 'unknown',
                            'diff': None}
  assert info['versions']['jax'] == jax.__version__


def test_a_shipped_tree_reads_the_launchers_provenance(tmp_path):
  """The tree launch/tpu_vm.sh unpacks on a worker has no .git, only PROVENANCE.json/.diff."""
  repo = tmp_path / 'repo'
  commit = make_repo(repo)
  out = tmp_path / 'code.tar.gz'
  facts = provenance.archive(str(out), root=repo)
  unpacked = tmp_path / 'worker'
  unpacked.mkdir()
  subprocess.run(['tar', '-xzf', str(out), '-C', str(unpacked)], check=True, timeout=30)
  assert sorted(p.name for p in unpacked.iterdir()) == [
      '.gitignore', 'PROVENANCE.diff', 'PROVENANCE.json', 'a.txt', 'new.txt', 'staged.txt']
  info = read(provenance.record(str(tmp_path / 'run'), root=unpacked))
  src = info['source']
  assert src['origin'].startswith('archive') and src['commit'] == commit
  assert src['untracked'] == facts['untracked'] == ['new.txt']
  assert src['archived_on'] and src['root'] == str(repo)
  run_diff = (tmp_path / 'run' / 'provenance' / src['diff']).read_bytes()
  assert run_diff == (unpacked / 'PROVENANCE.diff').read_bytes() and b'+two' in run_diff


def test_archive_outside_a_checkout_fails_clearly(tmp_path):
  (tmp_path / 'plain').mkdir()
  with pytest.raises(provenance.NotACheckout, match='not the top of a git checkout.*--repo='):
    provenance.archive(str(tmp_path / 'x.tar.gz'), root=tmp_path / 'plain')
  assert not (tmp_path / 'x.tar.gz').exists()

