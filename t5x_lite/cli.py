"""`t5x-lite` command line: parses flags and dispatches to `t5x_lite/commands/`.

`--gin.NAME=VALUE` flags (repeatable) are collected before argparse sees the rest; a value
that is not a Python literal is taken as a string. A `errors.UserError` (the project's own
checks) prints as one line, `error: ...`, with exit code 2, as do argparse's flag errors
(without the usage block, which `--help` shows); anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

import t5x_lite
from t5x_lite import errors
from t5x_lite.commands import audit, convert, infer, listing, plan, train


class _Parser(argparse.ArgumentParser):
  """argparse's errors as one line like every other error (subcommand parsers inherit it)."""

  def error(self, message):
    self.exit(2, f'error: {self.prog}: {message} (see {self.prog} --help)\n')


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog='t5x-lite', description='Multi-task instruction fine-tuning of T5-family models.')
  parser.add_argument('--version', action='version', version=f't5x_lite {t5x_lite.__version__}')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  for module in (train, infer, convert, plan, listing, audit):
    module.add_parsers(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings = [a[len('--gin.'):] for a in argv if a.startswith('--gin.')]
  args = build_parser().parse_args([a for a in argv if not a.startswith('--gin.')])
  args.gin_bindings = bindings
  try:
    return args.func(args)
  except errors.UserError as e:
    message = str(e).split("\n  In call to configurable '")[0]   # gin's suffix: where, not what
    print(f'error: {" ".join(message.split())}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
