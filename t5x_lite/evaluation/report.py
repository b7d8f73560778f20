"""The scores of one eval set: per task, per language, per template, averages, and tables.

A result (what `Evaluator.evaluate` returns and metrics.json stores under 'metrics'):

  {task:  {metric: v,                  # the task's headline metrics (and rank_accuracy)
           '<lang>/<metric>': v,       # per language, for a task with several languages
           'prompts/<stat>/<metric>': v,   # over its templates: median, min, max, spread
           'normalized/<metric>': v,   # against the trivial baseline (and normalized/score)
          },
   'lang': {'<lang>/avg': v},          # per language: the mean over the tasks in it
   'avg':  {'score': v, metric: v,     # over tasks: the mean task score; each metric's mean
            'normalized_score': v}}    # the mean normalized/score

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
- Templates: a task whose examples span several templates is also scored per template
  (metrics.json 'templates': each template's metrics, rank_accuracy and per-language
  scores), and reports `prompts/{median,min,max,spread}/<metric>` over them (spread = max -
  min) for its metrics and rank_accuracy. Its headline (`<metric>`, `<lang>/<metric>`,
  `rank_accuracy`) is, by `headline_rule`: with every example under every template (an eval
  set's all_templates) the median over templates where it has >= 3, else their mean, as T0
  (Sanh et al. 2022, "Multitask Prompted Training Enables Zero-Shot Task Generalization") and
  BLOOMZ/mT0 (Muennighoff et al. 2022, "Crosslingual Generalization through Multitask
  Finetuning", xP3) report the median over prompts; or the set's template_aggregate
  ('median', 'mean', 'first': template 0's, the lowest template id present). A set that
  samples one template per example (the default, FLAN's) keeps the pooled score over all its
  examples unless it names template_aggregate; there each template's score is over its own
  examples, so the spread mixes prompt sensitivity with sampling noise. Each key is
  aggregated on its own: a task's `<metric>` is the median of its per-template task-level
  scores (each a mean over languages), `<lang>/<metric>` the median of that language's.
- `normalized/<metric>` = 100 * (score - baseline) / (100 - baseline), the score against the
  task's trivial baseline (`Task.baseline`, scored on the same examples): 0 at the baseline,
  100 perfect, negative below the baseline (BIG-bench's normalized score, Srivastava et al.
  2022, with the trivial baseline as its low end). Every metric of `t5x_lite.metrics` has
  100 as its best value (mcc ranges -100..100 and is 0 at chance already); a baseline of
  100 or more (or not finite) leaves the metric without one. `normalized/score` is the mean
  of a task's declared metrics' normalized values (where each has one), and
  `avg/normalized_score` the mean over the tasks that have one.
- `lang/<lang>/avg` is the macro average over tasks of the task score in that language;
  `avg/score` the macro average of task scores; `avg/<metric>` the mean of a metric over
  the tasks that report it.
- Seen vs held-out languages: evaluation/languages.py.
"""

from __future__ import annotations

import collections
import logging
from typing import Mapping, Sequence

import numpy as np

from t5x_lite import metrics
from t5x_lite.data import tasks as tasks_lib

RESERVED = ('lang', 'avg')   # pseudo-task names of the averages
GROUPS = ('prompts', 'normalized')   # key prefixes that are not languages
AGGREGATES = ('median', 'mean', 'first')


def language_of(key: str) -> str | None:
  """The language of a `<lang>/<metric>` key of a task's scores; None for a task-level key
  and for the prompts/ and normalized/ keys."""
  head, sep, _ = key.partition('/')
  return head if sep and head not in GROUPS else None


def _by_language(task: tasks_lib.Task, names: Sequence[str], examples, references,
                 predictions, languages, several: bool | None = None
                 ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """(task-level scores, {lang: scores}); the second is empty for a single-language set
  unless `several` (rows of a task with several languages: a template's, say)."""
  groups: dict = collections.defaultdict(list)
  for i, lang in enumerate(languages):
    groups[lang].append(i)
  def score(rows, lang):
    labels = task.label_set([examples[i] for i in rows])
    return metrics.compute(names, [references[i] for i in rows],
                           [predictions[i] for i in rows], task.metric_options_for(lang, labels))
  if len(groups) <= 1 and not (several and groups):
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


def headline_rule(template_aggregate: str | None, all_templates: bool,
                  num_templates: int) -> str | None:
  """How a task's headline comes from its per-template scores (the module docstring):
  'median' | 'mean' | 'first', or None for the pooled score over all its examples."""
  if template_aggregate is not None:
    return template_aggregate
  if not all_templates:
    return None
  return 'median' if num_templates >= 3 else 'mean'


def aggregate_templates(templates: Mapping[str, Mapping[str, float]], how: str
                        ) -> dict[str, float]:
  """Each key's `how` over the templates that have it ('first': the lowest template id's)."""
  ordered = [s for _, s in sorted(templates.items(), key=lambda kv: int(kv[0]))]
  out = {}
  for key in dict.fromkeys(k for s in ordered for k in s):
    values = [s[key] for s in ordered if key in s]
    out[key] = float(values[0] if how == 'first' else
                     np.median(values) if how == 'median' else np.mean(values))
  return out


def prompt_stats(templates: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """`prompts/{median,min,max,spread}/<name>` over the templates of each task-level key
  (spread = max - min); empty with fewer than two templates."""
  if len(templates) < 2:
    return {}
  out = {}
  keys = dict.fromkeys(k for s in templates.values() for k in s if '/' not in k)
  for key in keys:
    values = [s[key] for s in templates.values() if key in s]
    lo, hi = float(np.min(values)), float(np.max(values))
    out.update({f'prompts/median/{key}': float(np.median(values)), f'prompts/min/{key}': lo,
                f'prompts/max/{key}': hi, f'prompts/spread/{key}': hi - lo})
  return out


def score_task(task: tasks_lib.Task, examples: Sequence[dict], predictions: Sequence[str],
               ranked: Sequence[str] | None = None, aggregate: str | None = None
               ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """(scores, per-template scores) of postprocessed `predictions` (and rank-classified
  answers) against every reference of each example. class_precision/recall/f1 average over
  the task's label set (Task.label_set: its labels or options) where it has one.
  `aggregate` (headline_rule): the headline over the per-template scores; None: the pooled
  score of all examples. Per-template scores (and the prompts/ stats) only where the
  examples span several templates."""
  references = [[task.postprocess(r) for r in e.get('references') or [e['targets']]]
                for e in examples]
  languages = [e.get('language', task.language) for e in examples]
  _warn_outside_labels(task, examples, references)
  several = len(set(languages)) > 1

  def scores(rows: Sequence[int]) -> dict[str, float]:
    pick = lambda values: [values[i] for i in rows]
    out, per_lang = _by_language(task, task.metric_names, pick(examples), pick(references),
                                 pick(predictions), pick(languages), several)
    if ranked is not None:
      out['rank_accuracy'] = _by_language(task, ['accuracy'], pick(examples), pick(references),
                                          pick(ranked), pick(languages))[0]['accuracy']
    for lang, values in per_lang.items():
      out.update({f'{lang}/{n}': v for n, v in values.items()})
    return out

  by_template = collections.defaultdict(list)
  for i, e in enumerate(examples):
    by_template[e.get('template', 0)].append(i)
  templates = {str(t): scores(rows) for t, rows in sorted(by_template.items())
               } if len(by_template) > 1 else {}
  if aggregate is None or not templates:
    headline = scores(range(len(examples)))
  else:
    headline = aggregate_templates(templates, aggregate)
  headline.update(prompt_stats(templates))
  return headline, templates


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


def normalized(score: float, baseline: float | None) -> float | None:
  """100 * (score - baseline) / (100 - baseline); None where the baseline is missing, not
  finite, or 100 or more (nothing to gain over it)."""
  if baseline is None or not np.isfinite(baseline) or baseline >= 100:
    return None
  return float(100.0 * (score - baseline) / (100.0 - baseline))


def add_normalized(results: dict, baselines: Mapping[str, Mapping[str, float]],
                   tasks: Sequence[tasks_lib.Task]) -> dict:
  """Adds each task's `normalized/<metric>` (its metrics and rank_accuracy) and
  `normalized/score`, and `avg/normalized_score` (the module docstring). Which keys exist
  depends on the baselines only, never on the scores."""
  per_task = []
  for task in tasks:
    scores, base = results[task.name], baselines.get(task.name, {})
    for name in list(task.metric_names) + ['rank_accuracy']:
      value = normalized(scores[name], base.get(name)) if name in scores else None
      if value is not None:
        scores[f'normalized/{name}'] = value
    if all(f'normalized/{n}' in scores for n in task.metric_names):
      scores['normalized/score'] = float(np.mean([scores[f'normalized/{n}']
                                                  for n in task.metric_names]))
      per_task.append(scores['normalized/score'])
  if per_task:
    results.setdefault('avg', {})['normalized_score'] = float(np.mean(per_task))
  return results


def flat_metrics(results: Mapping[str, Mapping[str, float]], prefix: str = 'eval') -> dict:
  """{'<prefix>/<task>/<metric>': value} for metrics.jsonl and TensorBoard."""
  return {f'{prefix}/{task}/{name}': value for task, scores in results.items()
          for name, value in scores.items()}


def text_table(rows: list[tuple[str, ...]], left: int) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))).rstrip() for r in rows]
  lines.insert(1, '-' * max(map(len, lines)))
  return '\n'.join(lines)


def _cells(value: float, base: float | None) -> tuple[str, str, str]:
  return (f'{value:.1f}', '' if base is None else f'{base:.1f}',
          '' if base is None else f'{value - base:+.1f}')


BAR_WIDTH = 20   # characters of the 0..100 axis of prompt_bar


def prompt_bar(low: float, median: float, high: float, width: int = BAR_WIDTH) -> str:
  """The spread over templates on a 0..100 axis of `width` characters (each 100 / width
  points wide): '=' from the min to the max, '|' at the median, '.' elsewhere; values
  outside 0..100 (mcc below 0) are drawn at the ends, NaN gives ''."""
  if not all(np.isfinite(v) for v in (low, median, high)):
    return ''
  cell = lambda v: min(width - 1, max(0, int(v * width / 100)))
  a, m, b = cell(low), cell(median), cell(high)
  return ''.join('|' if i == m else '=' if a <= i <= b else '.' for i in range(width))


def format_value(value: float | None) -> str:
  return '' if value is None else f'{value:.1f}'


def table_legend(results: Sequence[Mapping[str, Mapping[str, float]]]) -> str | None:
  """What format_table's norm and prompts columns are, a line each, where one of `results`
  (eval sets' results) has them; else None."""
  keys = {k.partition('/')[0] for r in results for t, s in r.items() if t not in RESERVED
          for k in s}
  parts = (['norm: 100 * (score - baseline) / (100 - baseline)'] if 'normalized' in keys
           else []) + (["prompts 0..100: a task's scores over its templates, '=' lowest to "
                        "highest, '|' median"] if 'prompts' in keys else [])
  return '\n'.join(parts) if parts else None


def format_table(results: Mapping[str, Mapping[str, float]],
                 baselines: Mapping[str, Mapping[str, float]] | None = None,
                 tasks: Sequence[str] | None = None) -> str:
  """A per-task table: every task-level metric, beside the trivial baseline when given;
  where the results have them, the normalized score (`norm`) and the spread over templates
  (`prompts 0..100`: prompt_bar, min '=' median '|' max; `spread`: max - min)."""
  tasks = tasks or [t for t in sorted(results) if t not in RESERVED]
  keys = {k.partition('/')[0] for t in tasks for k in results[t]}
  norm, prompts = 'normalized' in keys, 'prompts' in keys
  rows = [('task', 'metric', 'score', 'baseline', 'margin') + (('norm',) if norm else ())
          + (('prompts 0..100', 'spread') if prompts else ())]
  for task in tasks:
    scores = results[task]
    for name, value in scores.items():
      if '/' in name:
        continue
      row = (task, name) + _cells(value, (baselines or {}).get(task, {}).get(name))
      if norm:
        row += (format_value(scores.get(f'normalized/{name}')),)
      if prompts:
        stats = [scores.get(f'prompts/{s}/{name}') for s in ('min', 'median', 'max')]
        row += (prompt_bar(*stats) if None not in stats else '',
                format_value(scores.get(f'prompts/spread/{name}')))
      rows.append(row)
  avg = results.get('avg', {})
  if 'score' in avg:
    rows.append(('average', 'score') + _cells(avg['score'],
                                              (baselines or {}).get('avg', {}).get('score'))
                + ((format_value(avg.get('normalized_score')),) if norm else ())
                + (('', '') if prompts else ()))
  return text_table(rows, 2)


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
  return text_table(rows, 2)

