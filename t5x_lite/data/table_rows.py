"""Which rows of a Parquet/Arrow split a task reads: `where` filters and per-value caps.

Both run once per file (filter) or split (cap) per process, vectorised over a column at a
time, before the split's row slice; arrow_sources.py applies them (filter, then cap).

`cap={'task_name': 30000}` keeps at most 30000 rows of each value of the column: every row
of a value with fewer, else a uniform sample of 30000 of its rows, drawn without replacement
with a seed fixed by the column and the cap (the same rows on every run and process). Sampling
the kept rows uniformly then gives each value the rate min(cap, rows), seqio's
examples-proportional rate with a maximum, which Flan 2022 gives each task of a template-type
sub-mixture (google-research/FLAN flan/v2/mixtures_utils.py `register_mixture`: `(task,
min(mix_ex_cap, num_cases))`, caps per collection in flan/v2/mixtures.py
DEFAULT_MIXTURE_MAX_EXAMPLES, commit e9e4ec6e2701182c7a91af176f705310da541277), from one file
holding every task of a collection. One difference: seqio draws an over-cap task's examples
from all its rows at the capped rate; here the same cap-sized sample of them is drawn from.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from t5x_lite.data.sources import DataError


def filter_rows(shard, where: Mapping[str, list]) -> np.ndarray:
  """Rows of `shard` (0-based) whose columns all hold one of the `where` values."""
  rows, start = [], 0
  for g, n in enumerate(shard.group_rows):
    mask = None
    for column, wanted in where.items():
      data = shard.column(g, column)
      try:
        match = pc.is_in(data, value_set=pa.array(wanted))
      except (pa.ArrowException, TypeError) as e:
        raise DataError(f'{shard.label}: where= values {wanted} do not fit column {column!r} '
                        f'of type {data.type} ({e}).') from e
      mask = match if mask is None else pc.and_(mask, match)
    rows.append(np.flatnonzero(mask.to_numpy(zero_copy_only=False)) + start)
    start += n
  return np.concatenate(rows).astype(np.int64)


def contains(rows, row: int) -> bool:
  i = None if isinstance(rows, range) else np.searchsorted(rows, row)   # filtered: increasing
  return row in rows if i is None else (i < len(rows) and rows[i] == row)


def check_cap(cap: Any) -> tuple[str, int]:
  """`cap={'task_name': 30000}` checked: (column, most rows per value)."""
  if (not isinstance(cap, Mapping) or len(cap) != 1 or not isinstance(next(iter(cap)), str)
      or isinstance(next(iter(cap.values())), bool)
      or not isinstance(next(iter(cap.values())), (int, np.integer))
      or next(iter(cap.values())) < 1):
    raise DataError(f"cap maps one column to the most rows kept per value, like "
                    f"{{'task_name': 30000}}; got {cap!r}")
  (column, maximum), = cap.items()
  return column, int(maximum)


def value_codes(shard, column: str) -> tuple[list, np.ndarray]:
  """The distinct values of `column` in `shard` (null included) and each row's index into
  them (int32), read a row group at a time."""
  values: dict = {}
  codes = []
  for g in range(len(shard.group_rows)):
    data = shard.column(g, column)
    if isinstance(data, pa.ChunkedArray):
      data = data.combine_chunks()
    encoded = pc.dictionary_encode(data, null_encoding='encode')
    local = np.array([values.setdefault(v, len(values))
                      for v in encoded.dictionary.to_pylist()] or [0], np.int32)
    codes.append(local[encoded.indices.to_numpy(zero_copy_only=False)])
  return list(values), np.concatenate(codes) if codes else np.zeros(0, np.int32)


def capped_rows(codes: np.ndarray, maximum: int, seed: int) -> np.ndarray:
  """Positions (increasing) into `codes` to keep: all of a value's positions when it has at
  most `maximum`, else `maximum` of them, uniformly without replacement (random order
  within each value, seeded, first `maximum` kept)."""
  order = np.lexsort((np.random.default_rng(seed).random(len(codes)), codes))
  ordered = codes[order]
  starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(codes) else []
  rank = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
  return np.sort(order[rank < maximum])


def cap_seed(column: str, maximum: int) -> int:
  return zlib.crc32(f'{column}\0{maximum}'.encode())
