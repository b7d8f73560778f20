"""Local and remote (gs://, s3://, ...) paths through etils.epath, so a model_dir, a data
file or a checkpoint can live on a bucket (TPU VMs) as well as on disk."""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str) -> bool:
  return '://' in str(path)


def absolute(path: str) -> str:
  """Local paths made absolute (orbax needs them); URLs unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(*parts: str) -> str:
  return str(epath.Path(parts[0]).joinpath(*parts[1:]))


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
