"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

# LLVM's optimisation passes off (HLO passes, fusion, layouts and sharding unchanged): the
# suite is XLA:CPU compile-bound and its programs are tiny; this cuts the compile time of a
# sharded train step by ~15%. Subprocesses the tests start use the same flags (xla_flags).
COMPILE_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process a test starts: the suite's compile flags, `devices` fake CPU
  devices (None: one, as a user's machine has)."""
  count = f' --xla_force_host_platform_device_count={devices}' if devices else ''
  return COMPILE_FLAGS + count


os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags(8)).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def _shared_compilation_cache() -> None:
  """One persistent jax compilation cache for the whole test session: this process, the
  CLI runs it starts (they inherit the environment) and pytest-xdist's workers (started by
  the process that loaded this file first). The suite compiles the same tiny programs in
  dozens of processes; a cache hit gives the same executable, so no assertion changes.
  Fresh per session (a new temporary directory, removed at exit by its creator)."""
  if os.environ.get('T5X_LITE_TEST_JAX_CACHE'):
    return
  import atexit  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  directory = tempfile.mkdtemp(prefix='t5x_lite_jax_cache_')
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  os.environ.update(T5X_LITE_TEST_JAX_CACHE=directory, JAX_COMPILATION_CACHE_DIR=directory,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')


_shared_compilation_cache()

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
  change it. Under pytest-xdist the first worker to need it makes it, the others wait for
  it and read the same directory (a file lock in the session's shared temporary root)."""
  from filelock import FileLock  # pylint: disable=import-outside-toplevel
  from tests.training.test_runs import TINY_RUN, cli, finish  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent   # shared by the workers of this session
  model_dir, stdout = root / 'full_run', root / 'full_run.stdout'
  with FileLock(str(root / 'full_run.lock')):
    if not stdout.exists():
      out, _ = finish(cli(['train', f'--model_dir={model_dir}'] + TINY_RUN +
                          ['--gin.loop.TrainConfig.eval_max_examples=3']))
      stdout.write_text(out)
  return str(model_dir), stdout.read_text()


# The slowest modules first (serial seconds on a 2-core host, --durations=0): pytest-xdist's
# `--dist loadfile` hands each worker whole modules in collection order, so a slow module
# collected last would leave one worker running it alone at the end.
SLOWEST_FIRST = ('training/test_sharding.py', 'training/test_runs.py',   # 190 s, 162 s
                 'reliability/test_results.py', 'test_decoding.py',       # 150 s, 92 s
                 'reliability/test_checkpoints.py', 'training/test_plan.py',   # 91 s, 81 s
                 'test_notebooks.py', 'peft/test_training.py', 'training/test_guard.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  def key(item):
    path = item.nodeid.split('::')[0].removeprefix('tests/')
    return rank.get(path, len(rank))
  items.sort(key=key)   # stable: the order within a module and among the rest is kept
