"""Which code a run ran, written into its model_dir so that any run can be reproduced.

`record(model_dir)` (process 0, once per launch, from training.loop.train) writes
MODEL_DIR/provenance/<UTC time>.json: the source tree's commit, its uncommitted changes and
untracked files, the command line, process and device counts, python and package versions; and
<UTC time>.diff, a patch that `git apply` on that commit turns into the tree that ran (changes
to tracked files, plus untracked files up to 1 MiB each). One pair per launch, so a resumed run
keeps its history.

The source tree is the directory above the t5x_lite package. In a git checkout, git is asked.
A tree shipped by launch/tpu_vm.sh has no .git: the launcher runs this file (`python3 -I
t5x_lite/rundir/provenance.py archive OUT.tar.gz`) to pack the tree with the same facts at its
root (PROVENANCE.json, PROVENANCE.diff), which record() reads there. Otherwise the facts say
'unknown': a missing git never fails a run. Only the standard library is imported at module
level, because the launcher runs this file without the package's dependencies.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile

UNKNOWN = 'unknown'
ROOT = pathlib.Path(__file__).resolve().parents[2]   # t5x_lite/rundir/provenance.py
ARCHIVE_JSON, ARCHIVE_DIFF = 'PROVENANCE.json', 'PROVENANCE.diff'
MAX_UNTRACKED_IN_DIFF = 1 << 20   # bytes; larger untracked files (data?) are only listed
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy', 'gin-config')


class NotACheckout(ValueError):
  pass


def _git(root: pathlib.Path, *args: str, stdin: bytes | None = None,
         index: str | None = None) -> bytes | None:
  """git's stdout, or None when git is missing or fails (never raises)."""
  env = dict(os.environ, GIT_INDEX_FILE=index) if index else None
  try:
    return subprocess.run(['git', '--literal-pathspecs', '-C', str(root), *args], input=stdin,
                          capture_output=True, check=True, timeout=120, env=env).stdout
  except (OSError, subprocess.SubprocessError):
    return None


def _paths(listing: bytes | None) -> list[str]:
  return sorted({os.fsdecode(p) for p in (listing or b'').split(b'\0') if p})


def _diff(root: pathlib.Path, new_files: list[str]) -> tuple[bytes, list[str]]:
  """`git diff HEAD` on a copy of the index with `new_files` added as intent-to-add: one patch
  of staged, unstaged and new files (the user's own index is not touched); and the new files it
  holds (none if git is older than 2.26, which lacks --pathspec-from-file)."""
  with tempfile.TemporaryDirectory() as tmp:
    index = os.path.join(tmp, 'index')
    real = _git(root, 'rev-parse', '--git-path', 'index')
    try:
      shutil.copyfile(root / os.fsdecode(real.strip()), index)
    except (OSError, AttributeError):  # no index yet (or no git): the commit's own files
      if _git(root, 'read-tree', 'HEAD', index=index) is None:
        return b'', []
    if new_files and _git(root, 'add', '--intent-to-add', '--pathspec-from-file=-',
                          '--pathspec-file-nul', stdin=b'\0'.join(map(os.fsencode, new_files)),
                          index=index) is None:
      new_files = []
    return _git(root, 'diff', '--binary', 'HEAD', index=index) or b'', new_files


def git_source(root: pathlib.Path = ROOT) -> tuple[dict, bytes] | None:
  """(facts, diff) of the git checkout whose top directory is `root`, or None if it is not
  one (a directory inside another checkout, e.g. site-packages in a venv, is not)."""
  top = _git(root, 'rev-parse', '--show-toplevel')
  if top is None or pathlib.Path(os.fsdecode(top.strip())).resolve() != root.resolve():
    return None
  head = _git(root, 'rev-parse', '--verify', '--quiet', 'HEAD^{commit}')
  untracked = _paths(_git(root, 'ls-files', '-z', '--others', '--exclude-standard'))
  small = [p for p in untracked
           if (root / p).is_file() and (root / p).stat().st_size <= MAX_UNTRACKED_IN_DIFF]
  diff, small = _diff(root, small) if head else (b'', [])
  tracked_changes = _git(root, 'diff', '--name-only', '-z', 'HEAD') if head else None
  facts = {'origin': 'git', 'root': str(root),
           'commit': head.decode().strip() if head else UNKNOWN,
           'uncommitted_changes': _paths(tracked_changes) if head else UNKNOWN,
           'untracked': untracked,
           'untracked_not_in_diff': [p for p in untracked if p not in small]}
  return facts, diff


def source(root: pathlib.Path = ROOT) -> tuple[dict, bytes]:
  """(facts, diff) of the tree at `root`: from git, else from the launcher's PROVENANCE files."""
  try:
    got = git_source(root)
    if got is not None:
      return got
    if (root / ARCHIVE_JSON).is_file():
      facts = json.loads((root / ARCHIVE_JSON).read_text())
      diff = (root / ARCHIVE_DIFF).read_bytes() if (root / ARCHIVE_DIFF).is_file() else b''
      return {**facts, 'origin': f'archive ({ARCHIVE_JSON} in {root})'}, diff
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('provenance: could not read the source tree %s (%s)', root, e)
  return {'origin': UNKNOWN, 'root': str(root), 'commit': UNKNOWN}, b''


def versions() -> dict[str, str]:
  out = {'python': sys.version.split()[0]}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = UNKNOWN
  return out


def record(model_dir: str, root: pathlib.Path = ROOT) -> str | None:
  """Writes this launch's provenance under MODEL_DIR/provenance on process 0 (the code of the
  tree at `root`); returns the path of the JSON file (None on other processes)."""
  import jax  # pylint: disable=import-outside-toplevel
  import t5x_lite  # pylint: disable=import-outside-toplevel
  from t5x_lite.rundir import paths  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return None
  facts, diff = source(root)
  now = datetime.datetime.now(datetime.timezone.utc)
  directory = paths.under(model_dir, 'provenance')
  paths.makedirs(directory)
  stem, n = now.strftime('%Y%m%dT%H%M%SZ'), 1
  while paths.exists(paths.under(directory, stem + '.json')):
    stem, n = f'{now:%Y%m%dT%H%M%SZ}-{n}', n + 1
  facts = dict(facts, diff=stem + '.diff' if diff else None)
  info = {'time': now.isoformat(timespec='seconds'), 'command': sys.argv, 'cwd': os.getcwd(),
          'host': socket.gethostname(), 'process_count': jax.process_count(),
          'device_count': jax.device_count(), 'platform': jax.devices()[0].platform,
          # The package's own version: PYTHONPATH (launch/*.sh) may shadow the installed one.
          'versions': {'t5x_lite': t5x_lite.__version__, **versions()}, 'source': facts}
  if diff:
    with paths.open_file(paths.under(directory, stem + '.diff'), 'wb') as f:
      f.write(diff)
  path = paths.under(directory, stem + '.json')
  with paths.open_file(path, 'w') as f:
    json.dump(info, f, indent=2)
  return path


def archive(out: str, root: pathlib.Path = ROOT) -> dict:
  """Packs what `git ls-files -co --exclude-standard` lists (tracked files as they are now,
  untracked files that are not ignored) with PROVENANCE.json/.diff at the top into a tar.gz at
  `out`. Why not an sdist: it holds only the package, not gin_configs/ nor the user's own
  files beside it, and has no commit."""
  got = git_source(root)
  if got is None:
    raise NotACheckout(
        f'{root} is not the top of a git checkout (or git is missing), so there is no list of '
        'files to ship: launch from a clone of t5x_lite (for a plain source tree: git init && '
        'git add -A && git commit -m base), or pass --repo=URL[@REF] for the workers to clone')
  facts, diff = got
  facts = dict(facts, archived=datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'), archived_on=socket.gethostname(), diff=ARCHIVE_DIFF if diff else None)
  names = [p for p in _paths(_git(root, 'ls-files', '-z', '--cached', '--others',
                                  '--exclude-standard'))
           if p not in (ARCHIVE_JSON, ARCHIVE_DIFF) and os.path.lexists(root / p)]
  skipped = [p for p in names if (root / p).is_dir() and not (root / p).is_symlink()]
  for p in skipped:
    print(f'provenance: not shipping {p}/ (a submodule)', file=sys.stderr)
  names = [p for p in names if p not in skipped]
  out_dir = os.path.dirname(os.path.abspath(out))
  with tempfile.NamedTemporaryFile(dir=out_dir, suffix='.tmp', delete=False) as tmp:
    try:
      with tarfile.open(fileobj=tmp, mode='w:gz') as tar:
        for p in names:
          tar.add(root / p, arcname=p, recursive=False)
        for name, data in ((ARCHIVE_JSON, json.dumps(facts, indent=2).encode()),
                           (ARCHIVE_DIFF, diff)):
          info = tarfile.TarInfo(name)
          info.size, info.mode = len(data), 0o644
          tar.addfile(info, io.BytesIO(data))
      tmp.close()
      os.replace(tmp.name, out)   # never a half-written archive at `out`
    except BaseException:
      os.unlink(tmp.name)
      raise
  changed = facts['uncommitted_changes']
  print(f'provenance: {out}: {len(names)} files of {root} at {facts["commit"][:12]} (changed: '
        f'{len(changed) if isinstance(changed, list) else changed}, untracked: '
        f'{len(facts["untracked"])}), '
        f'{os.path.getsize(out) / 1e6:.2f} MB', file=sys.stderr)
  return facts


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[0] != 'archive':
    print('usage: python3 -I t5x_lite/rundir/provenance.py archive OUT.tar.gz', file=sys.stderr)
    return 2
  try:
    archive(argv[1])
  except NotACheckout as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
