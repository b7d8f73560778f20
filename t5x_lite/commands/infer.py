"""`t5x-lite infer` (prompts in a file -> predictions or scores) and `t5x-lite eval` (every
task of a mixture -> metrics, predictions, table)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os

from t5x_lite import errors
from t5x_lite.commands import common


def read_inputs(path: str, need_targets: bool) -> list[dict]:
  """`.txt`: one prompt per line; `.jsonl`: objects with `inputs` (and `targets`)."""
  if not os.path.isfile(path):
    raise errors.UserError(f'--input_file={path} not found')
  rows = []
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        text = raw.decode('utf-8').rstrip('\n')
      except UnicodeDecodeError as e:
        raise errors.UserError(f'{path}:{line_no}: not valid UTF-8 ({e.reason})') from e
      if not text.strip():
        continue
      if path.endswith('.jsonl'):
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise errors.UserError(f'{path}:{line_no}: not valid JSON ({e.msg})') from e
        if not isinstance(record, dict) or not isinstance(record.get('inputs'), str):
          raise errors.UserError(f'{path}:{line_no}: needs a string field "inputs"')
        if need_targets and not isinstance(record.get('targets'), str):
          raise errors.UserError(f'{path}:{line_no}: score mode needs a string field "targets"')
        rows.append({'inputs': record['inputs'], 'targets': record.get('targets', '')})
      else:
        if need_targets:
          raise errors.UserError(f'{path}: score mode needs a .jsonl file with inputs and '
                                 'targets')
        rows.append({'inputs': text, 'targets': ''})
  if not rows:
    raise errors.UserError(f'{path} holds no inputs')
  return rows


def check_output_file(path: str) -> None:
  """Fails before any loading or decoding if `path` cannot be written: a directory, a missing
  or read-only parent directory, a read-only file."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise errors.UserError(f'--output_file={path} is a directory; name a file in it')
  if not os.path.isdir(parent):
    raise errors.UserError(f'--output_file={path}: the directory {parent} does not exist; '
                           'create it first')
  if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise errors.UserError(f'--output_file={path} is not writable')


def _score(value) -> float | None:
  """A score as JSON allows it: a non-finite one (NaN, -inf) is written as null."""
  value = float(value)
  return value if math.isfinite(value) else None


def prompt_length(meta: dict) -> int:
  """The soft prompt's length of a prompt-tuned checkpoint (0 otherwise): its inputs must
  start with the same prompt ids as in training (`pipeline.prompt_ids`)."""
  from t5x_lite.peft import spec  # pylint: disable=import-outside-toplevel
  adapters = spec.AdapterSpec.from_json(meta.get('peft'))
  return adapters.prompt_length if adapters else 0


def route_to_task(params, adapters, task: str | None, model_dir: str):
  """(params, spec) of the model that serves `task`: per-task/group LoRA banks reduced to
  its slots (free-form prompts name the task whose adapters they want)."""
  if adapters is None:
    if task:
      raise errors.UserError(f'--task={task}: {model_dir} has no per-task adapters')
    return params, None
  from t5x_lite.peft import params as peft_params  # pylint: disable=import-outside-toplevel
  if not adapters.per_task:
    return params, adapters
  if task not in adapters.tasks:
    raise errors.UserError(
        f'{model_dir} has per-task adapters: name the task with --task=NAME '
        f'({"got " + repr(task) + "; " if task else ""}its tasks: {", ".join(adapters.tasks)})')
  return peft_params.route(params, task, adapters), peft_params.routed_spec(adapters)


def _decoding_config(args):
  from t5x_lite import config, decoding  # pylint: disable=import-outside-toplevel
  if not args.gin_file and not args.gin_bindings:
    return decoding.DecodingConfig()
  common.parse_gin(args, reads=('DECODING',))
  return config.macro('DECODING', default=None) or decoding.DecodingConfig()


def cmd_infer(args: argparse.Namespace) -> int:
  """Predict (greedy / beam / sampling) or score given targets for every line of a file.

  The output is JSONL; a score that is not finite (NaN, -inf) is written as null, since
  JSON has no NaN. The output path is checked before anything is loaded."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tqdm  # pylint: disable=import-outside-toplevel

  from t5x_lite import decoding, kernels, models, partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.commands.convert import load_any  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import eval_inputs, feature_converters, vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  score_mode = args.mode == 'score'
  check_output_file(args.output_file)
  rows = read_inputs(args.input_file, need_targets=score_mode)
  decoding_config = _decoding_config(args)
  model_config, params, meta, adapters = load_any(args.model_dir, common.checkpoint_step(args),
                                                  base=args.base)
  params, adapters = route_to_task(params, adapters, args.task, args.model_dir)
  if not meta.get('vocabulary'):
    raise errors.UserError(f'{args.model_dir} records no vocabulary; convert it from a '
                           'directory with spiece.model')
  vocab = vocab_lib.get_vocabulary(meta['vocabulary'])
  mesh = partitioning.make_mesh({'data': -1})
  model = models.build(model_config, kernels.for_mesh(mesh), adapters)
  options = dict(meta.get('feature_converter') or {'kind': model.feature_kind})
  converter = feature_converters.for_kind(options.pop('kind'), **options).for_eval()
  batch_size = args.batch_size - args.batch_size % jax.device_count() or jax.device_count()
  lengths = {'inputs': args.max_input_length, 'targets': args.max_decode_length}
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  if score_mode:
    fn = jax.jit(lambda p, i, im, t, tm: model.score(p, i, t, inputs_mask=im,
                                                     targets_mask=tm)[0])
  else:
    fn = decoding.jit(lambda p, i, im: decoding.predict(
        model, p, i, args.max_decode_length, decoding_config, vocab.eos_id, inputs_mask=im),
                      model.ops)
  out = []
  bar = tqdm.tqdm(total=len(rows), desc=args.mode, unit='example')
  for batch, indices in eval_inputs.eval_batches(rows, vocab, lengths, batch_size,
                                              task_name=args.input_file, process_index=0,
                                              process_count=1,
                                              prompt_length=prompt_length(meta),
                                              feature_converter=converter):
    arrays = partitioning.global_batch({
        'i': converter.model_inputs(batch, lengths['targets']),
        'im': converter.model_inputs_mask(batch, lengths['targets']),
        't': converter.model_targets(batch, lengths['targets']),
        'tm': converter.model_targets_mask(batch, lengths['targets'])}, mesh)
    if score_mode:
      scores = np.asarray(fn(params, arrays['i'], arrays['im'], arrays['t'], arrays['tm']))
      for i, s in zip(indices, scores):
        if i >= 0:
          out.append({'inputs': rows[i]['inputs'], 'targets': rows[i]['targets'],
                      'score': _score(s)})
    else:
      tokens, scores = (np.asarray(x) for x in fn(params, arrays['i'], arrays['im']))
      for i, candidates, candidate_scores in zip(indices, tokens, scores):
        if i < 0:
          continue
        text = lambda ids: converter.decode(vocab, ids)
        record = {'inputs': rows[i]['inputs'], 'prediction': text(candidates[0]),
                  'score': _score(candidate_scores[0])}
        if len(candidates) > 1:   # T5X's beam end leaves unfinished slots empty: skip them
          record['candidates'] = [{'prediction': text(c), 'score': _score(s)}
                                  for c, s in zip(candidates, candidate_scores)
                                  if s > decoding.beam_search.NEG_INF / 2]
        out.append(record)
    bar.update(int((indices >= 0).sum()))
  bar.close()
  with open(args.output_file, 'w') as f:
    for record in out:
      f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + '\n')
  print(f'{len(out)} {"scores" if score_mode else "predictions"} -> {args.output_file}')
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  """Evaluate a checkpoint on the run's eval sets and write metrics, predictions and tables.

  Also per-language and per-template scores and TensorBoard events; the gin config is the
  run's own (MODEL_DIR/config.gin).

  Results go to MODEL_DIR/eval/<step>/<name>/: the run's own name for each set when nothing
  changed, else that name plus a digest of the changed settings (or --name), so an eval never
  overwrites another's result; a split no task has is an error, raised before the checkpoint
  is read."""
  common.init_distributed(args)
  import jax  # pylint: disable=import-outside-toplevel

  from t5x_lite import config, kernels, partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.evaluation import report as eval_report, sets as eval_sets  # pylint: disable=import-outside-toplevel
  from t5x_lite.rundir import paths, writers  # pylint: disable=import-outside-toplevel
  from t5x_lite import evaluation  # pylint: disable=import-outside-toplevel
  from t5x_lite.rundir import names, run_config  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import mixtures, vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  from t5x_lite import models  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import checkpoints, compatibility, start as start_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  model_dir = paths.absolute(args.model_dir)
  run_config.parse(model_dir, args.gin_file)   # checked: it names no code outside t5x_lite
  common.parse_gin(args, [common.model_dir_binding(args)],
                   reads=('MODEL_CONFIG', 'TRAIN', 'DECODING'))
  model_config, train = config.model_config(), config.macro('TRAIN')
  decoding_config = config.macro('DECODING', default=None) or train.eval_decoding
  split = names.check('--split', args.split or train.eval_split)
  if args.name is not None:
    names.check('--name', args.name)
  sets = eval_sets.from_config(train.eval_mixtures, train.eval_mixture, train.mixture)
  if args.heldout_templates:
    sets = [dataclasses.replace(s, heldout_templates=True) for s in sets]
  for s in sets:
    evaluation.check_split(mixtures.get_mixture(s.mixture), s.split or split)
  # Each set as the run evaluated it logs and stores as the train loop does; another split
  # under <name>-<split>; held-out templates or settings changed by --gin_file/--gin. under
  # <name>-<digest> (or --name), logged as eval_<that name>: never over another result.
  changed = bool(args.gin_file or args.gin_bindings or args.heldout_templates)
  digest = hashlib.sha1(json.dumps(dict(
      decoding=dataclasses.asdict(decoding_config), max_examples=train.eval_max_examples,
      lengths=dict(train.feature_lengths), heldout=args.heldout_templates,
      sets=[repr(s) for s in sets]), sort_keys=True).encode()).hexdigest()[:8]
  renamed = []
  for s in sets:
    own = s.results_name(s.split or train.eval_split, train.eval_split)
    name = s.results_name(s.split or split, train.eval_split)
    if args.name:
      name = args.name if len(sets) == 1 else f'{args.name}-{s.name}'
    elif changed:
      name = f'{name}-{digest}'
    renamed.append(s if name == own else dataclasses.replace(
        s, name=name, prefix=f'eval_{name}', split=s.split or split, renamed=True))
  sets = renamed
  mesh = partitioning.make_mesh(train.mesh_shape)
  rules = partitioning.rules_for(train.partitioning)
  optimizer = train.optimizer.build()
  ckpt = checkpoints.Checkpointer(model_dir)
  step = ckpt._step(common.checkpoint_step(args))  # pylint: disable=protected-access
  meta = ckpt.meta(step)
  vocab = vocab_lib.get_vocabulary(train.vocabulary)
  if meta.get('peft'):   # the adapters + the base they record (identity checked)
    ckpt.close()
    from t5x_lite.peft import runs  # pylint: disable=import-outside-toplevel
    _, adapters, params, _ = runs.restore_for_inference(model_dir, step, mesh, rules)
    served = start_lib.Served.adapters(models.build(model_config, kernels.for_mesh(mesh)),
                                       adapters, jax.tree.map(lambda x: x.sharding, params))
  else:
    model = models.build(model_config, kernels.for_mesh(mesh))
    layout = state_lib.state_layout(model, optimizer, mesh, rules)
    compatibility.check(ckpt, step, meta, model_config, layout.abstract().params,
                        'evaluate', 'Evaluate with the gin files of the run that wrote it.')
    params = ckpt.restore_params(layout.abstract().params, step)
    served = start_lib.Served(model, layout.shardings.params)
  evaluators = eval_sets.evaluators(
      sets, served, vocab, train.feature_lengths, train.eval_batch_size, split,
      train.eval_max_examples, decoding_config, mesh, rules,
      feature_converter=train.feature_converter)
  writer = writers.MetricsWriter(model_dir)
  evaluated = []
  for evaluator in evaluators:
    results = evaluator.evaluate(params, step, model_dir, writer)
    evaluated.append((evaluator, results))
    if jax.process_index() == 0:
      out = evaluation.results_dir(model_dir, step, evaluator.config.name)
      print(f'step {step}, split {evaluator.config.split} -> {out}: '
            f'{evaluator.mixture_name}' + (', held-out templates'
                                           if evaluator.config.heldout_templates else '')
            + (', every example under every template' if evaluator.config.all_templates
               else ''))
      print(eval_report.format_table(results, evaluator.baselines(),
                                     tasks=[t.name for t in evaluator.tasks]))
      if results.get('lang'):
        print(eval_report.format_language_table(evaluator.tasks, results,
                                                evaluator.baselines(), evaluator.languages()))
      print()
  if jax.process_index() == 0:
    from t5x_lite.evaluation import languages  # pylint: disable=import-outside-toplevel
    for text in (eval_report.table_legend([r for _, r in evaluated]),
                 languages.format_run_glance(evaluated, train.mixture)):
      if text:
        print(text + '\n')
  writer.close()
  return 0


def adapter_args(p) -> None:
  from t5x_lite.commands.convert import adapter_args as add  # pylint: disable=import-outside-toplevel
  add(p)


def add_parsers(sub) -> None:
  p = sub.add_parser('infer', help=cmd_infer.__doc__.splitlines()[0])
  common.gin_args(p)
  p.add_argument('--model_dir', required=True)
  common.checkpoint_args(p)
  p.add_argument('--input_file', required=True, help='.txt (one prompt a line) or .jsonl')
  p.add_argument('--output_file', required=True)
  p.add_argument('--mode', choices=('predict', 'score'), default='predict')
  p.add_argument('--batch_size', type=common.int_at_least(1), default=32)
  p.add_argument('--max_input_length', type=common.int_at_least(1), default=512)
  p.add_argument('--max_decode_length', type=common.int_at_least(1), default=128)
  adapter_args(p)
  p.set_defaults(func=cmd_infer)
  p = sub.add_parser('eval', help=cmd_eval.__doc__.splitlines()[0])
  common.gin_args(p)
  p.add_argument('--model_dir', required=True)
  common.checkpoint_args(p)
  p.add_argument('--split', default=None, help='default: the run\'s eval split')
  p.add_argument('--heldout_templates', action='store_true',
                 help="render every task with its held-out templates (FLAN's unseen-template "
                 'protocol)')
  p.add_argument('--name', default=None, help='results in MODEL_DIR/eval/<step>/<name>/ '
                 '(default: the split; with --gin_file/--gin. settings, the split plus a '
                 'digest of them)')
  common.distributed_args(p)
  p.set_defaults(func=cmd_eval)
