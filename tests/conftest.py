"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture
def shared_data():
  """The real data of ../shared/data; tests using it skip where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip('../shared/data is not present')
  return SHARED_DATA
