"""A `Task` (seqio's concept, no TensorFlow): a data source plus instruction templates,
metrics and postprocessing; it renders raw examples into (inputs, targets) text. Or, with an
`objective` (objective_tasks.py), a source of raw text whose inputs and targets the
objective makes (span corruption, prefix LM): no templates, no metric, never decode-evaluated.

Mixtures and mixing rates are in mixtures.py, the name registry in registry.py.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from t5x_lite import errors, validation
from t5x_lite import metrics
from t5x_lite.rundir import names
from t5x_lite.data import templates as tmpl
from t5x_lite.data.objective_tasks import Objective, as_objective
from t5x_lite.data.sources import DataError, DataSource


@dataclasses.dataclass(eq=False)
class Task:
  """One instruction task.

  options: the answer options of a classification task, a fixed list or the name of the
    example field holding them; used for the OPTIONS block and rank classification, and as
    the label set of class_precision/recall/f1 unless `labels` is given (label_set).
  template_mix: weights over templates.FORMATS; default zero-shot, with options if any.
  baseline: the trivial baseline: 'majority' (most frequent train target) or 'copy:FIELD'
    (predict the example's FIELD unchanged).
  metric_names: see t5x_lite.metrics; `exact_match` ignores case and punctuation, so tasks
    where those matter use `accuracy` (exact string equality).
  metric_options: overrides of metrics.MetricOptions (e.g. {'positive_label': 'yes'} for a
    binary F1, {'bleu_tokenize': 'zh'}); the rest follows each example's language.
  language: the language code of every example (e.g. 'en', 'zh'); language_field instead
    names the example field holding it, for a source that mixes languages. Evaluation reports
    per-language results and scores each language with its tokenization.
  max_target_tokens: the longest target the task can have, in tokens, where known: evaluation
    decodes the task's examples no further (None: the eval's max_decode_length).
  objective: an Objective (or its kind, 'span_corruption' / 'prefix_lm') that makes the
    examples from the raw text in `objective.text_field` of any source (JSONL, CSV, TFDS,
    generated); such a task takes no templates, options or metrics and is not evaluated.
  labels: the label set of class_precision/recall/f1, as target texts (postprocessed like
    them; T5 `mean_multiclass_f1(num_classes)` averages over every class, also one absent
    from the references): default the options; without either, the labels of the references
    (metrics._class_counts).
  """
  name: str
  source: DataSource
  templates: Sequence[tmpl.Template] = ()
  metric_names: Sequence[str] | None = None    # None: ('exact_match',); objective tasks: ()
  heldout_templates: Sequence[tmpl.Template] = ()
  options: Sequence[str] | str | None = None
  template_mix: Mapping[str, float] | None = None
  num_fewshot: int = 2
  fewshot_split: str = 'train'
  postprocess_fn: Callable[[str], str] | None = None
  baseline: str = 'majority'
  description: str = ''
  metric_options: Mapping[str, Any] | None = None
  language: str | None = None
  language_field: str | None = None
  max_target_tokens: int | None = None
  objective: Objective | str | None = None
  labels: Sequence[str] | None = None

  def __post_init__(self):
    names.check('task', self.name)
    for split in self.source.splits:
      names.check(f'task {self.name!r} split', split)
    self.objective = as_objective(self.objective)
    if self.objective is not None:
      self._init_objective_task()
      return
    if not self.templates:
      raise validation.ConfigError(f'task {self.name!r} needs at least one template')
    self.templates = tuple(self.templates)
    self.heldout_templates = tuple(self.heldout_templates)
    self.metric_names = ('exact_match',) if self.metric_names is None else tuple(
        self.metric_names)
    metrics.check_metric_names(self.metric_names)
    if self.baseline != 'majority' and not self.baseline.startswith('copy:'):
      raise validation.ConfigError(f"task {self.name!r}: baseline must be 'majority' or "
                                   f"'copy:FIELD', got {self.baseline!r}")
    default = tmpl.ZS_OPT if self.options else tmpl.ZS_NOOPT
    self.formats = tmpl.normalize_mix(self.template_mix or {default: 1.0})
    if self.language and self.language_field:
      raise validation.ConfigError(f'task {self.name!r}: give language or language_field, '
                                   'not both')
    self.metric_options = dict(self.metric_options or {})
    metrics.options_for_language(self.language, **self.metric_options)  # checks the keys
    if self.labels is not None:   # a label set the metrics cannot use fails now, not at eval
      metrics.as_labels(self.labels, f'task {self.name!r}: labels')
    if any(f.startswith('fs') for f in self.formats) and self.num_fewshot < 1:
      raise validation.ConfigError(f'task {self.name!r}: few-shot formats need '
                                   'num_fewshot >= 1')

  def _init_objective_task(self) -> None:
    given = [k for k, v in (('templates', self.templates), ('heldout_templates',
                                                            self.heldout_templates),
                            ('metric_names', self.metric_names), ('options', self.options),
                            ('template_mix', self.template_mix), ('labels', self.labels)) if v]
    if given:
      raise validation.ConfigError(
          f'task {self.name!r}: an objective task makes its inputs and targets from field '
          f'{self.objective.text_field!r} with {self.objective.kind}, and is never '
          f'decode-evaluated: drop {", ".join(given)}')
    if self.language and self.language_field:
      raise validation.ConfigError(f'task {self.name!r}: give language or language_field, '
                                   'not both')
    self.templates = self.heldout_templates = self.metric_names = ()
    self.formats = {}
    self.metric_options = dict(self.metric_options or {})

  # --- raw data ----------------------------------------------------------------------
  @property
  def splits(self) -> tuple[str, ...]:
    return self.source.splits

  def num_examples(self, split: str) -> int:
    return self.source.num_examples(split)

  def example(self, split: str, index: int) -> dict:
    return self.source.split(split)[index]

  def example_language(self, example: Mapping) -> str | None:
    """The example's language code: the task's, or its `language_field`'s value."""
    return str(example[self.language_field]) if self.language_field else self.language

  def metric_options_for(self, language: str | None,
                         labels: Sequence[str] | None = None) -> metrics.MetricOptions:
    """How this task's examples in `language` are scored (tokenizers, positive label), with
    the label set `labels` (label_set) where given."""
    overrides = dict(self.metric_options)
    if labels is not None:
      overrides['labels'] = labels
    return metrics.options_for_language(language, **overrides)

  def label_set(self, examples: Sequence[Mapping] = ()) -> tuple[str, ...] | None:
    """The classes class_precision/recall/f1 average over, postprocessed as the references
    are: `labels`, else the options: a fixed list, or, for an options field that varies per
    example, the union of the options of `examples` (rendered examples, the ones scored
    together: per language, that language's), in order of first appearance. None without
    labels or options (the metrics then take the reference labels)."""
    declared = self.labels if self.labels is not None else self.metric_options.get('labels')
    if declared is not None:
      given = [metrics.as_labels(declared, f'task {self.name!r}: labels')]
    elif self.options is None:
      return None
    elif isinstance(self.options, str):
      given = [e['options'] for e in examples if e.get('options')]
    else:
      given = [self.options]
    labels = tuple(dict.fromkeys(self.postprocess(o) for group in given for o in group))
    return labels or None

  def example_options(self, example: Mapping) -> list[str] | None:
    if self.options is None:
      return None
    if isinstance(self.options, str):
      return list(example[self.options])
    return list(self.options)

  def text(self, split: str, index: int) -> str:
    """An objective task's raw text of example `index` (its `objective.text_field`)."""
    example, field = self.example(split, index), self.objective.text_field
    if field not in example:
      raise DataError(f'task {self.name}: {split}[{index}] has no field {field!r} for its '
                      f'{self.objective.kind} objective (it has {sorted(example)}); set '
                      'text_field to the field holding the raw text.')
    return example[field]

  # --- rendering ---------------------------------------------------------------------
  def render(self, split: str, index: int, rng: np.random.Generator,
             heldout: bool = False, fmt: str | None = None,
             fits: Callable[[str], bool] | None = None, template: int | None = None) -> dict:
    """Draw a format and a template with `rng` and render example `index` of `split`.

    `template` (an index into the pool: `templates`, or `heldout_templates` with `heldout`)
    renders with that template instead of the drawn one; the draws from `rng` are the same
    either way, so every template of an example gets the same format and the same few-shot
    exemplars (evaluation's all_templates: each template scored on identical prompts but
    for the template itself).

    Few-shot exemplars come from `fewshot_split` and never include the example itself.
    `fits` (e.g. pipeline.InputFits: tokens + EOS within the inputs length) makes a few-shot
    prompt that does not fit drop exemplars (templates.fit_exemplars, longest in tokens
    first where `fits` counts them) rather than be cut.
    Returns inputs/targets text, the same prompt as `turns` (the kept exemplars' (inputs,
    targets)) and `query` (the example's own inputs) for chat templates, `references`
    (every target text: several where the target field is a list, `targets` the first, the
    one trained on; metrics use them all), the example's options, the format rendered (a few-shot format left with no exemplar is its
    zero-shot one: templates.rendered_format), the template index and the number of
    exemplars dropped.
    """
    if self.objective is not None:
      raise errors.UserError(
          f'task {self.name!r} has no templates to render: its examples are token ids made '
          f'by its objective, {self.objective.describe()} (Objective.make; the training '
          'pipeline does it), and it is not decode-evaluated: leave it out of eval sets.')
    pool = self.heldout_templates if heldout else self.templates
    if not pool:
      raise errors.UserError(f'task {self.name!r} has no held-out templates: give it '
                             'heldout_templates, or leave it out of held-out-template evals')
    if fmt is None:
      names = list(self.formats)
      fmt = names[rng.choice(len(names), p=list(self.formats.values()))]
    t = int(rng.integers(len(pool)))
    if template is not None:
      if not 0 <= template < len(pool):
        raise errors.UserError(f'task {self.name!r} has {len(pool)} '
                               f'{"held-out " if heldout else ""}templates, no template '
                               f'{template}')
      t = template
    example = self.example(split, index)
    options = self.example_options(example)
    exemplars = []
    if fmt in (tmpl.FS_OPT, tmpl.FS_NOOPT):
      n = self.num_examples(self.fewshot_split)
      candidates = rng.choice(n, size=min(n, self.num_fewshot + 1), replace=False)
      chosen = [int(i) for i in candidates if not (split == self.fewshot_split and i == index)]
      for i in chosen[:self.num_fewshot]:
        shot = self.example(self.fewshot_split, i)
        exemplars.append((shot, self.example_options(shot)))
    inputs, targets, kept = tmpl.fit_exemplars_kept(pool[t], example, fmt, options,
                                                    exemplars, fits)
    dropped = len(exemplars) - len(kept)
    shots, query = tmpl.turns(pool[t], example, fmt, options, kept)
    return {'inputs': inputs, 'targets': targets, 'turns': shots, 'query': query,
            'references': tmpl.references(pool[t], example), 'options': options,
            'format': tmpl.rendered_format(fmt, len(exemplars) - dropped), 'template': t,
            'exemplars_dropped': dropped}

  def eval_rng(self, index: int) -> np.random.Generator:
    """The fixed per-example randomness of evaluation (same prompt on every run)."""
    return np.random.default_rng([zlib.crc32(self.name.encode()), index])

  def postprocess(self, text: str) -> str:
    text = text.strip()
    return self.postprocess_fn(text) if self.postprocess_fn else text

  # --- trivial baseline ----------------------------------------------------------------
  def references(self, split: str) -> list[str]:
    return [self.postprocess(self.render(split, i, self.eval_rng(i))['targets'])
            for i in range(self.num_examples(split))]

  def majority_answer(self) -> str:
    """The most frequent reference of the train split (cached: it renders the whole split)."""
    if getattr(self, '_majority', None) is None:
      split = 'train' if 'train' in self.splits else self.splits[0]
      self._majority = collections.Counter(self.references(split)).most_common(1)[0][0]
    return self._majority

  def baseline_predictions(self, split: str) -> list[str]:
    if self.baseline == 'majority':
      return [self.majority_answer()] * self.num_examples(split)
    field = self.baseline.split(':', 1)[1]
    return [self.postprocess(str(self.example(split, i)[field]))
            for i in range(self.num_examples(split))]

  def baseline_score(self, split: str = 'validation') -> dict[str, float]:
    return metrics.compute(self.metric_names, self.references(split),
                           self.baseline_predictions(split))

  def __repr__(self):
    return f'Task({self.name!r}, {self.source})'
