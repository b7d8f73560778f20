"""`t5x-lite models` and `t5x-lite tasks`: what presets, tasks and mixtures exist."""

from __future__ import annotations

import argparse

from t5x_lite.commands import common


def cmd_models(args: argparse.Namespace) -> int:
  """List the model presets (family/size) with their architecture and parameter count."""
  from t5x_lite import models  # pylint: disable=import-outside-toplevel
  print(f'{"preset":<16} {"params":>16} {"d_model":>8} {"heads":>6} {"d_ff":>6} '
        f'{"layers":>7} {"vocab":>7}  mlp')
  for name, c in models.all_presets().items():
    if args.family and not name.startswith(args.family + '/'):
      continue
    layers = f'{c.num_encoder_layers}/{c.num_decoder_layers}'
    print(f'{name:<16} {models.num_params(c):>16,} {c.d_model:>8} {c.num_heads:>6} {c.d_ff:>6} '
          f'{layers:>7} {c.vocab_size:>7}  {c.feed_forward_proj}'
          f'{"" if c.tie_word_embeddings else ", untied lm_head"}')
  decoders = {n: c for n, c in models.decoder_presets.all_presets().items()
              if not args.family or n.startswith(args.family + '/')}
  if decoders:
    print(f'\n{"decoder-only":<16} {"params":>16} {"hidden":>8} {"heads":>6} {"kv":>4} '
          f'{"mlp":>6} {"layers":>7} {"vocab":>7}  architecture')
    for name, c in decoders.items():
      print(f'{name:<16} {models.decoder_presets.num_params(c):>16,} {c.hidden_size:>8} '
            f'{c.num_heads:>6} {c.num_kv_heads:>4} {c.intermediate_size:>6} {c.num_layers:>7} '
            f'{c.vocab_size:>7}  {c.architecture}'
            f'{", tied" if c.tie_word_embeddings else ""}')
  print('\nGin: gin_configs/models/<family>/<size>.gin (T5 families); decoder-only under '
        'gin_configs/models/{llama,qwen2,qwen3,gemma}/')
  return 0


def _indent(text: str, prefix: str = '    | ') -> str:
  return '\n'.join(prefix + line for line in text.splitlines())


def cmd_tasks(args: argparse.Namespace) -> int:
  """List tasks and mixtures: example counts, rates, metrics and one formatted example each."""
  from t5x_lite import config  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import mixtures as mixtures_lib, registry, tasks  # pylint: disable=import-outside-toplevel
  common.parse_gin(args, reads=('MIXTURE_OR_TASK_NAME',))
  gin_mixture = None
  if args.gin_file or args.gin_bindings:
    # builds (and registers) the gin-defined mixture, if the gin files define one
    gin_mixture = config.macro('MIXTURE_OR_TASK_NAME', default=None)
  registered = registry.registered()
  mixtures = [m for m in registered.values() if isinstance(m, mixtures_lib.Mixture)]
  if isinstance(gin_mixture, mixtures_lib.Mixture) and gin_mixture.name not in registered:
    mixtures.append(gin_mixture)   # built in gin (e.g. a scheduled one), not registered
  if args.mixture:
    mixtures = [mixtures_lib.get_mixture(args.mixture)]
  shown = set()
  for mixture in mixtures:
    print(f'mixture {mixture.name}: {len(mixture.tasks)} tasks')
    _print_rates(mixture)
    shown.update(t.name for t in mixture.tasks)
  print()
  for name, task in sorted(registered.items()):
    if not isinstance(task, tasks.Task) or (args.mixture and name not in shown):
      continue
    counts = ', '.join(f'{s} {task.num_examples(s):,}' for s in task.splits)
    print(f'task {name}: {task.description}')
    split = 'train' if 'train' in task.splits else task.splits[0]
    if task.objective is not None:   # no templates, not evaluated: show its raw text
      print(f'  splits: {counts}; objective: {task.objective.describe()}; not evaluated')
      print(f'  text ({split}[0]):')
      print(_indent(str(task.text(split, 0))))
      continue
    print(f'  splits: {counts}; metrics: {", ".join(task.metric_names)}; formats: '
          f'{", ".join(f"{k} {v:.0%}" for k, v in task.formats.items())}; '
          f'templates: {len(task.templates)} (+{len(task.heldout_templates)} held out)')
    example = task.render(split, 0, task.eval_rng(0))
    print(f'  example ({split}[0], {example["format"]}):')
    print(_indent(example['inputs']))
    print(f'    -> {example["targets"]}')
  return 0




def add_parsers(sub) -> None:
  p = sub.add_parser('models', help=cmd_models.__doc__.splitlines()[0])
  p.add_argument('--family', default=None, help='only this family (t5_1_0, flan_t5, mt5, ...)')
  p.set_defaults(func=cmd_models)
  p = sub.add_parser('tasks', help=cmd_tasks.__doc__.splitlines()[0])
  common.gin_args(p)
  p.add_argument('--mixture', default=None, help='only this mixture (or task) and its tasks')
  p.set_defaults(func=cmd_tasks)


def _print_rates(mixture) -> None:
  """Rates and λ per task; a schedule's at each step where a value starts."""
  steps = sorted(set(mixture.rate_schedule.key_steps() if mixture.scheduled else [0]) |
                 set(mixture.loss_weight_schedule.key_steps()
                     if mixture.loss_weight_schedule is not None else []))
  for step in steps:
    if len(steps) > 1:
      print(f'  from step {step}:')
    weights = mixture.loss_weights_at(step)
    for i, (task, rate) in enumerate(mixture.tasks_and_rates(step)):
      counts = ', '.join(f'{s} {task.num_examples(s):,}' for s in task.splits)
      print(f'  {task.name:<28} rate {rate:6.3f}  loss weight {weights[i]:g}  ({counts})')
  if mixture.priority is not None:
    for names, floor in mixture.priority.groups:
      print(f'  priority: {", ".join(names)} >= {floor:g} of the weighted tokens')
