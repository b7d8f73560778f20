"""Local and remote (gs://, s3://, ...) paths through etils.epath, so a model_dir, a data
file or a checkpoint can live on a bucket (TPU VMs) as well as on disk."""

from __future__ import annotations

import os
import posixpath

from etils import epath

from t5x_lite import errors


class OutsideRoot(errors.UserError, ValueError):
  """A path derived from a name that would leave the directory it belongs under."""


def is_remote(path: str) -> bool:
  return '://' in str(path)


def absolute(path: str) -> str:
  """Local paths made absolute (orbax needs them); URLs unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(*parts: str) -> str:
  return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def under(root: str, *parts: str) -> str:
  """`root` joined with `parts`, refused (OutsideRoot) unless the result, normalised, stays
  inside `root`: every path the library derives from a name (task, mixture, eval set, split,
  step) under MODEL_DIR or the cache is built here, so an absolute part or a `..` cannot
  move a write elsewhere, whatever checks the name passed before."""
  for part in parts:
    if not isinstance(part, str) or not part or part.startswith('/') or '\\' in part or (
        is_remote(part)):
      raise OutsideRoot(f'{part!r} cannot be a path under {root}: it is empty, absolute or '
                        'holds a backslash or a URL')
  joined = join(root, *parts)
  norm = posixpath.normpath if is_remote(root) else os.path.normpath
  base, result = norm(str(root)), norm(joined)
  if result == base or not result.startswith(base.rstrip('/') + '/'):
    raise OutsideRoot(f'{"/".join(parts)!r} leaves {root}: a path made from a name must stay '
                      'under its directory (names may not hold "/" or "..")')
  return joined


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def remove(path: str) -> None:
  """Delete a file if it exists."""
  epath.Path(path).unlink(missing_ok=True)


def open_file(path: str, mode: str = 'r', **kwargs):
  """`open` for local files (all its keywords, e.g. csv's newline=''), epath for URLs."""
  if not is_remote(path):
    return open(path, mode, **kwargs)  # pylint: disable=unspecified-encoding
  kwargs.pop('newline', None)
  return epath.Path(path).open(mode, **kwargs)


def glob(pattern: str) -> list[str]:
  """Files matching a glob pattern, locally or on a bucket."""
  if not is_remote(pattern):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  directory, name = pattern.rsplit('/', 1)
  return sorted(str(p) for p in epath.Path(directory).glob(name))
