"""Paths: local ones made absolute, URLs (gs://, ...) left to etils.epath."""

import os

from t5x_lite.rundir import paths


def test_local_and_remote_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute('run') == str(tmp_path / 'run')
  assert paths.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert paths.join('gs://bucket/run', 'checkpoints') == 'gs://bucket/run/checkpoints'
  paths.makedirs(str(tmp_path / 'a' / 'b'))
  with paths.open_file(str(tmp_path / 'a' / 'b' / 'x.csv'), 'w', newline='') as f:
    f.write('q,a\n')
  assert paths.exists(str(tmp_path / 'a' / 'b' / 'x.csv'))
  assert paths.glob(str(tmp_path / 'a' / '*' / '*.csv')) == [str(tmp_path / 'a' / 'b' / 'x.csv')]
  assert os.path.isdir(tmp_path / 'a')
