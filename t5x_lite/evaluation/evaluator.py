"""Per-task evaluation: decode every example of each task's eval split, postprocess, score;
for tasks with answer options also rank classification (FLAN's way: the option with the
highest log-likelihood wins, reported as `rank_accuracy`).

Writes `MODEL_DIR/eval/<step>/<split>/predictions/<task>.jsonl`, then the eval line of
metrics.jsonl, then `eval/<step>/<split>/metrics.json` (process 0), and returns `{task:
{metric: value}}`. Results of one step and split never overwrite another split's; the
metrics.json, written last and atomically, is the record that this eval completed (a run
restarted after a kill redoes an eval without one). The train loop's periodic evaluation and
`t5x-lite eval` share this code.

Each task's examples are rendered once, each with one template drawn per example (FLAN's
protocol), or with `all_templates` under every template of the set (template-major, K x N
examples, each recording its source `index`): every template is then scored on the same
examples, as T0 and BLOOMZ/mT0 (xP3) report the median over prompts. The headline over
templates, the prompts/ stats and the normalized/ scores: evaluation/report.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from t5x_lite import decoding, errors, partitioning, validation
from t5x_lite.evaluation import report as eval_report
from t5x_lite.rundir import names, paths, writers
from t5x_lite.data import eval_inputs, pipeline
from t5x_lite.data import feature_converters, mixtures, tasks as tasks_lib
from t5x_lite.data.vocab import Vocabulary
from t5x_lite.models import Model


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  feature_lengths: Mapping[str, int]     # inputs length; targets = max_decode_length
  batch_size: int = 32                   # global
  split: str = 'validation'
  max_examples: int | None = None        # per task (the first N), None = all
  heldout_templates: bool = False
  decoding: decoding.DecodingConfig = decoding.DecodingConfig()
  rank_classification: bool = True
  # Speed; False/False is the reference (T5X/FLAN): every input padded to the full length,
  # options to the targets length, and each (input, option) pair scored as its own example.
  length_buckets: bool = True            # inputs sorted into padded lengths 16, 32, ... (order kept)
  encode_once: bool = True               # rank classification encodes each input once
  log_prefix: str = 'eval'               # metrics.jsonl / TensorBoard: <prefix>/<task>/<metric>
  name: str | None = None                # results in eval/<step>/<name>/; default: the split
  prompt_length: int = 0                 # soft prompt ids before every input (prompt tuning)
  all_templates: bool = False            # every example under every template (evaluation/sets.py)
  template_aggregate: str | None = None  # a task's headline over templates (evaluation/sets.py)
  heldout: bool = False                  # the set's scores are zero-shot claims
  selected_by: Mapping[str, Any] | None = None   # keep_best's key and set (recorded)

  def __post_init__(self):   # both become directories under MODEL_DIR/eval/<step>/
    names.check('eval split', self.split)
    if self.name is not None:
      names.check('eval results', self.name)
    if self.template_aggregate not in (None,) + eval_report.AGGREGATES:
      raise errors.UserError(f'template_aggregate must be one of '
                             f'{", ".join(eval_report.AGGREGATES)} (or None: median over >= 3 '
                             f'templates, else mean), got {self.template_aggregate!r}')


def results_dir(model_dir: str, step: int, split: str) -> str:
  return paths.under(model_dir, 'eval', str(step), split)


def completed(model_dir: str, step: int, split: str) -> bool:
  """Whether the eval of `step` on `split` ran to its end (its metrics.json exists)."""
  return paths.exists(paths.join(results_dir(model_dir, step, split), 'metrics.json'))


def check_split(mixture: mixtures.Mixture, split: str) -> None:
  """An eval split that none of the mixture's tasks has is a typo, not an empty eval; a
  mixture of objective tasks only (span corruption, prefix LM: no metric) has nothing to
  evaluate."""
  having = [t for t in mixture.tasks if split in t.splits]
  if having:
    if all(t.objective is not None for t in having):
      raise validation.ConfigError(
          f'{mixture.name!r} has only objective tasks ({", ".join(t.name for t in having)}): '
          'their targets are made by span corruption / prefix LM, with no metric, so they '
          'are not decode-evaluated. Evaluate a mixture with instruction tasks (eval_mixture '
          '/ eval_mixtures), or set eval_period = 0 and eval_at_end = False.')
    return
  known = sorted({s for t in mixture.tasks for s in t.splits})
  close = difflib.get_close_matches(split, known, n=1)
  groups: dict[tuple, list[str]] = {}   # tasks by their splits: one line when all agree
  for t in mixture.tasks:
    groups.setdefault(tuple(t.splits), []).append(t.name)
  raise errors.UserError(
      f'no task of {mixture.name!r} has a split {split!r}'
      + (f' (did you mean {close[0]!r}?)' if close else '') + '; their splits: '
      + '; '.join(f'{", ".join(s)}' + (f' ({", ".join(n)})' if len(groups) > 1 else '')
                  for s, n in groups.items()))


class Evaluator:
  """Renders each task's eval examples once; `evaluate(params, step)` decodes and scores."""

  def __init__(self, model: Model, mixture: mixtures.Mixture, vocab: Vocabulary,
               config: EvalConfig, mesh: jax.sharding.Mesh, params_shardings: Any, rules,
               params_for_task: Callable[[Any, str], Any] | None = None,
               feature_converter: feature_converters.FeatureConverter | None = None):
    """`params_for_task(params, task_name)`: the params that decode `task` (a per-task
    adapter routed to its slots: training.start.Served); default: `params` for all.
    `feature_converter`: the training run's (default: the model's kind, `for_kind`); its
    eval rows give each example's prompt (`model_inputs`), which decoding and rank
    classification read through the model interface."""
    self.model, self.vocab, self.config, self.mesh, self.rules = model, vocab, config, mesh, rules
    converter = feature_converter or feature_converters.for_kind(model.feature_kind)
    if converter.kind != model.feature_kind:
      raise validation.ConfigError(
          f'the feature converter {type(converter).__name__} makes {converter.kind} batches '
          f'but the {model.family} model reads {model.feature_kind} batches')
    self.converter = converter.for_eval()
    self.params_for_task = params_for_task or (lambda params, task: params)
    partitioning.check_batch_size(config.batch_size, mesh)
    check_split(mixture, config.split)
    pipeline.check_prompt_length(config.prompt_length, config.feature_lengths['inputs'])
    self.mixture_name = mixture.name
    self.tasks = [t for t in mixture.tasks if config.split in t.splits]
    # Left out, each kind named in one log line and recorded in metrics.json: objective
    # tasks (no metric; check_split: not all of them) and, for a held-out-template set,
    # tasks that declare no held-out templates (the normal case in a real mixture).
    self.left_out: dict[str, str] = {}
    for reason, out in (
        ('objective tasks', lambda t: t.objective is not None),
        ('tasks without held-out templates',
         lambda t: config.heldout_templates and not t.heldout_templates)):
      gone = [t.name for t in self.tasks if out(t)]
      if gone and len(gone) == len(self.tasks):   # (check_split: not all are objective tasks)
        raise validation.ConfigError(
            f'the held-out-template eval of {mixture.name!r} ({config.split}) has nothing to '
            f'evaluate: none of its tasks ({", ".join(gone)}) declares heldout_templates. '
            'Give some of them heldout_templates, or drop heldout_templates from this set.')
      if gone:
        logging.info('eval of %r leaves out its %s %s', mixture.name, reason, ', '.join(gone))
        self.left_out.update(dict.fromkeys(gone, reason))
        self.tasks = [t for t in self.tasks if not out(t)]
    self.examples = {}
    fits = pipeline.InputFits(vocab, config.feature_lengths['inputs'],   # as in training
                              config.prompt_length)
    for task in self.tasks:
      n = task.num_examples(config.split)
      if config.max_examples:
        n = min(n, config.max_examples)
      pool = task.heldout_templates if config.heldout_templates else task.templates
      # all_templates: template-major, K x N; `index` is each one's example in the split.
      chosen = range(len(pool)) if config.all_templates else [None]
      self.examples[task.name] = [
          dict(task.render(config.split, i, task.eval_rng(i), heldout=config.heldout_templates,
                           fits=fits, template=t),
               language=task.example_language(task.example(config.split, i)), index=i)
          for t in chosen for i in range(n)]
    for task in self.tasks:
      if task.name in eval_report.RESERVED:
        raise errors.UserError(f'a task may not be named {task.name!r}: the eval reports '
                               'its averages under that name')
    for task, langs in self.languages().items():
      if set(langs) & set(eval_report.GROUPS):
        raise errors.UserError(f'task {task}: a language may not be named '
                               f'{" or ".join(eval_report.GROUPS)} (their keys)')
    batch_sharding = partitioning.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    self._decoders = {}   # decode buffer length -> compiled decoder
    self._decoder = lambda length: model.ops.decode_jit(
        lambda params, tokens, mask, limit: decoding.predict(
            model, params, tokens, length, config.decoding, vocab.eos_id, limit,
            inputs_mask=mask)[0][:, 0],
        in_shardings=(params_shardings, batch_sharding, batch_sharding, replicated),
        out_shardings=replicated)
    self._score = jax.jit(
        lambda params, inputs, inputs_mask, options, options_mask: model.score_options(
            params, inputs, options, inputs_mask=inputs_mask, options_mask=options_mask),
        in_shardings=(params_shardings,) + (batch_sharding,) * 4, out_shardings=replicated)
    self._gather = jax.jit(lambda x: x, out_shardings=replicated)
    self._baselines: dict[str, dict[str, float]] = {}

  def baselines(self) -> dict[str, dict[str, float]]:
    """Each task's trivial-baseline scores on the evaluated examples (each rendered example
    predicted from its source example), laid out as `evaluate`'s results (per language, per
    template, averages; no normalized/ keys)."""
    if not self._baselines:
      for task in self.tasks:
        examples = self.examples[task.name]
        preds = task.baseline_predictions(self.config.split)
        preds = [preds[e['index']] for e in examples]
        self._baselines[task.name] = eval_report.score_task(
            task, examples, preds, preds if self._ranks(task) else None,
            self.template_aggregate(task))[0]
      eval_report.add_averages(self._baselines, self.tasks, self.languages())
    return self._baselines

  def template_aggregate(self, task: tasks_lib.Task) -> str | None:
    """How `task`'s headline comes from its per-template scores (report.headline_rule):
    'median' | 'mean' | 'first', or None (the pooled score)."""
    count = len({e.get('template', 0) for e in self.examples[task.name]})
    return eval_report.headline_rule(self.config.template_aggregate, self.config.all_templates,
                                     count)

  def _in_example_order(self, fn, params: Any, examples: Sequence[dict], task_name: str,
                        features: Sequence[str], extra=None) -> np.ndarray:
    """`fn(params, *features)`'s output row of every example, in example order.

    Batches come from `eval_inputs.eval_batches`, length-bucketed unless the config says not:
    sorted by input length, each padded to its bucket; every process sees the same batches
    in the same order and shapes, and the indices put each output row back at its example.
    The features `inputs` and `inputs_mask` are each row's prompt and its tokens (the
    converter's `model_inputs`, `model_inputs_mask`).
    `extra(indices)` adds host-local features of the batch's rows (-1: padding).

    Each process feeds its own rows of a global batch, and `make_array_from_process_local_data`
    puts them on that process's devices wherever the mesh has those devices: the global row
    order is the batch order only when the mesh lists devices in process order. So with
    several processes each row's example index (-1 on padding) travels beside the features
    with the same sharding and comes back gathered like the outputs; one process's local batch
    is the global batch, in order, so its own indices serve (nothing extra to transfer).
    """
    gather = jax.process_count() > 1
    out, seen = None, np.zeros(len(examples), bool)
    lengths = self.config.feature_lengths
    buckets = eval_inputs.bucket_lengths(lengths['inputs']) if self.config.length_buckets else None
    for batch, indices in eval_inputs.eval_batches(examples, self.vocab, lengths,
                                                self.config.batch_size, task_name=task_name,
                                                buckets=buckets,
                                                prompt_length=self.config.prompt_length,
                                                feature_converter=self.converter):
      local = {'inputs': self.converter.model_inputs(batch, lengths['targets']),
               'inputs_mask': self.converter.model_inputs_mask(batch, lengths['targets'])}
      local.update({name: batch[name] for name in features if name in batch})
      local.update(extra(indices) if extra else {})
      if gather:
        local['index'] = indices.astype(np.int32)
      arrays = partitioning.global_batch(local, self.mesh)
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        values = np.asarray(fn(params, *(arrays[name] for name in features)))
        index = np.asarray(self._gather(arrays['index'])) if gather else indices
      if out is None:
        out = np.zeros((len(examples),) + values.shape[1:], values.dtype)
      rows = index >= 0
      out[index[rows]], seen[index[rows]] = values[rows], True
    if not seen.all():
      raise RuntimeError(f'task {task_name}: no output came back for examples '  # internal
                         f'{np.flatnonzero(~seen)[:10].tolist()} (eval batches and mesh disagree)')
    return out if out is not None else np.zeros(0)

  def decode_length(self, task: tasks_lib.Task) -> int:
    """Tokens decoded for `task`'s examples: its longest target plus EOS where it declares
    one (`Task.max_target_tokens`, counted without EOS, as seqio's Evaluator decodes to the
    longest target it measured, EOS included: seqio/evaluation.py
    `_cache_and_measure_examples`), never over feature_lengths['targets']. A prediction
    that ends within it reads the same as with the full length."""
    full = self.config.feature_lengths['targets']
    return full if task.max_target_tokens is None else min(task.max_target_tokens + 1, full)

  def predict(self, params: Any, task: tasks_lib.Task) -> list[str]:
    """Each example's decoded text. Greedy and sampling share one compiled decoder per input
    bucket (the task's decode length is a run-time limit); beam search compiles per length."""
    length = self.decode_length(task)
    buffer = length if self.config.decoding.method == 'beam' else (
        self.config.feature_lengths['targets'])
    if buffer not in self._decoders:
      self._decoders[buffer] = self._decoder(buffer)
    limit = None if self.config.decoding.method == 'beam' else np.int32(length)
    fn = lambda params, tokens, mask: self._decoders[buffer](params, tokens, mask, limit)
    outputs = self._in_example_order(fn, self.params_for_task(params, task.name),
                                     self.examples[task.name], task.name,
                                     ['inputs', 'inputs_mask'])
    return [self.converter.decode(self.vocab, o) for o in outputs]

  def rank_scores(self, params: Any, task: tasks_lib.Task) -> list[np.ndarray]:
    """Each example's log-likelihood of each of its options (an options task): the input
    is encoded once and all its options scored against it (`Model.score_options`), or
    without `encode_once` each (input, option) pair scored as its own example."""
    examples = self.examples[task.name]
    units = examples if self.config.encode_once else [
        dict(e, options=[o]) for e in examples for o in e['options']]
    if not units:
      return []
    options, mask = eval_inputs.option_targets(units, self.vocab, self.config.feature_lengths,
                                               task.name, bucketed=self.config.length_buckets,
                                               feature_converter=self.converter)
    real = lambda indices: (indices >= 0)[:, None, None]
    extra = lambda indices: {
        'option_targets': np.where(real(indices), options[np.maximum(indices, 0)], 0),
        'options_mask': real(indices) & mask[np.maximum(indices, 0)]}
    scores = self._in_example_order(self._score, self.params_for_task(params, task.name),
                                    units, task.name,
                                    ['inputs', 'inputs_mask', 'option_targets', 'options_mask'],
                                    extra)
    if not self.config.encode_once:
      return np.split(scores[:, 0], np.cumsum([len(e['options']) for e in examples])[:-1])
    return [s[:len(e['options'])] for e, s in zip(examples, scores)]

  def rank_classify(self, params: Any, task: tasks_lib.Task) -> list[str]:
    """FLAN's rank classification: the option with the highest log-likelihood wins."""
    return [e['options'][int(np.argmax(s))]
            for e, s in zip(self.examples[task.name], self.rank_scores(params, task))]

  def languages(self) -> dict[str, list[str]]:
    """Each task's languages in its eval examples (empty when none is recorded)."""
    return {task: sorted({e['language'] for e in examples if e.get('language')})
            for task, examples in self.examples.items()}

  def expected_keys(self) -> list[str]:
    """Every metrics.jsonl key `evaluate` writes (keep_best is checked against these before
    training starts): the keys of the baselines' results, which score the same examples the
    same way, plus the normalized/ keys (which exist by the baselines alone)."""
    results = {k: dict(v) for k, v in self.baselines().items()}
    eval_report.add_normalized(results, self.baselines(), self.tasks)
    return sorted(flat_metrics(results, self.config.log_prefix))

  def _ranks(self, task: tasks_lib.Task) -> bool:
    examples = self.examples[task.name]
    return bool(self.config.rank_classification and examples and examples[0].get('options'))

  def evaluate(self, params: Any, step: int, model_dir: str | None = None,
               writer: writers.MetricsWriter | None = None) -> dict[str, dict[str, float]]:
    """Scores every task (see eval_report for the layout: per task, per language, averages);
    with `model_dir` writes predictions, the metrics.jsonl line (to `writer`) and last the
    metrics.json (with per-template scores) that marks this eval of `step` complete."""
    results, templates = {}, {}
    name = self.config.name or self.config.split
    out_dir = results_dir(model_dir, step, name) if model_dir else None
    for task in self.tasks:
      examples = self.examples[task.name]
      raw = self.predict(params, task)
      predictions = [task.postprocess(p) for p in raw]
      ranked = ([task.postprocess(c) for c in self.rank_classify(params, task)]
                if self._ranks(task) else None)
      results[task.name], templates[task.name] = eval_report.score_task(
          task, examples, predictions, ranked, self.template_aggregate(task))
      if out_dir and jax.process_index() == 0:
        _write_predictions(out_dir, task.name, examples, raw, predictions)
    eval_report.add_averages(results, self.tasks, self.languages())
    eval_report.add_normalized(results, self.baselines(), self.tasks)
    if writer is not None:
      writer.write(step, flat_metrics(results, self.config.log_prefix),
                   replaces=f'{self.config.log_prefix}/')
    if out_dir and jax.process_index() == 0:
      paths.makedirs(out_dir)
      writers.write_text_atomic(paths.join(out_dir, 'metrics.json'), json.dumps(
          {'step': step, 'split': self.config.split, 'name': name,
           'mixture': self.mixture_name, 'heldout_templates': self.config.heldout_templates,
           'heldout': self.config.heldout, 'checkpoint_selected_by': self.config.selected_by,
           'all_templates': self.config.all_templates,
           'template_aggregate': {t.name: self.template_aggregate(t) or 'pooled'
                                  for t in self.tasks},
           'decoding': dataclasses.asdict(self.config.decoding),
           'max_examples': self.config.max_examples, 'metrics': results,
           'templates': templates, 'languages': self.languages(),
           'baselines': self.baselines(), 'left_out': self.left_out}, indent=2))
    return results


def _write_predictions(out_dir, task_name, examples, raw, predictions) -> None:
  directory = paths.under(out_dir, 'predictions')
  paths.makedirs(directory)
  with paths.open_file(paths.under(directory, f'{task_name}.jsonl'), 'w') as f:
    for example, r, p in zip(examples, raw, predictions):
      record = {'inputs': example['inputs'], 'targets': example['targets'], 'prediction': r,
                'postprocessed': p, 'template': example.get('template'),
                'index': example.get('index'),
                'format': example.get('format'), 'language': example.get('language')}
      if len(example.get('references') or ()) > 1:
        record['references'] = example['references']
      f.write(json.dumps(record, ensure_ascii=False) + '\n')


flat_metrics = eval_report.flat_metrics
format_table = eval_report.format_table
