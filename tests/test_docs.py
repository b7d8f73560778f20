"""The docs a newcomer walks: README.md (a short front page) and docs/*.md (reference pages).

Checks that what they name exists: gin files, repository files, `t5x-lite` commands and the
flags their example command lines pass, links and their #anchors; that README.md stays short, links every docs page and keeps the marker blocks
`.ci/run` reads; that each docs page opens with the command a user runs; and that every command
summary `t5x-lite --help` shows is a whole sentence. Fast: no jax (the CLI's parser imports
none), no subprocess.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
DOCS = sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))
PAGES = [README] + DOCS
MAX_README_LINES = 250
# Reference pages the front page promises (issue #29); more may exist.
REQUIRED_DOCS = ('training.md', 'data.md', 'evaluation.md', 'peft.md',
                 'objectives_and_curricula.md', 'launching.md', 'benchmarks.md',
                 'reliability.md')
# Repository paths whose files must exist when a page names them (t5x_lite/ module paths are
# left out: the package layout may run ahead of the docs or behind them).
CHECKED_DIRS = ('gin_configs', 'launch', 'benchmarks', 'notebooks')


def _read(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


def _rel(path: str) -> str:
  return os.path.relpath(path, REPO)


def _code(text: str) -> str:
  """The text of a page's fenced code blocks and inline code spans, one piece a line."""
  pieces = re.findall(r'^```[^\n]*\n(.*?)^```', text, flags=re.S | re.M)
  prose = re.sub(r'^```[^\n]*\n.*?^```', '', text, flags=re.S | re.M)
  pieces += re.findall(r'`([^`]+)`', prose)           # a span may wrap onto the next line
  return '\n'.join(pieces)


def _expand_braces(path: str) -> list[str]:
  """`meshes/{dp,fsdp}.gin` -> `meshes/dp.gin`, `meshes/fsdp.gin` (shell brace expansion)."""
  match = re.search(r'\{([^{}]*)\}', path)
  if not match:
    return [path]
  return [expanded for option in match.group(1).split(',')
          for expanded in _expand_braces(path[:match.start()] + option + path[match.end():])]


def repo_paths(text: str) -> list[str]:
  """Every path under CHECKED_DIRS a page names (braces expanded); placeholders (`<family>`,
  `<figure>`), globs and URLs are skipped."""
  pattern = (r'(?<![\w./:-])((?:%s)/(?:[\w.\-/]|\{[\w.,\-]*\}|<[^<>\s]*>|\*)*)'
             % '|'.join(CHECKED_DIRS))
  paths = []
  for found in re.findall(pattern, text):
    found = found.rstrip('.,:;')
    if '<' in found or '*' in found:
      continue
    paths.extend(_expand_braces(found))
  return sorted(set(paths))


def cli_commands(text: str) -> list[str]:
  """The COMMAND of every `t5x-lite COMMAND` in a page's code (blocks and inline spans)."""
  return sorted(set(re.findall(r'(?<![\w/-])t5x-lite\s+([a-z][\w-]*)', _code(text))))


def links(text: str) -> list[str]:
  """Relative markdown link targets (`[text](target)`), code excluded."""
  prose = re.sub(r'^```[^\n]*\n.*?^```', '', text, flags=re.S | re.M)
  prose = re.sub(r'`[^`]+`', '', prose)
  targets = re.findall(r'\]\(([^()\s]+)\)', prose)
  return [t for t in targets if not re.match(r'[a-z][a-z+.-]*:', t)]


def anchors(text: str) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces -> `-`."""
  prose = re.sub(r'^```[^\n]*\n.*?^```', '', text, flags=re.S | re.M)
  result = set()
  for heading in re.findall(r'^#{1,6}\s+(.+?)\s*#*\s*$', prose, flags=re.M):
    heading = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # a link keeps its text
    slug = re.sub(r'[^\w\- ]', '', heading.lower().replace('`', '')).replace(' ', '-')
    result.add(slug)
  return result


def _parser() -> argparse.ArgumentParser:
  from t5x_lite import cli  # pylint: disable=import-outside-toplevel
  return cli.build_parser()


def subcommands() -> dict[str, str]:
  """`t5x-lite`'s commands and the summary `t5x-lite --help` shows for each."""
  parser = _parser()
  actions = [a for a in parser._actions  # pylint: disable=protected-access
             if isinstance(a, argparse._SubParsersAction)]  # pylint: disable=protected-access
  assert len(actions) == 1, actions
  summaries = {a.dest: a.help for a in actions[0]._choices_actions}  # pylint: disable=protected-access
  assert set(summaries) == set(actions[0].choices), 'a command without a summary'
  return summaries


# --- the front page ---------------------------------------------------------------------------

def test_readme_is_short():
  lines = _read(README).count('\n')
  assert lines <= MAX_README_LINES, (
      f'README.md has {lines} lines (at most {MAX_README_LINES}): move reference material into '
      'docs/')


@pytest.mark.parametrize('marker', ['<!-- test-command -->', '<!-- main-command -->'])
def test_readme_command_blocks(marker):
  """The marker, then a ```bash block of one command line (what `.ci/run` extracts)."""
  lines = _read(README).splitlines()
  assert lines.count(marker) == 1, f'README.md must hold {marker} exactly once'
  at = lines.index(marker)
  fence, command, end = lines[at + 1:at + 4]
  assert fence == '```bash' and end == '```', f'{marker} must be followed by a ```bash block'
  assert command.startswith('python3 -m venv .venv && . .venv/bin/activate && pip install -e ')


def test_every_docs_page_is_linked_from_readme():
  linked = {os.path.normpath(t.split('#')[0]) for t in links(_read(README))}
  names = {os.path.basename(d) for d in DOCS}
  assert set(REQUIRED_DOCS) <= names, f'missing docs pages: {set(REQUIRED_DOCS) - names}'
  unlinked = [_rel(d) for d in DOCS if _rel(d) not in linked]
  assert not unlinked, f'docs pages README.md does not link: {unlinked}'


# --- every page -------------------------------------------------------------------------------

@pytest.mark.parametrize('page', [_rel(p) for p in DOCS])
def test_docs_page_starts_with_a_command(page):
  """A title, then (within a few lines) a ```bash block: the command a user runs."""
  lines = _read(os.path.join(REPO, page)).splitlines()
  assert lines and lines[0].startswith('# '), f'{page} must start with a # title'
  assert '```bash' in lines[1:6], f'{page} must open with a ```bash block under its title'


@pytest.mark.parametrize('page', [_rel(p) for p in PAGES])
def test_named_repository_paths_exist(page):
  named = repo_paths(_read(os.path.join(REPO, page)))
  missing = [p for p in named if not os.path.exists(os.path.join(REPO, p))]
  assert not missing, f'{page} names paths that do not exist: {missing}'


@pytest.mark.parametrize('page', [_rel(p) for p in PAGES])
def test_named_commands_exist(page):
  known = subcommands()
  unknown = [c for c in cli_commands(_read(os.path.join(REPO, page))) if c not in known]
  assert not unknown, f'{page} names t5x-lite commands that do not exist: {unknown} ' \
                      f'(commands: {sorted(known)})'


def command_lines(text: str) -> list[str]:
  """Each `t5x-lite ...` line of a page's ```bash blocks, continuation lines joined, comments
  dropped; lines with placeholders (`$VAR`, `[--flag]`, `...`) are left out."""
  result = []
  for block in re.findall(r'^```bash\n(.*?)^```', text, flags=re.S | re.M):
    for line in block.replace('\\\n', ' ').splitlines():
      line = line.split(' # ')[0].strip()
      if line.startswith('t5x-lite ') and not re.search(r'\$|\[|\.\.\.|--help', line):
        result.append(line)
  return result


@pytest.mark.parametrize('page', [_rel(p) for p in PAGES])
def test_command_lines_parse(page, capsys):
  """Every flag a page's example commands pass exists (parsed by the CLI's own parser;
  --gin.X=V bindings are gin's, checked when a command runs)."""
  parser = _parser()
  bad = []
  for line in command_lines(_read(os.path.join(REPO, page))):
    args = [a for a in shlex.split(line)[1:] if not a.startswith('--gin.')]
    try:
      parser.parse_args(args)
    except SystemExit:
      bad.append(f'{line}: {capsys.readouterr().err.strip()}')
  assert not bad, f'{page} has example commands the CLI refuses: {bad}'


@pytest.mark.parametrize('page', [_rel(p) for p in PAGES])
def test_links_resolve(page):
  path = os.path.join(REPO, page)
  broken = []
  for target in links(_read(path)):
    file, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
    if not os.path.exists(resolved):
      broken.append(target)
    elif anchor and resolved.endswith('.md') and anchor not in anchors(_read(resolved)):
      broken.append(target)
  assert not broken, f'{page} has broken links: {broken}'


# --- t5x-lite --help --------------------------------------------------------------------------

def test_help_summaries_are_whole_sentences():
  """Each summary (a command docstring's first line) starts with a capital letter, ends with a
  full stop and closes every bracket and quote it opens: no sentence cut at a line break."""
  bad = {}
  for name, summary in subcommands().items():
    summary = (summary or '').strip()
    whole = (summary[:1].isupper() and summary.endswith('.')
             and summary.count('(') == summary.count(')')
             and summary.count('[') == summary.count(']')
             and summary.count('`') % 2 == 0)
    if not whole:
      bad[name] = summary
  assert not bad, f'help summaries that are not whole sentences: {bad}'


# --- the checks themselves --------------------------------------------------------------------

def test_the_extractors():
  text = ('Use `gin_configs/meshes/{dp,fsdp}.gin` or gin_configs/models/<family>/<size>.gin.\n'
          'A t5x-lite run is prose, `t5x-lite eval --model_dir=x` is code.\n'
          '```bash\nt5x-lite train --gin_file=gin_configs/runs/finetune.gin\n```\n'
          'See [a](docs/a.md#x) and [b](https://example.com).\n')
  assert repo_paths(text) == ['gin_configs/meshes/dp.gin', 'gin_configs/meshes/fsdp.gin',
                              'gin_configs/runs/finetune.gin']
  assert cli_commands(text) == ['eval', 'train']
  assert links(text) == ['docs/a.md#x']
  assert command_lines('```bash\nt5x-lite plan --gin_file=a.gin \\\n  --num_devices=8  # n\n'
                       't5x-lite eval [--split=test]\n```\n') == [
      't5x-lite plan --gin_file=a.gin    --num_devices=8']
  assert anchors('# Title\n## CPU hosts: GLIBC tunables\n### `infer` and eval\n') == {
      'title', 'cpu-hosts-glibc-tunables', 'infer-and-eval'}
