"""A checkpoint's `data` item: the data iterator's state, one `shard_<s>-of-<S>.json` per data
shard, and the checksums that verify it.

Every process writes the files of the shards it reads; a restore reads the files of the shards
the process reads now, whoever wrote them, so a run resumes with any process count that
divides its `num_data_shards`. (grain's CheckpointHandler writes one file per process and
restores only in the same process count; checkpoints it wrote, `process_<p>-of-<P>.json`, are
still read.)

The meta item, written by process 0 alone, records a checksum (sha256) of every file, gathered
from the processes that wrote them (`record`); `problem` checks each file the meta names,
whichever process reads it: a missing file, changed bytes, a half-written file are damage. A
checkpoint written before the checksums were recorded is checked for what a file must hold
(parsable JSON, every shard's entry with its keys) and restores unverified.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from t5x_lite.data import iterator as iterator_lib
from t5x_lite.data.sources import DataError
from t5x_lite.training import checksums

_SHARD = re.compile(r'shard_(\d+)-of-(\d+)\.json')
_KEYS = ('batches', 'iterator', 'stats')   # what every shard file holds
_LEGACY_KEYS = ('shards', 'iterators', 'stats', 'batches')   # grain's process_<p>-of-<P>.json


def shard_file(shard: int, num_shards: int) -> str:
  return f'shard_{shard:05d}-of-{num_shards:05d}.json'


def files_of(state: dict) -> dict[str, str]:
  """{file name: text} of this process's shards in DataIterator.get_state()'s `state`."""
  return {shard_file(int(s), state['num_shards']): json.dumps({'batches': state['batches'], **e})
          for s, e in state['shards'].items()}


def record(files: dict[str, str]) -> dict[str, str]:
  """{file name: sha256} of the files of every process (each process passes its own `files`;
  all take part). The digests travel as fixed-size arrays: [shard id, 8 words of sha256]."""
  if not files:   # no shards here, hence none anywhere (every process reads as many)
    return {}
  rows = []
  for name, text in sorted(files.items()):
    shard, _ = map(int, _SHARD.fullmatch(name).groups())
    words = np.frombuffer(bytes.fromhex(checksums.digest(text)), '>u4').astype(np.uint32)
    rows.append(np.concatenate([np.array([shard], np.uint32), words]))
  rows = np.stack(rows)
  if jax.process_count() > 1:   # every process holds as many shards (pipeline.py)
    rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1, rows.shape[1])
  num_shards = int(_SHARD.fullmatch(next(iter(files))).group(2))
  return {shard_file(r[0], num_shards): np.array(r[1:], '>u4').tobytes().hex()
          for r in sorted(rows.tolist())}


def problem(directory: epath.Path, recorded: dict[str, str] | None) -> str | None:
  """Why the data state in `directory` (a checkpoint's data/) is damaged, in one line, or
  None. `recorded`: the meta's checksums ({file name: sha256}; None: an older checkpoint)."""
  if recorded is not None:
    missing = [n for n in sorted(recorded) if not (directory / n).exists()]
    if missing:
      return _files(missing, 'is missing', 'are missing')
    changed = [n for n in sorted(recorded)
               if checksums.digest((directory / n).read_bytes()) != recorded[n]]
    if changed:
      return _files(changed, 'differs', 'differ') + ' from the checksums recorded when it was saved'
    return None
  files = sorted(directory.glob('*.json')) if directory.exists() else []
  if not files:
    return 'data/ holds no data-iterator state'
  shards = {}
  for path in files:
    try:
      entry = json.loads(path.read_text())
    except (ValueError, OSError) as e:
      return f'the data-iterator state data/{path.name} is unreadable ({_first_line(e)})'
    match = _SHARD.fullmatch(path.name)
    keys = _KEYS if match else _LEGACY_KEYS if path.name.startswith('process_') else ()
    lost = [k for k in keys if not isinstance(entry, dict) or k not in entry]
    if lost:
      return f'the data-iterator state data/{path.name} lacks {", ".join(lost)}'
    if match:
      shards[path.name] = int(match.group(2))
  for num_shards in sorted(set(shards.values())):
    missing = [shard_file(s, num_shards) for s in range(num_shards)
               if shard_file(s, num_shards) not in shards]
    if missing:
      return _files(missing, 'is missing', 'are missing')
  return None


def _files(names: list[str], one: str, several: str) -> str:
  shown = ', '.join(f'data/{n}' for n in names[:3]) + (', ...' if len(names) > 3 else '')
  return f'the data-iterator state {shown} {one if len(names) == 1 else several}'


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class DataStateHandler:
  """Orbax handler of the `data` item (see the module docstring)."""

  def save(self, directory, item=None, args=None):
    files = args.files if args is not None else item
    for name, text in (files or {}).items():   # params-only checkpoints carry none
      (directory / name).write_text(text)

  def restore(self, directory, item=None, args=None):
    iterator = args.iterator if args is not None else item
    files = {int(m.group(1)): (int(m.group(2)), path) for path in directory.glob('shard_*.json')
             if (m := _SHARD.fullmatch(path.name))}
    if files:
      saved = next(iter(files.values()))[0]
      entries = {str(s): json.loads(files[s][1].read_text())
                 for s in iterator.shard_ids if s in files}
      state = {'num_shards': saved, 'shards': entries,
               'batches': next(iter(entries.values()))['batches'] if entries else 0}
    else:
      state = iterator_lib.merge_states(_legacy_states(directory))
    iterator.set_state(state)   # a DataError naming another shard count or a lost shard
    return iterator

  def structure(self, directory):
    del directory

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f'{cls.__module__}.{cls.__qualname__}'


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  files: dict[str, str] | None   # files_of(DataIterator.get_state()), taken at the save call


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  iterator: Any        # a data.iterator.DataIterator, restored in place


def _legacy_states(directory) -> list[dict]:
  """Per-process states written by grain's handler, in today's per-shard layout."""
  states = [json.loads(p.read_text()) for p in sorted(directory.glob('process_*-of-*.json'))]
  if not states or not all(states):
    raise DataError(f'no data iterator state in {directory}')
  num_shards = sum(len(s['shards']) for s in states)
  return [{'num_shards': num_shards, 'batches': s['batches'],
           'shards': {str(shard): {'iterator': it, 'stats': s['stats'] if i == 0 else {}}
                      for i, (shard, it) in enumerate(zip(s['shards'], s['iterators']))}}
          for s in states]
