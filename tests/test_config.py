"""Gin parsing: the repository's includes resolve from any working directory, quietly."""

import logging
import os
import sys

import gin
import pytest

from t5x_lite import config as gin_config, errors


@pytest.fixture
def clean_gin(tmp_path, monkeypatch):
  """An installed package's view, run from an empty directory: pytest puts the repository
  root on sys.path, where `gin_configs/` would import as a namespace package, on which gin's
  package-resource reader crashes (spec.origin is None)."""
  root = os.path.realpath(gin_config.REPO_ROOT)
  monkeypatch.setattr(sys, 'path', [p for p in sys.path
                                    if p and os.path.realpath(p) != root])
  monkeypatch.chdir(tmp_path)
  gin.clear_config()
  yield
  gin.clear_config()


def test_repository_include_from_another_directory_logs_no_error(tmp_path, caplog, clean_gin):
  # no gin_configs/ in the cwd: gin's first search path (the cwd) misses
  (tmp_path / 'run.gin').write_text("include 'gin_configs/meshes/dp.gin'\n")
  with caplog.at_level(logging.INFO):
    gin_config.parse_gin(['run.gin'])
  assert gin_config.macro('PARTITIONING') == 'dp'
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
  assert gin_config._not_a_search_miss not in logging.getLogger().filters


def test_missing_include_still_fails(tmp_path, clean_gin):
  (tmp_path / 'run.gin').write_text("include 'gin_configs/meshes/no_such_mesh.gin'\n")
  with pytest.raises(errors.UserError, match=r'run.gin:1: gin file .*no_such_mesh.gin not found'):
    gin_config.parse_gin(['run.gin'])
  assert gin_config._not_a_search_miss not in logging.getLogger().filters
