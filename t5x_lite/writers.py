"""Metric writers: `metrics.jsonl` (one flat JSON object per line, with `step`) and
TensorBoard event files (tensorboardX: no TensorFlow), both in the model directory and
written by process 0 only."""

from __future__ import annotations

import json
import math
from typing import Mapping

import jax

from t5x_lite import paths

METRICS_FILE = 'metrics.jsonl'


def _jsonable(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)


class MetricsWriter:

  def __init__(self, model_dir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = paths.join(model_dir, METRICS_FILE)
    self._tb = None
    if self.enabled:
      paths.makedirs(model_dir)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(logdir=model_dir)

  def truncate_after(self, step: int) -> None:
    """Drop lines logged after `step`: on resume they are logged again, from the checkpoint."""
    if not self.enabled or not paths.exists(self.path):
      return
    with paths.open_file(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with paths.open_file(self.path, 'w') as f:
      f.writelines(lines)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
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
  """All records of a run's metrics.jsonl, in order."""
  with paths.open_file(paths.join(model_dir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]
