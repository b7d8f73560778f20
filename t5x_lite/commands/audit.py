"""`t5x-lite audit`: a run's eval sets against its training data, before training on it."""

from __future__ import annotations

import argparse


def _fraction(text: str) -> float:
  value = float(text)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f'must be a fraction in [0, 1], got {text!r}')
  return value


def cmd_audit(args: argparse.Namespace) -> int:
  """Audit a run's eval sets for contamination: 13-gram overlap and duplicates with training.

  For every eval set x every training task of the gin-configured run, over the examples it
  would use (evaluation/contamination.py): a table per set, MODEL_DIR/audit/audit.json, and
  exit code 1 when an eval task's contaminated fraction is above --fail_above."""
  import tqdm  # pylint: disable=import-outside-toplevel
  from t5x_lite import config, errors  # pylint: disable=import-outside-toplevel
  from t5x_lite.commands import common  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import mixtures  # pylint: disable=import-outside-toplevel
  from t5x_lite.evaluation import contamination, heldout  # pylint: disable=import-outside-toplevel
  from t5x_lite.evaluation import sets as eval_sets  # pylint: disable=import-outside-toplevel
  if not args.gin_file:
    raise errors.UserError('audit needs the run\'s --gin_file(s) (the ones `t5x-lite train` '
                           'gets): they name the training mixture and the eval sets')
  common.parse_gin(args, [common.model_dir_binding(args)], reads=('TRAIN',))
  train = config.macro('TRAIN')
  mixture = mixtures.get_mixture(train.mixture)
  sets = eval_sets.from_config(train.eval_mixtures, train.eval_mixture, mixture)
  audited = heldout.audited_sets(sets, train.eval_split, train.eval_max_examples,
                                 heldout_only=args.heldout_only)
  def progress(chunks, total):
    bar = tqdm.tqdm(total=total, desc='audit', unit='example')
    for task, indices in chunks:
      yield task, indices
      bar.update(len(indices))
    bar.close()
  report = contamination.audit(audited, mixture.tasks, config=contamination.AuditConfig(
      n=args.n, max_train_examples=args.max_train_examples, time_budget_s=args.time_budget_s,
      common_ngram_examples=args.common_ngram_examples),
      progress=progress)
  print(contamination.format_tables(report))
  path = heldout.write_report(args.model_dir, 'audit', report)
  print(f'\nwritten: {path}')
  worst = contamination.max_fraction(report)
  if args.fail_above is not None and worst > args.fail_above:
    print(f'audit: {100 * worst:.1f}% of one eval task\'s examples are contaminated, above '
          f'--fail_above={args.fail_above:g}')
    return 1
  return 0


def add_parsers(sub) -> None:
  from t5x_lite.commands import common  # pylint: disable=import-outside-toplevel
  p = sub.add_parser('audit', help=cmd_audit.__doc__.splitlines()[0])
  common.gin_args(p)
  p.add_argument('--model_dir', required=True,
                 help='the run directory; the report goes to MODEL_DIR/audit/audit.json')
  p.add_argument('--n', type=common.int_at_least(1), default=13,
                 help='n-gram length in normalised words (characters for CJK/Thai): 13, '
                      "lm-evaluation-harness's rule")
  p.add_argument('--fail_above', type=_fraction, default=None, metavar='FRACTION',
                 help='exit 1 when more than this fraction of one eval task is contaminated')
  p.add_argument('--heldout_only', action='store_true', help='audit only the held-out sets')
  p.add_argument('--max_train_examples', type=common.int_at_least(1), default=None,
                 help='per training task, a uniform sample of this many (default: all)')
  p.add_argument('--common_ngram_examples', type=common.int_at_least(1), default=None,
                 help='n-grams found in more training examples than this are boilerplate, '
                      'not counted (default: every hit counts)')
  p.add_argument('--time_budget_s', type=float, default=None,
                 help='stop reading the training side after this many seconds')
  p.set_defaults(func=cmd_audit)
