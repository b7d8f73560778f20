"""The notebooks run top to bottom (tiny config, few steps) and are stored without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ('quickstart.ipynb', 'explore_outputs.ipynb')


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
  monkeypatch.setenv('XLA_FLAGS', '')  # one CPU device, as a user's notebook has
  notebook = nbformat.read(os.path.join(REPO, 'notebooks', name), as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  text = '\n'.join(o.get('text', '') for c in notebook.cells if c.cell_type == 'code'
                   for o in c.outputs)
  if name == 'quickstart.ipynb':
    assert 'builtin_sort' in text and 'segment 1' in text and 'greedy' in text
  else:
    assert 'task_losses.png' in text and 'step 30' in text
    assert os.path.exists(tmp_path / 'run' / 'task_losses.png')
