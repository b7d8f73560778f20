"""The notebooks run top to bottom (tiny config, few steps) and are stored without outputs;
explore_outputs.ipynb's executed copy (notebooks/render_executed.py) is the current notebook
with its figures."""

import os

import nbformat
import pytest
from nbclient import NotebookClient
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ('quickstart.ipynb', 'explore_outputs.ipynb')
EXECUTED = os.path.join(REPO, 'notebooks', 'executed', 'explore_outputs.ipynb')
EXPLORE_FIGURES = 5   # loss, eval curves, held-out vs seen, per language, per template


def _outputs(notebook):
  return [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]


def _figures(notebook):
  return [o for o in _outputs(notebook) if 'image/png' in o.get('data', {})]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  notebook = nbformat.read(os.path.join(REPO, 'notebooks', name), as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  monkeypatch.setenv('T5X_LITE_NOTEBOOK_STEPS', '30')
  monkeypatch.setenv('T5X_LITE_NOTEBOOK_DIR', str(tmp_path / 'run'))
  monkeypatch.setenv('PYTHONPATH', REPO)
  monkeypatch.setenv('XLA_FLAGS', xla_flags())  # one CPU device, as a user's notebook has
  notebook = nbformat.read(os.path.join(REPO, 'notebooks', name), as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  text = '\n'.join(o.get('text', '') for o in _outputs(notebook))
  if name == 'quickstart.ipynb':
    assert 'builtin_sort' in text and 'segment 1' in text and 'greedy' in text
  else:  # the fallback run has every result a plot needs: 3 named sets, 2 evals, a best step
    assert 'step 15: seen' in text and 'step 30: seen' in text and 'heldout_tasks' in text
    assert 'best checkpoint: step' in text and 'no per-' not in text
    assert len(_figures(notebook)) == EXPLORE_FIGURES


def test_executed_copy_is_the_current_notebook_with_figures():
  source = nbformat.read(os.path.join(REPO, 'notebooks', 'explore_outputs.ipynb'), as_version=4)
  executed = nbformat.read(EXECUTED, as_version=4)
  assert [c.source for c in executed.cells] == [c.source for c in source.cells], (
      'the executed copy is stale: python notebooks/render_executed.py --model_dir=<demo run>')
  assert not [o for o in _outputs(executed) if o.output_type == 'error']
  assert len(_figures(executed)) == EXPLORE_FIGURES
  assert os.path.getsize(EXECUTED) < 1_000_000
