"""The import graph of t5x_lite: no cycles, and imports point one way (DESIGN.md, issue #29).

The graph is built statically with `ast` from every module of the package. An edge
`a -> b` means that running module `a` (at import time or later, inside a function: a lazy
import that hides a cycle is still a cycle) can import module `b`:

- `import t5x_lite.x.y` imports t5x_lite.x.y and, as Python does, each package above it
  (t5x_lite.x's `__init__`);
- `from t5x_lite.x import y` imports t5x_lite.x.y when y is a submodule (and t5x_lite.x
  above it), else only t5x_lite.x (y is a name of its `__init__`);
- relative imports resolve against the importing module's package.

A package a module sits in is initialised (or being initialised) before the module runs, so
the *implied* import of one's own enclosing packages (`from t5x_lite.data import vocab`
inside t5x_lite.data.tasks) never runs an `__init__` and is no edge; naming a package of
one's own explicitly (`from t5x_lite.data import SOME_NAME`, `import t5x_lite.data`) is.
So `models/__init__.py -> models.t5 -> models.layers` is no cycle, while a cycle through a
package `__init__` that is really imported on the path is one.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = 't5x_lite'

# Cycles tolerated while a restructuring is under way (none since #29): add one only with
# the issue that removes it.
KNOWN_CYCLES_TO_REMOVE: tuple[frozenset[str], ...] = ()

# Direction rules (DESIGN.md: models and data know nothing of training or evaluation):
# modules under a prefix never import, directly or through other modules, anything under
# the forbidden prefixes. A prefix names a module or a package and everything below it, so a
# rule holds for a package before it exists.
# Models may import t5x_lite.kernels, validation, errors, partitioning.
FORBIDDEN = {
    't5x_lite.models': ('t5x_lite.training', 't5x_lite.evaluation', 't5x_lite.decoding',
                        't5x_lite.data', 't5x_lite.peft', 't5x_lite.commands',
                        't5x_lite.rundir', 't5x_lite.cli', 't5x_lite.config'),
    # A task names its metrics (seqio's metric_fns), yet data imports nothing of
    # evaluation: importing t5x_lite.metrics runs evaluation/__init__ (the
    # evaluator, which imports data), so the metric functions must live outside it.
    't5x_lite.data': ('t5x_lite.models', 't5x_lite.training', 't5x_lite.evaluation',
                      't5x_lite.decoding', 't5x_lite.peft', 't5x_lite.commands',
                      't5x_lite.cli', 't5x_lite.config'),
}


def _under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + '.')


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, pathlib.Path]:
  """Every module of the package: dotted name -> file (a package is its `__init__.py`)."""
  found = {}
  for path in sorted((ROOT / PACKAGE).rglob('*.py')):
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    found['.'.join(parts)] = path
  return found


def _is_package(name: str) -> bool:
  return modules()[name].name == '__init__.py'


def _with_parents(name: str) -> list[str]:
  """`name` and every package above it, outermost first, that is a module of ours."""
  parts = name.split('.')
  return [m for m in ('.'.join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules()]


def _ancestors(name: str) -> set[str]:
  """The packages a module sits in (not itself): initialised before it runs."""
  return set(_with_parents(name)) - {name}


def _imports_of(name: str) -> dict[str, int]:
  """The modules of ours that `name` imports -> the first line that does."""
  path = modules()[name]
  tree = ast.parse(path.read_text(), str(path))
  package = name if _is_package(name) else name.rpartition('.')[0]
  own = _ancestors(name) | {name}
  edges: dict[str, int] = {}

  def add(target: str, line: int, explicit: bool) -> None:
    """`target` (a module of ours) and the packages above it, as Python imports them."""
    for m in _with_parents(target):
      if m in own and not (explicit and m == target and m != name):
        continue  # an enclosing package is already initialised: no edge
      edges.setdefault(m, line)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if _under(alias.name, PACKAGE):
          add(_longest_module(alias.name), node.lineno, explicit=True)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base_parts = package.split('.')[:len(package.split('.')) - (node.level - 1)]
        base = '.'.join(base_parts + ([node.module] if node.module else []))
      else:
        base = node.module or ''
      if not _under(base, PACKAGE):
        continue
      base_module = _longest_module(base)
      names_of_base = False
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        if sub in modules():
          add(sub, node.lineno, explicit=True)
        else:
          names_of_base = True
      # Importing a submodule imports its package first; importing a name of the package
      # needs the package itself (explicitly).
      add(base_module, node.lineno, explicit=names_of_base)
  edges.pop(name, None)
  return edges


def _longest_module(dotted: str) -> str:
  parts = dotted.split('.')
  for i in range(len(parts), 0, -1):
    if '.'.join(parts[:i]) in modules():
      return '.'.join(parts[:i])
  raise AssertionError(f'no module of {PACKAGE} named {dotted!r}')


@functools.lru_cache(maxsize=None)
def graph() -> dict[str, dict[str, int]]:
  return {name: _imports_of(name) for name in modules()}


def strongly_connected(g: dict[str, dict[str, int]]) -> list[list[str]]:
  """Tarjan's strongly connected components with more than one module (or a self-loop)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found: list[list[str]] = []
  counter = [0]

  def visit(v: str) -> None:
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(g[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in g[v]:
        found.append(sorted(component))

  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(limit, 10 * len(g) + 100))
  try:
    for v in sorted(g):
      if v not in index:
        visit(v)
  finally:
    sys.setrecursionlimit(limit)
  return found


def _shortest_cycle(g: dict[str, dict[str, int]], component: list[str], start: str
                    ) -> list[str]:
  """A shortest cycle inside a strongly connected component, from `start` back to it."""
  chain = _path(g, start, lambda w: w == start, within=set(component))
  if chain is None:
    raise AssertionError(f'{component} is not a cycle')
  return chain


def describe(g: dict[str, dict[str, int]], chain: list[str]) -> str:
  """`a -> b -> a`, each step with the line of the import."""
  steps = [chain[0]]
  for a, b in zip(chain, chain[1:]):
    steps.append(f'{b} (line {g[a][b]} of {a})')
  return ' -> '.join(steps)


def _path(g: dict[str, dict[str, int]], start: str, goal, within=None) -> list[str] | None:
  """A shortest import chain from `start` to a module for which `goal` holds (`start` itself
  too, reached again: a cycle), through modules in `within` (default: all)."""
  previous: dict[str, str] = {}
  frontier = [start]
  while frontier:
    following = []
    for v in frontier:
      for w in sorted(g[v]):
        if within is not None and w not in within:
          continue
        if goal(w):
          chain = [v]
          while chain[-1] != start:
            chain.append(previous[chain[-1]])
          return chain[::-1] + [w]
        if w != start and w not in previous:
          previous[w] = v
          following.append(w)
    frontier = following
  return None


def test_the_graph_sees_the_package():
  g = graph()
  assert 't5x_lite.models.t5' in g and 't5x_lite.data.tasks' in g
  # Edges resolve submodules, and implied enclosing packages are no edge.
  assert 't5x_lite.validation' in g['t5x_lite.data.tasks']
  assert 't5x_lite.data' not in g['t5x_lite.data.tasks']
  assert 't5x_lite.models.t5' in g['t5x_lite.models']


def test_no_import_cycle():
  g = graph()
  known = set(KNOWN_CYCLES_TO_REMOVE)
  cycles = []
  for component in strongly_connected(g):
    members = frozenset(component)
    if any(members <= k for k in known):
      continue
    if len(component) > 2:
      cycles.append(f'{len(component)} modules import each other: {", ".join(component)}')
    seen = set()
    for start in component:   # a shortest cycle through each module, each cycle once
      chain = _shortest_cycle(g, component, start)
      if frozenset(zip(chain, chain[1:])) not in seen:
        seen.add(frozenset(zip(chain, chain[1:])))
        cycles.append(describe(g, chain))
  assert not cycles, 'import cycles:\n  ' + '\n  '.join(cycles)


def test_imports_point_one_way():
  g = graph()
  broken = {}
  for layer, forbidden in FORBIDDEN.items():
    for name in sorted(g):
      if not _under(name, layer):
        continue
      chain = _path(g, name, lambda m, forbidden=forbidden, layer=layer: (
          any(_under(m, f) for f in forbidden) and not _under(m, layer)))
      if chain:   # one chain for each import that crosses the line
        broken.setdefault((layer,) + tuple(chain[-2:]),
                          f'{layer} must not import {chain[-1]}: ' + describe(g, chain))
  broken = list(broken.values())
  assert not broken, 'imports against the direction rules:\n  ' + '\n  '.join(broken)


def test_every_module_imports_in_a_fresh_interpreter():
  """Every module imports (sorted order, one fresh process); a partly initialised module
  in an ImportError is a cycle the static graph missed (e.g. through importlib)."""
  names = sorted(modules())
  script = (
      'import importlib, sys, traceback\n'
      f'for name in {names!r}:\n'
      '  try:\n'
      '    importlib.import_module(name)\n'
      '  except Exception:\n'
      '    print(f"FAILED {name}"); traceback.print_exc(); sys.exit(1)\n')
  done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stdout + done.stderr
