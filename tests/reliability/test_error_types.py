"""Every user-facing condition the library raises is a `UserError` (issue #28 item 8): the
CLI prints those as one line, anything else keeps its traceback. A raise of a builtin
exception type is allowed only where the line says `# internal` (an invariant of the code or
an API contract such as Sequence's IndexError, never a user's input, config or file)."""

import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / 't5x_lite'
BUILTIN_RAISE = re.compile(
    r'\braise (ValueError|KeyError|TypeError|RuntimeError|IndexError|FileNotFoundError|OSError|'
    r'AssertionError|NotImplementedError|LookupError|Exception)\b')


def test_no_bare_builtin_raise_outside_the_internal_invariants():
  bare = [f'{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}'
          for path in sorted(PACKAGE.rglob('*.py'))
          for n, line in enumerate(path.read_text().splitlines(), 1)
          if BUILTIN_RAISE.search(line) and '# internal' not in line]
  assert not bare, ('raise a t5x_lite.errors.UserError subclass (ConfigError, DataError, ...) '
                    'for a user-facing condition, or mark an internal invariant `# internal`:\n'
                    + '\n'.join(bare))
