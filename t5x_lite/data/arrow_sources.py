"""Parquet and Arrow sources: random access by row, memory-mapped, never loaded whole.

ParquetSource: `.parquet` files, globs (`train-*.parquet`, in name order) or directories of
them, as the Flan 2022 sub-mixtures are published. A row maps to (file, row group, offset)
through the metadata's row counts; its group is decoded on demand into a per-process LRU
(256 MB, shared by the tasks reading a file). The pipeline shuffles a task's rows over the
whole split and a group costs ~2 ms/MB to decode (`datasets` writes up to 100 MB ones), so a
file over `max_in_place_bytes` is converted once, a batch at a time, to an uncompressed Arrow
IPC file under $T5X_LITE_CACHE/arrow (as `datasets.load_dataset` does), read memory-mapped.

ArrowSource: what `datasets.Dataset.save_to_disk` writes (huggingface/datasets
src/datasets/arrow_dataset.py: `data-{i:05d}-of-{n:05d}.arrow` through `ArrowWriter`, a
`pa.RecordBatchStreamWriter`, plus `state.json`, whose `_data_files` lists `{"filename"}`s
in order, and `dataset_info.json`; `load_from_disk` needs both and concatenates the files in
that order), or `.arrow` files. A stream cannot be opened with `pa.ipc.open_file`: it is read
with `pa.ipc.open_stream(pa.memory_map(path))`, whose batches point into the mapping
(zero-copy), and indexed by batch offsets. ClassLabel ints become their names (TfdsSource).

`where={'template_type': ['zs_opt', 'fs_opt']}` keeps the rows whose column holds one of the
values (all columns must match), to cut one file into tasks as Flan does: pyarrow.compute
over the filter columns only, once per file and filter per process, before a row slice.
`cap={'task_name': 30000}` then keeps at most 30000 rows per value of the column (a seeded
uniform sample of an over-cap value's rows: Flan's per-task example caps, table_rows.py).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from etils import epath

from t5x_lite.data import table_rows
from t5x_lite.data.sources import (DataError, _BuiltSource, _rename, _split_slice,
                                   _where_error, where_values)
from t5x_lite.rundir import paths


class _Lru:
  """A thread-safe LRU of (value, nbytes), bounded by bytes (at least one entry kept)."""

  def __init__(self, max_bytes: float, max_entries: float = float('inf')):
    self.max_bytes, self.max_entries, self.bytes = max_bytes, max_entries, 0
    self.items, self.lock = collections.OrderedDict(), threading.Lock()

  def get(self, key, load):
    with self.lock:
      if key in self.items:
        self.items.move_to_end(key)
        return self.items[key][0]
    value, nbytes = load()    # outside the lock: decoding releases the GIL
    with self.lock:
      if key not in self.items:
        self.items[key] = (value, nbytes)
        self.bytes += nbytes
      while len(self.items) > 1 and (self.bytes > self.max_bytes or
                                     len(self.items) > self.max_entries):
        self.bytes -= self.items.popitem(last=False)[1][1]
    return value


_groups = _Lru(256 << 20)    # decoded Parquet row groups (set `.max_bytes` to change)
_filters = _Lru(float('inf'), max_entries=256)   # (file, where) -> rows, (file, column) -> codes


def _identity(path: str) -> tuple:   # a file changed on disk is a new file to the caches
  stat = None if paths.is_remote(path) else os.stat(path)
  return (path,) if stat is None else (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


class _Shard:
  """One file of a split: row groups (Parquet) or record batches (Arrow), opened lazily."""
  group_rows: list[int]
  names: list[str]

  def __init__(self, path: str):
    self.path, self.key, self._lock = path, _identity(path), threading.Lock()
    self.label, self._handle = path, None    # label: the file named in errors

  def __getstate__(self):   # a copy (another process) reopens the file
    return {k: v for k, v in self.__dict__.items() if k not in ('_handle', '_lock')}

  def __setstate__(self, state):
    self.__dict__.update(state, _handle=None, _lock=threading.Lock())


class _ParquetShard(_Shard):

  def __init__(self, path: str):
    super().__init__(path)
    meta = self._file().metadata
    self.group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    self.group_bytes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
    self.names = list(self._file().schema_arrow.names)

  def _file(self) -> pq.ParquetFile:
    if self._handle is None:
      try:
        self._handle = (pq.ParquetFile(paths.open_file(self.path, 'rb'))
                        if paths.is_remote(self.path) else
                        pq.ParquetFile(self.path, memory_map=True))
      except (pa.ArrowException, OSError) as e:
        raise DataError(f'{self.path}: not a readable Parquet file ({e}).') from e
    return self._handle

  def _read(self, g: int, columns=None) -> pa.Table:
    with self._lock:
      return self._file().read_row_group(g, columns=columns)

  def columns(self, g: int) -> list:
    def load():
      table = self._read(g)
      return table.columns, table.nbytes
    return _groups.get((self.key, g), load)

  def column(self, g: int, name: str):
    return self._read(g, [name]).column(0)

  def may_have_nulls(self, g: int, name: str) -> bool:   # from the statistics, if written
    group = self._file().metadata.row_group(g)
    chunks = [group.column(j) for j in range(group.num_columns)]
    return any(c.statistics is None or not c.statistics.has_null_count or
               c.statistics.null_count for c in chunks
               if c.path_in_schema == name or c.path_in_schema.startswith(name + '.'))


class _ArrowShard(_Shard):

  def __init__(self, path: str):
    super().__init__(path)
    self.group_rows = [b.num_rows for b in self._batches()]
    self.names = list(self.schema.names)

  def _batches(self) -> list[pa.RecordBatch]:
    if self._handle is None:
      try:
        if paths.is_remote(self.path):    # no memory map on a bucket: read into memory
          with paths.open_file(self.path, 'rb') as f:
            source = pa.BufferReader(f.read())
        else:
          source = pa.memory_map(self.path)
        is_file_format = source.read(6) == b'ARROW1'
        source.seek(0)
        reader = (pa.ipc.open_file if is_file_format else pa.ipc.open_stream)(source)
        batches = ([reader.get_batch(i) for i in range(reader.num_record_batches)]
                   if is_file_format else list(reader))
      except (pa.ArrowException, OSError) as e:
        raise DataError(f'{self.path}: not a readable Arrow IPC file or stream ({e}).') from e
      self.schema, self._handle = reader.schema, batches
    return self._handle

  def columns(self, g: int) -> list:
    return self._batches()[g].columns

  def column(self, g: int, name: str):
    return self._batches()[g].column(name)

  def may_have_nulls(self, g: int, name: str) -> bool:
    return self.column(g, name).null_count > 0   # from the IPC metadata: no data read


class _TableSplit(Sequence[dict]):
  """Rows of a split's files, in order, after `where`, `cap` and the row slice."""

  def __init__(self, spec: str, shards: Sequence[_Shard], field_map: Mapping[str, str] | None,
               required: Sequence[str], where: Mapping[str, Any] | None, rows: slice,
               class_names: Mapping[str, list] | None = None,
               cap: Mapping[str, int] | None = None):
    self.spec, self.shards, self.field_map = spec, list(shards), dict(field_map or {})
    self.class_names = dict(class_names or {})
    needed = sorted(set(required) | set(self.field_map.values()))
    for shard in self.shards:
      missing = [c for c in needed if c not in shard.names]
      if missing:
        raise DataError(f'{shard.label}: missing column(s) {missing}; the file has columns '
                        f'{shard.names}. Fix the file or the field_map.')
    self.starts, self.groups, shard_starts, total = [], [], [], 0   # per (shard, group)
    for s, shard in enumerate(self.shards):
      shard_starts.append(total)
      for g, n in enumerate(shard.group_rows):
        if n:
          self.starts.append(total)
          self.groups.append((s, g))
          total += n
    if not total:
      raise DataError(f'{spec} holds no examples (no rows).')
    kept = self._filter(where, shard_starts) if where else range(total)
    if cap is not None:
      kept = self._cap(cap, np.asarray(kept, np.int64))
    self.rows = kept[rows]
    if not len(self.rows):
      raise DataError(f'{spec} selects no examples (of the {len(kept)} rows'
                      f'{" where= keeps" if where else ""}).')
    self._check_nulls(needed)

  def _filter(self, where: Mapping[str, Any], shard_starts: list[int]) -> np.ndarray:
    where, parts = where_values(where), []
    for shard, start in zip(self.shards, shard_starts):
      for column in where:
        if column not in shard.names:
          raise DataError(f'{shard.label}: where= column {column!r} is not in the file; it '
                          f'has columns {shard.names}.')
      key = (shard.key, tuple((c, tuple(map(repr, v))) for c, v in sorted(where.items())))
      parts.append(_filters.get(key, lambda s=shard: (_filter_rows(s, where), 0)) + start)
    selected = np.concatenate(parts)
    if not len(selected):   # say which values there are (a second pass, on this error only)
      raise _where_error(where, {c: {v for s in self.shards for g in range(len(s.group_rows))
                                     for v in pc.unique(s.column(g, c)).to_pylist()}
                                 for c in where}, self.spec)
    return selected

  def _cap(self, cap: Mapping[str, int], kept: np.ndarray) -> np.ndarray:
    """The rows of `kept` that the per-value cap keeps (table_rows.py), in order."""
    column, maximum = table_rows.check_cap(cap)
    values, codes = {}, []
    for shard in self.shards:
      if column not in shard.names:
        raise DataError(f'{shard.label}: cap= column {column!r} is not in the file; it has '
                        f'columns {shard.names}.')
      local, local_codes = _filters.get((shard.key, 'cap', column), lambda s=shard: (
          table_rows.value_codes(s, column), 0))
      mapping = np.array([values.setdefault(v, len(values)) for v in local] or [0], np.int32)
      codes.append(mapping[local_codes])
    codes = np.concatenate(codes)[kept]
    return kept[table_rows.capped_rows(codes, maximum, table_rows.cap_seed(column, maximum))]

  def _check_nulls(self, needed: Sequence[str]) -> None:
    for (s, g), start in zip(self.groups, self.starts):
      shard = self.shards[s]
      for name in (n for n in needed if shard.may_have_nulls(g, n)):
        nulls = np.flatnonzero(shard.column(g, name).is_null().to_numpy(zero_copy_only=False))
        kept = [int(r) for r in nulls if table_rows.contains(self.rows, int(r) + start)]
        if kept:
          raise DataError(f'{shard.label}: row {kept[0] + sum(shard.group_rows[:g])}: column '
                          f'{name!r} is null; give it a value, or leave the row out (where=, '
                          'a row slice).')

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> dict:
    row = int(self.rows[index])
    i = bisect.bisect_right(self.starts, row) - 1
    (s, g), offset = self.groups[i], row - self.starts[i]
    shard = self.shards[s]
    record = {name: col[offset].as_py() for name, col in zip(shard.names, shard.columns(g))}
    for field, names in self.class_names.items():
      if isinstance(record.get(field), int) and 0 <= record[field] < len(names):
        record[field] = names[record[field]]
    return _rename(record, self.field_map)


_filter_rows = table_rows.filter_rows   # looked up at each call (a test counts the calls)


def _matches(pattern: str) -> list[str]:
  found = paths.glob(pattern)
  if not found:
    raise DataError(f'no file matches {pattern!r}.')
  return found


def save_to_disk_files(directory: str) -> tuple[list[str], dict[str, list]]:
  """The data files of a `datasets.Dataset.save_to_disk` directory, in `load_from_disk`'s
  order (state.json `_data_files`), and the names of its ClassLabel columns."""
  def read_json(name):
    with paths.open_file(paths.join(directory, name), 'r', encoding='utf-8') as f:
      return json.load(f)
  if paths.exists(paths.join(directory, 'dataset_dict.json')):
    splits = read_json('dataset_dict.json').get('splits', [])
    raise DataError(f'{directory} holds a DatasetDict (splits {splits}): name one split\'s '
                    f'directory, e.g. {paths.join(directory, (splits or ["train"])[0])!r}.')
  lacking = [n for n in ('state.json', 'dataset_info.json')
             if not paths.exists(paths.join(directory, n))]
  if lacking:
    raise DataError(f'{directory} is not a directory written by datasets.save_to_disk: it has '
                    f'no {" or ".join(lacking)}.')
  try:
    names = [entry['filename'] for entry in read_json('state.json')['_data_files']]
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f'{directory}/state.json has no valid "_data_files" list ({e!r}).') from e
  absent = [n for n in names if not paths.exists(paths.join(directory, n))]
  if absent or not names:
    raise DataError(f'{directory}/state.json lists data files {names}; missing: {absent}.')
  features = read_json('dataset_info.json').get('features') or {}
  return [paths.join(directory, n) for n in names], {
      name: list(f['names']) for name, f in features.items()
      if isinstance(f, dict) and f.get('_type') == 'ClassLabel' and f.get('names')}


class _TableSource(_BuiltSource):
  """Splits of Parquet or Arrow files (`_files` lists one split's files, shards, labels)."""

  def __init__(self, files: Mapping[str, str], field_map: Mapping[str, str] | None,
               required_fields: Sequence[str], where: Mapping[str, Any] | None,
               cap: Mapping[str, int] | None = None):
    if not files:
      raise DataError(f'{type(self).__name__} needs at least one split file.')
    self.files, self._splits = {}, {}
    for split, spec in files.items():
      pattern, rows = _split_slice(spec)
      self.files[split], shards, class_names = self._files(pattern)
      self._splits[split] = _TableSplit(spec, shards, field_map, required_fields, where, rows,
                                        class_names, cap)

  def __repr__(self):
    return f'{type(self).__name__}({self.files})'


class ParquetSource(_TableSource):
  """Parquet per split: `ParquetSource({'train': 'data/train-*.parquet'})`.

  A split is a file, a glob (files in name order) or a directory of `.parquet` files, with
  an optional row slice (`'train.parquet[:1000]'`, after `where`). `field_map` and
  `required_fields` are JsonlSource's (checked on every file: missing columns, and nulls in
  the rows kept); `where` maps a column to the values to keep, `cap` a column to the most rows
  kept per value (table_rows.py; after `where`, before the slice). A file over
  `max_in_place_bytes` uncompressed is converted once to a memory-mapped Arrow file (module
  docstring); None reads every file in place.
  """

  def __init__(self, files: Mapping[str, str], field_map: Mapping[str, str] | None = None,
               required_fields: Sequence[str] = (), where: Mapping[str, Any] | None = None,
               max_in_place_bytes: int | None = 32 << 20, cap: Mapping[str, int] | None = None):
    self.max_in_place_bytes = max_in_place_bytes
    super().__init__(files, field_map, required_fields, where, cap)

  def _files(self, pattern: str):
    files = []
    for match in _matches(pattern):
      inside = paths.glob(paths.join(match, '*.parquet')) if epath.Path(match).is_dir() else [
          match]
      if not inside:
        raise DataError(f'{match} is a directory with no .parquet file.')
      files += inside
    shards = [_in_place_or_converted(_ParquetShard(f), self.max_in_place_bytes) for f in files]
    return files, shards, {}


class ArrowSource(_TableSource):
  """Arrow per split: a `datasets.save_to_disk` directory, or `.arrow` files / a glob of them
  (stream or file format), with an optional row slice; `field_map`, `required_fields`,
  `where` and `cap` as ParquetSource. ClassLabel ints become their names (`class_label_names`).
  """

  def __init__(self, files: Mapping[str, str], field_map: Mapping[str, str] | None = None,
               required_fields: Sequence[str] = (), where: Mapping[str, Any] | None = None,
               class_label_names: bool = True, cap: Mapping[str, int] | None = None):
    self.class_label_names = class_label_names
    super().__init__(files, field_map, required_fields, where, cap)

  def _files(self, pattern: str):
    files, class_names = [], {}
    for match in _matches(pattern):
      found, labels = save_to_disk_files(match) if epath.Path(match).is_dir() else ([match], {})
      files += found
      class_names.update(labels if self.class_label_names else {})
    return files, [_ArrowShard(f) for f in files], class_names


def _in_place_or_converted(shard: _ParquetShard, max_in_place_bytes: int | None) -> _Shard:
  size = sum(shard.group_bytes)
  if max_in_place_bytes is None or size <= max_in_place_bytes:
    return shard
  from t5x_lite.data import spm_training  # pylint: disable=import-outside-toplevel
  key = json.dumps([*shard.key, shard.group_rows, shard.group_bytes, pa.__version__])
  directory = paths.under(spm_training.cache_dir(), 'arrow')
  target = paths.under(directory, f'{os.path.basename(shard.path)}.'
                       f'{hashlib.sha256(key.encode()).hexdigest()[:16]}.arrow')
  if not os.path.exists(target):
    logging.warning('%s: %.0f MB in row groups of up to %.1f MB, too slow to read at random: '
                    'converting it once to %s', shard.path, size / 2**20,
                    max(shard.group_bytes) / 2**20, target)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
    os.close(fd)
    try:
      source = shard._file()  # pylint: disable=protected-access
      with pa.ipc.new_file(tmp, source.schema_arrow) as writer:
        for batch in source.iter_batches(batch_size=1000, use_threads=False):
          writer.write_batch(batch)
      os.replace(tmp, target)   # whole or absent, also with several processes at once
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  converted = _ArrowShard(target)
  converted.label = f'{shard.path} (as {target})'
  return converted
