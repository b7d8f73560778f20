"""The scores of one eval set: per task, per language, per template, averages, and tables.

A result (what `Evaluator.evaluate` returns and metrics.json stores under 'metrics'):

  {task:  {metric: v,                  # the task's metrics (and rank_accuracy)
           '<lang>/<metric>': v},      # per language, for a task with several languages
   'lang': {'<lang>/avg': v},          # per language: the mean over the tasks in it
   'avg':  {'score': v, metric: v}}    # over tasks: the mean task score; each metric's mean

Rules (documented so a table can be compared with a paper's):
- A task with several languages scores each language with its own tokenization
  (`Task.metric_options_for`), and its task-level score is the mean over its languages,
  as mT5/XTREME report a task's score across languages (corpus BLEU over a zh+en corpus
  with one tokenizer would be meaningless).
- A task's score is the mean of its declared metrics (T5's GLUE average: "for tasks with
  multiple metrics we average them"); rank_accuracy is reported but not averaged in.
- class_precision/recall/f1 average over the task's label set (`Task.label_set`: its
  `labels`, else its options; for an options field, the union over the examples scored
  together), every class counted as T5's `mean_multiclass_f1(num_classes)` does.
- `lang/<lang>/avg` is the macro average over tasks of the task score in that language;
  `avg/score` the macro average of task scores; `avg/<metric>` the mean of a metric over
  the tasks that report it.
"""

from __future__ import annotations

import collections
import logging
from typing import Mapping, Sequence

import numpy as np

from t5x_lite import metrics
from t5x_lite.data import tasks as tasks_lib

RESERVED = ('lang', 'avg')   # pseudo-task names of the averages


def _by_language(task: tasks_lib.Task, names: Sequence[str], examples, references,
                 predictions, languages) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """(task-level scores, {lang: scores}); the second is empty for a single-language set."""
  groups: dict = collections.defaultdict(list)
  for i, lang in enumerate(languages):
    groups[lang].append(i)
  def score(rows, lang):
    labels = task.label_set([examples[i] for i in rows])
    return metrics.compute(names, [references[i] for i in rows],
                           [predictions[i] for i in rows], task.metric_options_for(lang, labels))
  if len(groups) <= 1:
    lang = next(iter(groups), task.language)
    return score(range(len(references)), lang), {}
  per_lang = {str(lang): score(rows, lang) for lang, rows in sorted(groups.items(),
                                                                    key=lambda kv: str(kv[0]))}
  return {n: float(np.mean([s[n] for s in per_lang.values()])) for n in names}, per_lang


def _warn_outside_labels(task: tasks_lib.Task, examples, references) -> None:
  """A class metric over a label set that misses references (a target template that adds
  words to the option, say) scores them as no class: say so once per task."""
  if (task.name in _warned or task.metric_options.get('positive_label') is not None
      or not any(n.startswith('class_') for n in task.metric_names)):
    return
  labels = task.label_set(examples)
  outside = [r[0] for r in references if labels is not None and r[0] not in labels]
  if outside:
    _warned.add(task.name)
    logging.warning('task %s: %d of %d references are not in its label set %s (e.g. %r): '
                    'class_precision/recall/f1 count them as no class (T5 maps them to -1); '
                    'give the task labels= matching its targets.', task.name, len(outside),
                    len(references), list(labels), outside[0])


_warned: set[str] = set()


def score_task(task: tasks_lib.Task, examples: Sequence[dict], predictions: Sequence[str],
               ranked: Sequence[str] | None = None
               ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """(scores, per-template scores) of postprocessed `predictions` (and rank-classified
  answers) against every reference of each example. class_precision/recall/f1 average over
  the task's label set (Task.label_set: its labels or options) where it has one."""
  references = [[task.postprocess(r) for r in e.get('references') or [e['targets']]]
                for e in examples]
  languages = [e.get('language', task.language) for e in examples]
  _warn_outside_labels(task, examples, references)
  scores, per_lang = _by_language(task, task.metric_names, examples, references, predictions,
                                  languages)
  if ranked is not None:
    scores['rank_accuracy'] = _by_language(
        task, ['accuracy'], examples, references, ranked, languages)[0]['accuracy']
  for lang, values in per_lang.items():
    scores.update({f'{lang}/{n}': v for n, v in values.items()})
  templates = {}
  by_template = collections.defaultdict(list)
  for i, e in enumerate(examples):
    by_template[e.get('template', 0)].append(i)
  if len(by_template) > 1:
    for t, rows in sorted(by_template.items()):
      templates[str(t)] = _by_language(
          task, task.metric_names, [examples[i] for i in rows], [references[i] for i in rows],
          [predictions[i] for i in rows], [languages[i] for i in rows])[0]
  return scores, templates


def task_score(task: tasks_lib.Task, scores: Mapping[str, float], lang: str | None = None
               ) -> float:
  """The mean of the task's declared metrics (in `lang` where it has several languages)."""
  key = (lambda n: f'{lang}/{n}') if lang and f'{lang}/{task.metric_names[0]}' in scores \
      else (lambda n: n)
  return float(np.mean([scores[key(n)] for n in task.metric_names]))


def add_averages(results: dict, tasks: Sequence[tasks_lib.Task],
                 languages: Mapping[str, Sequence[str]]) -> dict:
  """Adds 'lang' and 'avg' (see the module docstring); `languages[task]` lists the task's
  languages (empty when it has none recorded)."""
  per_lang = collections.defaultdict(list)
  for task in tasks:
    for lang in languages.get(task.name, ()):
      per_lang[lang].append(task_score(task, results[task.name], lang))
  if per_lang:
    results['lang'] = {f'{lang}/avg': float(np.mean(v)) for lang, v in sorted(per_lang.items())}
  avg = {'score': float(np.mean([task_score(t, results[t.name]) for t in tasks]))} if tasks \
      else {}
  by_metric = collections.defaultdict(list)
  for task in tasks:
    for n in task.metric_names:
      by_metric[n].append(results[task.name][n])
  avg.update({n: float(np.mean(v)) for n, v in by_metric.items()})
  results['avg'] = avg
  return results


def flat_metrics(results: Mapping[str, Mapping[str, float]], prefix: str = 'eval') -> dict:
  """{'<prefix>/<task>/<metric>': value} for metrics.jsonl and TensorBoard."""
  return {f'{prefix}/{task}/{name}': value for task, scores in results.items()
          for name, value in scores.items()}


def _table(rows: list[tuple[str, ...]], left: int) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)


def _cells(value: float, base: float | None) -> tuple[str, str, str]:
  return (f'{value:.1f}', '' if base is None else f'{base:.1f}',
          '' if base is None else f'{value - base:+.1f}')


def format_table(results: Mapping[str, Mapping[str, float]],
                 baselines: Mapping[str, Mapping[str, float]] | None = None,
                 tasks: Sequence[str] | None = None) -> str:
  """A per-task table: every task-level metric, beside the trivial baseline when given."""
  rows = [('task', 'metric', 'score', 'baseline', 'margin')]
  for task in tasks or [t for t in sorted(results) if t not in RESERVED]:
    for name, value in results[task].items():
      if '/' not in name:
        rows.append((task, name) + _cells(value, (baselines or {}).get(task, {}).get(name)))
  if 'score' in results.get('avg', {}):
    rows.append(('average', 'score') + _cells(results['avg']['score'],
                                              (baselines or {}).get('avg', {}).get('score')))
  return _table(rows, 2)


def format_language_table(tasks: Sequence[tasks_lib.Task],
                          results: Mapping[str, Mapping[str, float]],
                          baselines: Mapping[str, Mapping[str, float]] | None,
                          languages: Mapping[str, Sequence[str]]) -> str:
  """Grouped by language: each task's score in it (mean of its metrics), then the average."""
  rows = [('language', 'task', 'score', 'baseline', 'margin')]
  baselines = baselines or {}
  for lang in sorted({l for t in tasks for l in languages.get(t.name, ())}):
    for task in tasks:
      if lang in languages.get(task.name, ()):
        base = baselines.get(task.name)
        rows.append((lang, task.name) + _cells(task_score(task, results[task.name], lang),
                                               base and task_score(task, base, lang)))
    key = f'{lang}/avg'
    rows.append((lang, 'average') + _cells(results['lang'][key],
                                           baselines.get('lang', {}).get(key)))
  return _table(rows, 2)
