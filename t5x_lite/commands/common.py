"""Flags and helpers shared by the subcommands."""

from __future__ import annotations

import argparse


def int_at_least(minimum: int):
  """An argparse `type`: an integer >= minimum, else argparse's one-line error naming the
  flag (exit code 2), before anything is loaded."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'must be an integer >= {minimum}, got {text!r}') from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f'must be an integer >= {minimum}, got {value}')
    return value
  parse.__name__ = f'int_at_least_{minimum}'
  return parse


def gin_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--gin_file', action='append', default=[],
                      help='gin file (repeatable), searched in the cwd and the repository; '
                           'then --gin.NAME=VALUE overrides')


def distributed_args(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group('multi-host (auto-detected on TPU pods and SLURM)')
  group.add_argument('--coordinator_address', default=None, help='host:port of process 0')
  group.add_argument('--num_processes', type=int, default=None)
  group.add_argument('--process_id', type=int, default=None)


def init_distributed(args: argparse.Namespace) -> None:
  """Before any other jax call: join the other processes when there are any."""
  from t5x_lite import partitioning  # pylint: disable=import-outside-toplevel
  partitioning.initialize_distributed(partitioning.DistributedConfig(
      args.coordinator_address, args.num_processes, args.process_id))


def parse_gin(args: argparse.Namespace, fixed=(), reads=None) -> None:
  """--gin_file files, the command's `fixed` NAME=VALUE bindings, then --gin.NAME=VALUE; a
  --gin override that none of the `reads` macros reaches is an error (config.parse_gin)."""
  from t5x_lite import config  # pylint: disable=import-outside-toplevel
  config.parse_gin(args.gin_file, args.gin_bindings, fixed=fixed, reads=reads)


def model_dir_binding(args: argparse.Namespace) -> str:
  """MODEL_DIR=<--model_dir, absolute>; a --gin.MODEL_DIR naming another directory is an
  error (which one would the run use?), the same one is fine."""
  from t5x_lite import config, errors  # pylint: disable=import-outside-toplevel
  from t5x_lite.rundir import paths  # pylint: disable=import-outside-toplevel
  model_dir = paths.absolute(args.model_dir)
  for b in args.gin_bindings:
    if b.split('=', 1)[0].strip() == 'MODEL_DIR' and '=' in b:
      value = config.binding_value(b)
      if not isinstance(value, str) or paths.absolute(value) != model_dir:
        raise errors.UserError(f'--gin.{b} contradicts --model_dir={args.model_dir}: give the '
                               'run directory once, with --model_dir')
  return f'MODEL_DIR={model_dir}'


def checkpoint_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--checkpoint', default=None, metavar='best|latest|STEP',
                      help="which checkpoint: 'latest' (default), 'best' (the run's "
                           'keep_best record) or a step')
  parser.add_argument('--checkpoint_step', type=int_at_least(0), default=None,
                      help='a step (the same as --checkpoint=STEP)')


def checkpoint_step(args: argparse.Namespace) -> int | None:
  """The step --checkpoint / --checkpoint_step name (None: the latest)."""
  from t5x_lite import errors  # pylint: disable=import-outside-toplevel
  from t5x_lite.rundir import paths  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import best_checkpoint  # pylint: disable=import-outside-toplevel
  if args.checkpoint is not None and args.checkpoint_step is not None:
    raise errors.UserError('give --checkpoint or --checkpoint_step, not both')
  if args.checkpoint_step is not None:
    return args.checkpoint_step
  return best_checkpoint.resolve_step(paths.absolute(args.model_dir), args.checkpoint)
