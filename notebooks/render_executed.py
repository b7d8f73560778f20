"""Regenerate the executed copy of explore_outputs.ipynb from a `t5x-lite demo` run.

The notebook is stored without outputs (the tests check it); the executed copy beside it,
notebooks/executed/explore_outputs.ipynb, keeps them (figures embedded) so a reader sees the
demo's results without running anything.

  python notebooks/render_executed.py                          # demo into /tmp/t5x_lite_demo
  python notebooks/render_executed.py --model_dir=/tmp/demo    # an existing demo run
  python notebooks/render_executed.py --model_dir=D --gin.TRAIN_STEPS=100   # a short demo

Runs `t5x-lite demo --model_dir=DIR` (unknown flags go to it) when DIR has no evaluated run
(the demo resumes an unfinished one), then executes the notebook with
T5X_LITE_NOTEBOOK_DIR=DIR through nbclient, as tests/test_notebooks.py does, and writes the
copy without nbclient's per-cell timing metadata (it changes on every run).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NOTEBOOK = os.path.join(HERE, 'explore_outputs.ipynb')
EXECUTED = os.path.join(HERE, 'executed', 'explore_outputs.ipynb')


def has_evaluated_run(model_dir: str) -> bool:
  return bool(glob.glob(os.path.join(model_dir, 'eval', '*', '*', 'metrics.json')))


def run_demo(model_dir: str, demo_args: list[str]) -> None:
  command = [sys.executable, '-m', 't5x_lite.cli', 'demo', f'--model_dir={model_dir}']
  print('running', ' '.join(command[2:] + demo_args), flush=True)
  subprocess.run(command + demo_args, cwd=REPO, check=True,
                 env={**os.environ, 'PYTHONPATH': REPO})
  if not has_evaluated_run(model_dir):
    raise SystemExit(f'the demo wrote no eval results to {model_dir}')


def execute(model_dir: str, out: str, timeout: int) -> int:
  """Runs the notebook on `model_dir`, writes it to `out`; returns its number of figures."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  os.environ.update(T5X_LITE_NOTEBOOK_DIR=os.path.abspath(model_dir), PYTHONPATH=REPO)
  NotebookClient(notebook, timeout=timeout, kernel_name='python3',
                 resources={'metadata': {'path': HERE}}).execute()
  figures = 0
  for cell in notebook.cells:
    cell.metadata.pop('execution', None)
    figures += sum('image/png' in o.get('data', {}) for o in cell.get('outputs', ()))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  nbformat.write(notebook, out)
  return figures


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model_dir', default='/tmp/t5x_lite_demo',
                      help='a demo run (made here when it has no eval results)')
  parser.add_argument('--out', default=EXECUTED)
  parser.add_argument('--timeout', type=int, default=1200, help='seconds per cell')
  args, demo_args = parser.parse_known_args()
  if not has_evaluated_run(args.model_dir):
    run_demo(args.model_dir, demo_args)
  elif demo_args:
    parser.error(f'{args.model_dir} already holds an evaluated run: the demo flags '
                 f'{demo_args} would not apply (pick a new --model_dir)')
  figures = execute(args.model_dir, args.out, args.timeout)
  print(f'wrote {args.out}: {figures} figures, '
        f'{os.path.getsize(args.out) / 1e3:.0f} kB (run: {args.model_dir})')


if __name__ == '__main__':
  main()
