"""`t5x-lite train` (any gin-configured run) and `t5x-lite demo` (the README's main job)."""

from __future__ import annotations

import argparse
import time

from t5x_lite import errors
from t5x_lite.commands import common

DEMO_GIN = 'gin_configs/runs/demo_cpu.gin'


def _run(args: argparse.Namespace, gin_files: list[str]) -> dict:
  common.init_distributed(args)
  from t5x_lite import config  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import loop  # pylint: disable=import-outside-toplevel
  args.gin_file = gin_files
  common.parse_gin(args, [common.model_dir_binding(args)], reads=('MODEL_CONFIG', 'TRAIN'))
  model_config = config.model_config()
  train_config = config.macro('TRAIN')
  if not isinstance(train_config, loop.TrainConfig):
    raise errors.UserError('the gin files must set TRAIN = @loop.TrainConfig() '
                           '(include gin_configs/runs/finetune.gin)')
  result = loop.train(train_config, model_config,
                      operative_config=config.operative_config(model_config))
  return dict(result, train_mixture=train_config.mixture)


def _print_results(result: dict) -> None:
  """Per eval set: the per-task table beside the baselines (with the normalized score and
  the spread over templates where there are several), then, where tasks span several
  languages, the table grouped by language; last, where the sets hold languages the
  training mixture has not, the seen vs held-out languages table over all the sets."""
  from t5x_lite.evaluation import languages  # pylint: disable=import-outside-toplevel
  from t5x_lite.evaluation import report as eval_report  # pylint: disable=import-outside-toplevel
  for evaluator, results in result.get('evals', []):
    if not results:
      continue
    config = evaluator.config
    if len(result['evals']) > 1 or config.heldout_templates:
      print(f'\n{config.log_prefix}: {evaluator.mixture_name} on {config.split}'
            + (', held-out templates' if config.heldout_templates else '')
            + (', every example under every template' if config.all_templates else ''))
    print(eval_report.format_table(results, evaluator.baselines(),
                                   tasks=[t.name for t in evaluator.tasks]))
    if results.get('lang'):
      print(eval_report.format_language_table(evaluator.tasks, results, evaluator.baselines(),
                                              evaluator.languages()))
  legend = eval_report.table_legend([r for _, r in result.get('evals', []) if r])
  if legend:
    print(legend)
  if result.get('train_mixture') is not None:
    glance = languages.format_run_glance(result.get('evals', []), result['train_mixture'])
    if glance:
      print('\n' + glance)


def cmd_train(args: argparse.Namespace) -> int:
  """Train (or resume) a model: gin files define model, mixture, mesh and run settings."""
  if not args.gin_file:
    raise errors.UserError('train needs --gin_file (e.g. gin_configs/runs/finetune.gin plus a '
                           'model and a mixture); see README.md')
  _print_results(_run(args, args.gin_file))
  return 0


def cmd_demo(args: argparse.Namespace) -> int:
  """Run the README's main job: train a small model on CPU, then evaluate every task.

  A multi-task fine-tune on the built-in tasks; each task's scores are printed beside its
  trivial baseline."""
  from t5x_lite.evaluation import report as eval_report  # pylint: disable=import-outside-toplevel
  start = time.time()
  result = _run(args, [DEMO_GIN] + args.gin_file)
  evaluator = result['evaluator']
  baselines = evaluator.baselines()
  print(f'\nDemo finished in {time.time() - start:.0f} s; model_dir: {args.model_dir}\n')
  _print_results(result)
  below = [task for task, scores in result['eval'].items()
           if task not in eval_report.RESERVED
           and list(scores.values())[0] <= list(baselines[task].values())[0]]
  if below:
    print(f'\nNot above the trivial baseline: {below}')
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser('train', help=cmd_train.__doc__.splitlines()[0])
  common.gin_args(p)
  p.add_argument('--model_dir', required=True, help='run directory (resumes if it has '
                 'checkpoints); sets the MODEL_DIR macro')
  common.distributed_args(p)
  p.set_defaults(func=cmd_train)
  p = sub.add_parser('demo', help=cmd_demo.__doc__.splitlines()[0])
  common.gin_args(p)
  p.add_argument('--model_dir', default='/tmp/t5x_lite_demo')
  common.distributed_args(p)
  p.set_defaults(func=cmd_demo)
