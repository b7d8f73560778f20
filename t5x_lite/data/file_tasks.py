"""Bring your own data: tasks and mixtures over JSONL / CSV / Parquet / Arrow files, from gin.

`gin_configs/mixtures/real_example.gin` shows the pattern: each `file_task` reads one file
per split under `data_dir`, renames fields for its FLAN-style templates and registers
itself; `file_mixture` groups them with examples-proportional rates. A `file_task` with
`objective='span_corruption'` (or 'prefix_lm') trains on a raw-text field instead.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from etils import epath

from t5x_lite import validation
from t5x_lite import metrics
from t5x_lite.data import mixtures, objective_tasks, registry, tasks as tasks_lib
from t5x_lite.data.arrow_sources import ArrowSource, ParquetSource
from t5x_lite.data.sources import CsvSource, DataError, JsonlSource, _split_slice
from t5x_lite.data.templates import Template


def _template(t) -> Template:
  if isinstance(t, Template):
    return t
  if isinstance(t, str):
    return Template(t)
  if isinstance(t, (tuple, list)) and len(t) == 2:
    return Template(*t)
  raise validation.ConfigError(f'a template is (inputs_format, targets_format) or a Template, '
                               f'got {t!r}')


def _json_list(text: str, where: str) -> list[str]:
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    value = None
  if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
    raise DataError(f'{where}: expected a JSON array of strings like ["a", "b"] (a list '
                    f'field), got {text!r}')
  return value


def _kind(pattern: str) -> str:
  """A file's extension; a directory of .parquet (.jsonl) files counts as '.parquet'
  ('.jsonl'), any other path without an extension (a datasets.save_to_disk directory) as
  '.arrow'."""
  extension = os.path.splitext(pattern)[1].lower()
  if extension:
    return extension
  directory = epath.Path(pattern)   # (one that does not exist: ArrowSource says so)
  for kind in ('.parquet', '.jsonl'):
    if directory.is_dir() and any(directory.glob('*' + kind)):
      return kind
  return '.arrow'


def file_task(name: str, files: Mapping[str, str], templates: Sequence = (),
              metric_names: Sequence[str] | None = None, data_dir: str = '',
              field_map: Mapping[str, str] | None = None,
              heldout_templates: Sequence = (), options: Sequence[str] | str | None = None,
              template_mix: Mapping[str, float] | None = None, num_fewshot: int = 1,
              baseline: str = 'majority', description: str = '',
              list_fields: Sequence[str] = (), language: str | None = None,
              language_field: str | None = None, metric_options: Mapping | None = None,
              max_target_tokens: int | None = None,
              objective: str | objective_tasks.Objective | None = None,
              text_field: str = 'text', labels: Sequence[str] | None = None,
              where: Mapping[str, Any] | None = None, cap: Mapping[str, int] | None = None,
              register: bool = True) -> tasks_lib.Task:
  """A task over JSONL (.jsonl/.json: a file, a glob or a directory of them per split) or
  one CSV/TSV (.csv/.tsv) file per split, or Parquet (.parquet files, a glob of them or a
  directory) or Arrow (a `datasets.save_to_disk` directory, .arrow files) per split:
  arrow_sources.py.

  `files` maps split -> path relative to `data_dir` (optionally with a row slice,
  'test.jsonl[:100]'); `field_map` maps template field -> file field. `where` keeps the rows
  whose file column holds one of the given values, before the slice (`where =
  {'template_type': ['zs_opt', 'fs_opt']}`: one file, several tasks); on Parquet/Arrow,
  `cap = {'task_name': 30000}` then keeps at most 30000 rows of each task_name (a seeded
  sample: Flan's per-task example caps, table_rows.py). A target field may
  hold several references (a JSON list in JSONL; in CSV a JSON array in a column named in
  `list_fields`): training uses the first, metrics all of them (Task.render 'references').
  The other arguments are Task's; among them `labels`, the label set of class_precision /
  class_recall / class_f1 (T5 `mean_multiclass_f1` averages over every class, also one no
  reference has; default the `options`: in gin, `labels = ['negative', 'positive']`).

  `objective` ('span_corruption', 'prefix_lm' or an objective_tasks.Objective) makes the
  task an unsupervised one on the raw text of `text_field` (checked on every line; an
  Objective brings its own): no templates or metrics, never decode-evaluated. The same on a
  TFDS dataset, in Python: `Task('c4_spans', TfdsSource('c4/en', data_dir=...),
  objective='span_corruption')` (any DataSource).
  """
  if isinstance(objective, objective_tasks.Objective) and text_field not in (
      'text', objective.text_field):
    raise DataError(f'task {name}: text_field={text_field!r} but the Objective reads '
                    f'{objective.text_field!r}: give the field in one place')
  objective = objective_tasks.as_objective(objective, text_field)
  paths = {split: os.path.join(data_dir, path) if data_dir else path
           for split, path in files.items()}
  kinds = {_kind(_split_slice(p)[0]) for p in paths.values()}
  # Every file field a template reads (through field_map) is checked on every line.
  renamed = dict(field_map or {})
  used = {f for t in list(templates) + list(heldout_templates) for f in _template(t).fields()}
  if objective is not None:
    used.add(objective.text_field)
  if isinstance(options, str):
    used.add(options)
  required = sorted({renamed.get(f, f) for f in used} | set(renamed.values()))
  if cap is not None and not kinds <= {'.parquet', '.arrow'}:
    raise DataError(f'task {name}: cap= needs Parquet or Arrow files, got {sorted(kinds)}')
  if kinds <= {'.jsonl', '.json'}:
    source = JsonlSource(paths, field_map=field_map, required_fields=required, where=where)
  elif kinds <= {'.csv', '.tsv'}:
    source = CsvSource(paths, field_map=field_map, required_fields=required,
                       delimiter='\t' if kinds == {'.tsv'} else ',', where=where)
  elif kinds == {'.parquet'}:
    source = ParquetSource(paths, field_map=field_map, required_fields=required, where=where,
                           cap=cap)
  elif kinds == {'.arrow'}:
    source = ArrowSource(paths, field_map=field_map, required_fields=required, where=where,
                         cap=cap)
  else:
    raise DataError(f'task {name}: files must all be .jsonl/.json or all .csv/.tsv (or all '
                    '.parquet, or all .arrow / datasets.save_to_disk directories), got '
                    f'{sorted(kinds)}')
  if set(list_fields) - used:
    raise DataError(f'task {name}: list_fields {sorted(set(list_fields) - used)} are not '
                    f'template fields; the templates read {sorted(used)}')
  if list_fields and kinds <= {'.csv', '.tsv'}:
    for split in source.splits:
      for i, row in enumerate(source.split(split)):
        for field in list_fields:
          row[field] = _json_list(row[field], f'{paths[split]} row {i + 1} field {field!r}')
  task = tasks_lib.Task(
      name, source, [_template(t) for t in templates], metric_names=metric_names,
      heldout_templates=[_template(t) for t in heldout_templates], options=options,
      template_mix=template_mix, num_fewshot=num_fewshot, baseline=baseline,
      description=description, language=language, language_field=language_field,
      metric_options=metric_options, max_target_tokens=max_target_tokens, objective=objective,
      labels=None if labels is None else list(metrics.as_labels(labels, f'task {name}: labels')))
  return registry.register(task, overwrite=True) if register else task


def file_mixture(name: str, tasks: Sequence[tasks_lib.Task | mixtures.Mixture | str],
                 maximum: int | None = None, temperature: float = 1.0,
                 loss_weights: Mapping[str, float] | None = None,
                 register: bool = True) -> mixtures.Mixture:
  """Examples-proportional mixture (FLAN: cap each task at `maximum`, then r ** (1/T))."""
  mixture = mixtures.Mixture(name, list(tasks),
                             default_rate=mixtures.examples_proportional(maximum, temperature),
                             loss_weights=loss_weights)
  return registry.register(mixture, overwrite=True) if register else mixture
