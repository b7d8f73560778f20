"""Data sources: random-access splits of raw examples (dicts of text fields), no TensorFlow.

Every source maps a split name to a sequence (`len` + `__getitem__`), which grain's
`MapDataset.source` reads directly. Bad files fail when the source is built, naming the
file and line, never halfway through training.
"""

from __future__ import annotations

import abc
import csv
import json
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from etils import epath

from t5x_lite import errors
from t5x_lite.rundir import paths


class DataError(errors.UserError, ValueError):
  """A data file or source that cannot be used as given."""


class DataSource(abc.ABC):
  """Splits of raw examples."""

  @property
  @abc.abstractmethod
  def splits(self) -> tuple[str, ...]:
    ...

  @abc.abstractmethod
  def split(self, name: str) -> Sequence[dict]:
    """Random-access view of one split."""

  def num_examples(self, split: str) -> int:
    return len(self.split(split))

  def _check_split(self, name: str) -> None:
    if name not in self.splits:
      raise DataError(f'{self} has no split {name!r}; it has {list(self.splits)}')


class _BuiltSource(DataSource):
  """A source whose splits are built when it is constructed, in `self._splits`."""
  _splits: dict

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self._splits)

  def split(self, name: str) -> Sequence[dict]:
    self._check_split(name)
    return self._splits[name]


def _rename(record: Mapping[str, Any], field_map: Mapping[str, str] | None) -> dict:
  """field_map maps template field -> source field."""
  if not field_map:
    return dict(record)
  out = dict(record)
  for ours, theirs in field_map.items():
    out[ours] = record[theirs]
  return out


def where_values(where: Mapping[str, Any]) -> dict[str, list]:
  """`where={'column': value or [values]}` checked: column -> the values a kept row may hold
  (every column must match)."""
  if not isinstance(where, Mapping) or not where:
    raise DataError(f"where must map a column to its values, like {{'task_name': ['a', 'b']}}; "
                    f'got {where!r}')
  out = {}
  for column, values in where.items():
    values = [values] if isinstance(values, (str, int, float, bool)) else list(values)
    if not isinstance(column, str) or not values:
      raise DataError(f'where: {column!r} needs a column name and at least one value, got '
                      f'{values!r}')
    out[column] = values
  return out


def _where_error(where: Mapping, found: Mapping[str, set], what: str) -> DataError:
  def first(values, n=10):
    shown = sorted(values, key=repr)[:n]
    return f'values {shown}' + (f' (first {n} of {len(values)})' if len(values) > n else '')
  described = '; '.join(f'column {c!r} has {first(found[c])}' for c in where)
  return DataError(f'{what}: where={dict(where)} selects no rows; {described}.')


# --- JSONL / CSV ---------------------------------------------------------------------------

class _JsonlSplit(Sequence[dict]):
  """Lines of JSONL files (one, or several read one after the other), indexed by (file, byte
  offset): validated once, parsed on access."""

  def __init__(self, files: Sequence[str], field_map: Mapping[str, str] | None,
               required: Sequence[str], rows: slice = slice(None),
               where: Mapping[str, Any] | None = None, label: str | None = None):
    self.paths, self.field_map = list(files), dict(field_map or {})
    label = label or self.paths[0]
    needed = set(required) | set(self.field_map.values())
    where = where_values(where) if where else {}
    found = {c: set() for c in where}
    lines, offsets = 0, []
    for path in self.paths:
      kept = []
      with paths.open_file(path, 'rb') as f:
        offset = 0
        for line_no, raw in enumerate(f, start=1):
          if raw.strip():
            record = _parse_jsonl_line(raw, path, line_no)
            lines += 1
            if not _where_keeps(record, where, found, f'{path}:{line_no}'):
              offset += len(raw)
              continue
            missing = needed - set(record)
            if missing:
              raise DataError(f'{path}:{line_no}: missing field(s) {sorted(missing)}; the line '
                              f'has {sorted(record)}. Fix the file or the field_map.')
            null = sorted(f for f in needed if record[f] is None)
            if null:   # a template would render it as the text 'None'
              raise DataError(f'{path}:{line_no}: field(s) {null} are null; give them a value '
                              'or drop the line.')
            kept.append(offset)
          offset += len(raw)
      offsets.append(np.asarray(kept, np.int64))
    if not lines:
      raise DataError(f'{label} holds no examples (empty file'
                      f'{"s" if len(self.paths) > 1 else ""}).')
    self.offsets = np.concatenate(offsets)
    self.file_ids = np.repeat(np.arange(len(self.paths), dtype=np.int32),
                              [len(o) for o in offsets])
    if not len(self.offsets):   # only where= can have dropped every line
      raise _where_error(where, found, label)
    self.offsets, self.file_ids = self.offsets[rows], self.file_ids[rows]
    if not len(self.offsets):
      raise DataError(f'{label}[{rows.start}:{rows.stop}] selects no examples.')

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, index: int) -> dict:
    with paths.open_file(self.paths[self.file_ids[index]], 'rb') as f:
      f.seek(int(self.offsets[index]))
      return _rename(json.loads(f.readline()), self.field_map)


def _where_keeps(record: Mapping, where: Mapping[str, list], found: Mapping[str, set],
                 at: str) -> bool:
  """Whether `record` passes `where` (recording the values seen, for _where_error)."""
  keep = True
  for column, values in where.items():
    if column not in record:
      raise DataError(f'{at}: where= column {column!r} is not in the row; it has '
                      f'{sorted(record)}.')
    value = record[column]
    found[column].add(value if isinstance(value, (str, int, float, bool)) else repr(value))
    keep = keep and value in values
  return keep


def _parse_jsonl_line(raw: bytes, path: str, line_no: int) -> dict:
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start}).') from e
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}:{line_no}: not valid JSON ({e.msg}).') from e
  if not isinstance(record, dict):
    raise DataError(f'{path}:{line_no}: expected a JSON object, got {type(record).__name__}.')
  return record


_SLICE = re.compile(r'^(?P<path>.*)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$')


def _split_slice(spec: str) -> tuple[str, slice]:
  """'file.jsonl[100:]' -> ('file.jsonl', slice(100, None)): a split made of part of a file
  (e.g. validation = the first 100 lines of a test-only dataset, train = the rest)."""
  match = _SLICE.match(spec)
  if not match:
    return spec, slice(None)
  to_int = lambda x: int(x) if x else None  # noqa: E731
  return match['path'], slice(to_int(match['start']), to_int(match['stop']))


def _resolve(pattern: str) -> str:
  matches = paths.glob(pattern)
  if not matches:
    raise DataError(f'no file matches {pattern!r}.')
  if len(matches) > 1:
    raise DataError(f'{pattern!r} matches {len(matches)} files; give one file per split.')
  return matches[0]


class JsonlSource(_BuiltSource):
  """JSONL per split: `JsonlSource({'train': 'train.jsonl', ...})`.

  `field_map` renames source fields for the templates ({'sentence': 'text'} makes the
  source's `text` available as `{sentence}`); `required_fields` are checked on every line.
  A split is a file, a glob or a directory (its `.jsonl` files): several files are read one
  after the other, in name order (`files[split]` is then their list), as one split. It may
  end in a slice of its lines: `'test.jsonl[:100]'` (of the lines `where` keeps:
  `where={'task_name': ['a', 'b']}` keeps the lines whose field is one of the values; the
  fields checked on the lines kept only).
  """

  def __init__(self, files: Mapping[str, str], field_map: Mapping[str, str] | None = None,
               required_fields: Sequence[str] = (), where: Mapping[str, Any] | None = None):
    if not files:
      raise DataError('JsonlSource needs at least one split file.')
    self.files, self._splits = {}, {}
    for split, spec in files.items():
      pattern, rows = _split_slice(spec)
      found = _jsonl_files(pattern)
      self.files[split] = found[0] if len(found) == 1 else found
      label = found[0] if len(found) == 1 else f'{pattern} ({len(found)} files)'
      self._splits[split] = _JsonlSplit(found, field_map, required_fields, rows, where, label)

  def __repr__(self):
    return f'JsonlSource({self.files})'


def _jsonl_files(pattern: str) -> list[str]:
  """The files of a JSONL split: a file, a glob's matches, a directory's `.jsonl` files."""
  files = []
  for match in paths.glob(pattern):
    if epath.Path(match).is_dir():
      inside = paths.glob(paths.join(match, '*.jsonl'))
      if not inside:
        raise DataError(f'{match} is a directory with no .jsonl file.')
      files += inside
    else:
      files.append(match)
  if not files:
    raise DataError(f'no file matches {pattern!r}.')
  return files


class CsvSource(_BuiltSource):
  """One CSV (or TSV) file per split with a header row; rows become dicts of strings.
  A file name may end in a slice of its rows: `'train.csv[1000:]'` (of the rows `where`
  keeps; its values compare as strings)."""

  def __init__(self, files: Mapping[str, str], field_map: Mapping[str, str] | None = None,
               required_fields: Sequence[str] = (), delimiter: str = ',',
               where: Mapping[str, Any] | None = None):
    if not files:
      raise DataError('CsvSource needs at least one split file.')
    self.files, self._splits = {}, {}
    for split, spec in files.items():
      path, rows = _split_slice(spec)
      self.files[split] = _resolve(path)
      self._splits[split] = self._read(self.files[split], field_map, required_fields,
                                       delimiter, where)[rows]
      if not self._splits[split]:
        raise DataError(f'{spec} selects no examples.')

  @staticmethod
  def _read(path, field_map, required, delimiter, where=None):
    where = {c: [str(v) for v in vs] for c, vs in where_values(where).items()} if where else {}
    found = {c: set() for c in where}
    try:
      with paths.open_file(path, 'r', encoding='utf-8', newline='') as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        needed = set(required) | set((field_map or {}).values())
        missing = (needed | set(where)) - set(reader.fieldnames or [])
        if missing:
          raise DataError(f'{path}: missing column(s) {sorted(missing)}; header has '
                          f'{reader.fieldnames}.')
        rows, seen = [], 0
        for row in reader:
          seen += 1
          if not _where_keeps(row, where, found, f'{path}:{reader.line_num}'):
            continue
          short = sorted(f for f in needed if row[f] is None)
          if short:   # DictReader fills the columns a short row lacks with None
            raise DataError(f'{path}:{reader.line_num}: the row has no value for column(s) '
                            f'{short}.')
          rows.append(_rename(row, field_map))
    except UnicodeDecodeError as e:
      raise DataError(f'{path}: not valid UTF-8 ({e.reason} at byte {e.start}).') from e
    if not seen:
      raise DataError(f'{path} holds no examples.')
    if not rows:
      raise _where_error(where, found, path)
    return rows

  def __repr__(self):
    return f'CsvSource({self.files})'


# --- TFDS ---------------------------------------------------------------------------------

class _TfdsSplit(Sequence[dict]):
  def __init__(self, source, field_map, class_names):
    self.source, self.field_map, self.class_names = source, field_map, class_names

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = {k: _decode(v) for k, v in self.source[index].items()}
    for field, names in self.class_names.items():
      record[field] = names[int(record[field])]
    return _rename(record, self.field_map)


def _decode(value):
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray) and value.dtype.kind in 'SO':
    return [_decode(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  return value


class TfdsSource(_BuiltSource):
  """A TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow).

  Bytes become str and, with `class_label_names`, ClassLabel ints become their names so
  templates can use them as answers.
  """

  def __init__(self, name: str, data_dir: str | None = None,
               splits: Sequence[str] | None = None, field_map: Mapping[str, str] | None = None,
               class_label_names: bool = True):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.name, self.data_dir = name, data_dir
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      available = list(builder.info.splits)
    except Exception as e:  # tfds raises several error types for missing data
      raise DataError(f'TFDS dataset {name!r} is not prepared under data_dir={data_dir!r}: '
                      f'{e}') from e
    wanted = list(splits or available)
    unknown = set(wanted) - set(available)
    if unknown:
      raise DataError(f'TFDS dataset {name!r} has splits {available}, not {sorted(unknown)}.')
    class_names = {}
    if class_label_names:
      for field, feature in builder.info.features.items():
        if isinstance(feature, tfds.features.ClassLabel):
          class_names[field] = list(feature.names)
    self._splits = {s: _TfdsSplit(tfds.data_source(name, split=s, data_dir=data_dir), field_map,
                                  class_names) for s in wanted}

  def __repr__(self):
    return f'TfdsSource({self.name!r}, data_dir={self.data_dir!r})'


# --- generated ----------------------------------------------------------------------------

def split_seed(split: str) -> int:
  return zlib.crc32(split.encode())


class _GeneratedSplit(Sequence[dict]):
  def __init__(self, fn, split, size, seed):
    self.fn, self.split_name, self.size, self.seed = fn, split, size, seed

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    if not 0 <= index < self.size:
      raise IndexError(index)  # internal
    rng = np.random.default_rng([self.seed, split_seed(self.split_name), index])
    return self.fn(rng, self.split_name)


class GeneratedSource(DataSource):
  """Examples made by `fn(rng, split) -> dict`, with `rng` seeded by (seed, split, index):
  the same index always gives the same example, with no files and no downloads."""

  def __init__(self, fn: Callable[[np.random.Generator, str], dict],
               num_examples: Mapping[str, int], seed: int = 0):
    if not num_examples or any(n <= 0 for n in num_examples.values()):
      raise DataError(f'GeneratedSource needs a positive size per split, got {num_examples}.')
    self.fn, self.sizes, self.seed = fn, dict(num_examples), seed

  @property
  def splits(self):
    return tuple(self.sizes)

  def split(self, name):
    self._check_split(name)
    return _GeneratedSplit(self.fn, name, self.sizes[name], self.seed)

  def __repr__(self):
    return f'GeneratedSource({getattr(self.fn, "__name__", self.fn)}, {self.sizes})'
