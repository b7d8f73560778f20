"""Metric writers: `metrics.jsonl` (one flat JSON object per line, with `step`) and
TensorBoard event files (tensorboardX: no TensorFlow), both in the model directory and
written by process 0 only.

A kill can stop a write half-way: readers drop a half-written (unparseable) line with a
warning naming the file, and every rewrite of the file goes through a temporary file and a
rename, so a kill during a rewrite leaves the old file or the new one, never less.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Mapping

import jax
from etils import epath

from t5x_lite.rundir import paths

METRICS_FILE = 'metrics.jsonl'


def _jsonable(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)


def write_text_atomic(path: str, text: str) -> None:
  """Writes `path` whole or not at all: a temporary file beside it, then a rename (atomic on
  a local filesystem; on a bucket the object appears only once complete)."""
  temporary = f'{path}.tmp-{os.getpid()}'
  with paths.open_file(temporary, 'w') as f:
    f.write(text)
    if not paths.is_remote(path):
      f.flush()
      os.fsync(f.fileno())
  if paths.is_remote(path):
    epath.Path(temporary).rename(path)
  else:
    os.replace(temporary, path)


def _parse_lines(path: str) -> list[tuple[str, dict]]:
  """(line, record) of each line of a JSONL file; a line that is not a JSON object (what a
  kill during a write leaves) is dropped with a warning naming the file."""
  out = []
  with paths.open_file(path) as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict) or 'step' not in record:
        logging.warning('%s:%d: dropped a half-written line (%d characters): %.60r', path,
                        line_no, len(line), line)
        continue
      out.append((line if line.endswith('\n') else line + '\n', record))
  return out


class MetricsWriter:

  def __init__(self, model_dir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = paths.join(model_dir, METRICS_FILE)
    self._tb = None
    if self.enabled:
      paths.makedirs(model_dir)
      self._drop_half_line()
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(logdir=model_dir)

  def _drop_half_line(self) -> None:
    """A file ending without a newline ends with a half-written line: rewrite it without, so
    the next record does not join it."""
    if not paths.exists(self.path):
      return
    with paths.open_file(self.path, 'rb') as f:
      data = f.read()
    if data and not data.endswith(b'\n'):
      self.rewrite(lambda record: True)

  def rewrite(self, keep: Callable[[dict], bool]) -> None:
    """Keeps only the records `keep` accepts (and drops unparseable lines), atomically."""
    if not self.enabled or not paths.exists(self.path):
      return
    write_text_atomic(self.path, ''.join(line for line, record in _parse_lines(self.path)
                                         if keep(record)))

  def truncate_after(self, step: int) -> None:
    """Drop records logged after `step`: a run restarting from `step` logs them again."""
    self.rewrite(lambda r: r['step'] <= step)

  def write(self, step: int, scalars: Mapping[str, float], replaces: str | None = None) -> None:
    """Appends a record; with `replaces`, first drops an earlier record of `step` with keys
    starting with it (an eval of that step done again: one line per step and eval)."""
    if not self.enabled:
      return
    if replaces and paths.exists(self.path):
      stale = lambda r: r['step'] == step and any(k.startswith(replaces) for k in r)
      if any(stale(r) for _, r in _parse_lines(self.path)):
        self.rewrite(lambda r: not stale(r))
    record = {'step': int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    with paths.open_file(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, float(value), int(step))
      self._tb.flush()

  def event(self, step: int, name: str, **fields) -> None:
    """A record that is not a metric, e.g. {'step': 300, 'event': 'mixture_changed', ...}:
    metrics.jsonl only (readers select metrics by key and pass over it)."""
    if self.enabled:
      with paths.open_file(self.path, 'a') as f:
        f.write(json.dumps({'step': int(step), 'event': name, **fields}) + '\n')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(model_dir: str) -> list[dict]:
  """All records of a run's metrics.jsonl, in order (a half-written line dropped, with a
  warning)."""
  return [record for _, record in _parse_lines(paths.join(model_dir, METRICS_FILE))]
