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


@pytest.fixture(scope='session')
def full_run(tmp_path_factory):
  """(model_dir, stdout) of one tiny CLI run shared by the whole session: 10 steps,
  checkpoints [6, 9, 10], the end-of-run eval of 3 examples a task. Read it; copy it to
  change it."""
  from tests.training.test_runs import TINY_RUN, cli, finish  # pylint: disable=import-outside-toplevel
  model_dir = str(tmp_path_factory.mktemp('full'))
  out, _ = finish(cli(['train', f'--model_dir={model_dir}'] + TINY_RUN +
                      ['--gin.loop.TrainConfig.eval_max_examples=3']))
  return model_dir, out
