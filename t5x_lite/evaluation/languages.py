"""Per-language zero-shot at a glance: which languages a run was trained on, and one table
over its eval sets of every task family's score per language, seen languages beside
held-out ones, their macro averages and the gap (the cross-lingual zero-shot claim of
mT5/XTREME-style evaluations: train in some languages, evaluate in others).

A language is *seen* when a task of the training mixture has it (`training_languages`: a
task's `language`, or the values of its `language_field` over its train split), *held out*
otherwise. The table's columns are task families (`task_family`: the same task in other
languages, named with a language suffix, shares a column).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np

from t5x_lite.data import mixtures
from t5x_lite.data import tasks as tasks_lib
from t5x_lite.evaluation.report import format_value, task_score, text_table


def training_languages(mixture: Any, split: str = 'train') -> set[str]:
  """The languages a model trained on `mixture` (a Mixture or its name) has seen: each
  task's `language`, or for a `language_field` task the values of that field over its
  `split` (read once per task and cached: every example of the split is read)."""
  return set().union(*(_task_languages(t, split) for t in mixtures.get_mixture(mixture).tasks))


@functools.lru_cache(maxsize=None)
def _task_languages(task: tasks_lib.Task, split: str) -> frozenset[str]:
  if task.language_field is None:
    return frozenset({task.language} if task.language else ())
  if split not in task.splits:
    return frozenset()
  examples = task.source.split(split)
  return frozenset(str(examples[i][task.language_field])
                   for i in range(task.num_examples(split)))


def task_family(name: str, languages: Sequence[str]) -> str:
  """A task's name less its trailing `_<lang>` parts that are languages of the task
  (`builtin_xl_arithmetic_de_es` in de/es -> `builtin_xl_arithmetic`): the same task
  family in other languages gets the same column in format_language_glance."""
  parts = name.split('_')
  while len(parts) > 1 and parts[-1] in languages:
    parts.pop()
  return '_'.join(parts)


def format_language_glance(sets: Sequence[tuple[Sequence[tasks_lib.Task], Mapping[str, Any],
                                                Mapping[str, Sequence[str]]]],
                           seen: set[str]) -> str | None:
  """Per-language zero-shot at a glance, over several eval sets ((tasks, results,
  languages) each): a row per language, seen languages (`seen`: training_languages) first,
  each marked; a column per task family (task_family; a prefix common to every column is
  named once above the table and left out of the columns) with the task's score in that
  language (task_score; the first set's where several have it), and the row's mean; then
  the mean over the seen and over the held-out languages of each column (macro averages
  over languages) and the gap, held-out minus seen. None when the sets hold fewer than two
  languages or no held-out one."""
  cells: dict[tuple[str, str], float] = {}
  for tasks, results, languages in sets:
    for task in tasks:
      langs = list(languages.get(task.name) or ())
      for lang in langs:
        cells.setdefault((lang, task_family(task.name, langs)),
                         task_score(task, results[task.name], lang))
  langs = {lang for lang, _ in cells}
  if len(langs) < 2 or not langs - set(seen):
    return None
  families = list(dict.fromkeys(f for _, f in cells))
  prefix = _common_prefix(families) if len(families) > 1 else ''
  order = sorted(langs & set(seen)) + sorted(langs - set(seen))
  mean = lambda values: float(np.mean(values)) if values else None
  table = {lang: [cells.get((lang, f)) for f in families] for lang in order}
  for lang, row in table.items():
    row.append(mean([v for v in row if v is not None]))
  rows = [('language', '') + tuple(f[len(prefix):] for f in families) + ('avg',)]
  rows += [(lang, 'seen' if lang in seen else 'held-out') + tuple(map(format_value, row))
           for lang, row in table.items()]
  column = lambda group, j: mean([table[l][j] for l in group if table[l][j] is not None])
  seen_langs = [l for l in order if l in seen]
  held = [l for l in order if l not in seen]
  averages = {name: [column(group, j) for j in range(len(families) + 1)]
              for name, group in (('seen', seen_langs), ('held-out', held))}
  gap = [None if s is None or h is None else h - s
         for s, h in zip(averages['seen'], averages['held-out'])]
  rows += [('average', name) + tuple(map(format_value, values))
           for name, values in averages.items()]
  rows.append(('gap', 'held-out - seen') + tuple('' if v is None else f'{v:+.1f}' for v in gap))
  title = ('Per language, seen (in the training mixture) vs held-out'
           + (f'; tasks {prefix}*' if prefix else '') + ':')
  return title + '\n' + text_table(rows, 2)


def _common_prefix(names: Sequence[str]) -> str:
  """The longest prefix of every name ending in '_' that leaves each a non-empty rest."""
  prefix = names[0]
  for name in names[1:]:
    while not name.startswith(prefix):
      prefix = prefix[:-1]
  prefix = prefix[:prefix.rfind('_') + 1]
  return prefix if all(len(n) > len(prefix) for n in names) else ''


def format_run_glance(evals: Sequence[tuple[Any, Mapping[str, Any]]],
                      training_mixture: Any) -> str | None:
  """format_language_glance over a run's evaluated sets ((Evaluator, results) each) against
  the languages of `training_mixture`; sets of held-out templates are left out (they test
  new phrasings, not new languages). None where the sets hold fewer than two languages
  (the training mixture is then not read)."""
  sets = [(e.tasks, r, e.languages()) for e, r in evals
          if r and not e.config.heldout_templates]
  if len({l for _, _, langs in sets for ls in langs.values() for l in ls}) < 2:
    return None
  return format_language_glance(sets, training_languages(training_mixture))
