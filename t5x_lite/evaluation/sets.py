"""Named eval sets (`TrainConfig.eval_mixtures`): the training mixture, held-out tasks and
held-out templates evaluated side by side, each reported under its own prefix.

In gin, each entry maps a set name to a mixture (or task) name, or to a dict with the keys
`mixture`, `heldout_templates`, `split`, `heldout`, `all_templates`, `template_aggregate`:

    loop.TrainConfig.eval_mixtures = {
        'seen': 'builtin',
        'heldout_tasks': 'builtin_heldout',
        'heldout_templates': {'mixture': 'builtin', 'heldout_templates': True}}

`heldout` marks a set whose scores are zero-shot claims (default: True where the name contains
'heldout' or the set renders held-out templates): the run refuses to start when one of its
tasks is trained on, or one of its held-out templates is a training template, and audits its
examples for contamination first (evaluation/heldout.py). `all_templates` renders every
example with every template of the set (K x N predictions, each template scored on the same
examples); `template_aggregate` ('median' | 'mean' | 'first'; default: median where a task
has >= 3 templates in the set, else mean) picks a task's headline score over its templates.

A set logs `eval/<set>/<task>/<metric>` and writes eval/<step>/<set>/. Without
eval_mixtures a run has one set, `eval_mixture` (default: the training mixture), logged as
`eval/<task>/<metric>` in eval/<step>/<split>/, as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from t5x_lite import errors
from t5x_lite.data import mixtures
from t5x_lite.evaluation import evaluator as evaluation
from t5x_lite.rundir import names

_KEYS = ('mixture', 'heldout_templates', 'split', 'heldout', 'all_templates',
         'template_aggregate')
AGGREGATES = ('median', 'mean', 'first')


@dataclasses.dataclass(frozen=True)
class EvalSet:
  name: str | None            # None: the run's single default set
  mixture: Any                # name or object
  heldout_templates: bool = False
  split: str | None = None    # None: the run's eval_split
  prefix: str | None = None   # None: eval (the default set) or eval/<name>
  renamed: bool = False       # name is the results directory as is (t5x-lite eval --name)
  heldout: bool | None = None  # None: 'heldout' in the name or heldout_templates
  all_templates: bool = False  # every example under every template of the set
  template_aggregate: str | None = None   # None: median with >= 3 templates, else mean

  def __post_init__(self):
    if self.heldout is None:
      object.__setattr__(self, 'heldout', bool(
          self.heldout_templates or (self.name and 'heldout' in self.name)))
    if self.template_aggregate not in (None,) + AGGREGATES:
      raise errors.UserError(f'eval set {self.name!r}: template_aggregate must be one of '
                             f'{", ".join(AGGREGATES)}, got {self.template_aggregate!r}')

  @property
  def log_prefix(self) -> str:
    return self.prefix or ('eval' if self.name is None else f'eval/{self.name}')

  def results_name(self, split: str, run_split: str) -> str:
    """The eval/<step>/<name>/ directory of this set on `split` (`run_split`: the run's
    eval_split, which a set without its own split is evaluated on)."""
    if self.name is None:
      return split
    if self.renamed or split == (self.split or run_split):
      return self.name
    return f'{self.name}-{split}'


def _one(name: str, spec: Any) -> EvalSet:
  names.check('eval set', name)
  if name in ('lang', 'avg'):
    raise errors.UserError(f"an eval set may not be named {name!r}: 'lang' and 'avg' are the "
                           'metrics keys of per-language results and averages')
  if isinstance(spec, Mapping):
    unknown = set(spec) - set(_KEYS)
    if unknown or 'mixture' not in spec:
      raise errors.UserError(f'eval set {name!r}: a dict needs mixture= and may have '
                             f'{", ".join(_KEYS[1:])}; got keys {sorted(spec)}')
    split = spec.get('split')
    if split is not None:
      names.check(f'eval set {name!r} split', split)
    heldout = spec.get('heldout')
    return EvalSet(name, spec['mixture'], bool(spec.get('heldout_templates', False)), split,
                   heldout=None if heldout is None else bool(heldout),
                   all_templates=bool(spec.get('all_templates', False)),
                   template_aggregate=spec.get('template_aggregate'))
  return EvalSet(name, spec)


def from_config(eval_mixtures: Mapping[str, Any] | None, eval_mixture: Any,
                training_mixture: Any) -> list[EvalSet]:
  """The run's eval sets, in order (the first is the one the demo's tables start with)."""
  if not eval_mixtures:
    return [EvalSet(None, eval_mixture or training_mixture)]
  if not isinstance(eval_mixtures, Mapping):
    raise errors.UserError('eval_mixtures must map set names to mixtures, e.g. '
                           "{'seen': 'builtin', 'heldout': 'builtin_heldout'}")
  return [_one(name, spec) for name, spec in eval_mixtures.items()]


def evaluators(sets, served, vocab, feature_lengths, batch_size: int, split: str,
               max_examples: int | None, decoding_config, mesh, rules,
               name: str | None = None, selected_by: Mapping | None = None,
               feature_converter=None) -> list:
  """One Evaluator per set (its tasks rendered once); `served` (training.start.Served): the
  model, its params' shardings, each task's params and the soft prompt's length; `name`
  overrides the results name of a single default set (t5x-lite eval --name); `selected_by`
  (keep_best's key and set) is recorded in every metrics.json; `feature_converter`: the
  training run's (None: the model's kind's default)."""
  out = []
  for s in sets:
    set_split = s.split or split
    out.append(evaluation.Evaluator(
        served.model, mixtures.get_mixture(s.mixture), vocab,
        evaluation.EvalConfig(feature_lengths, batch_size, set_split, max_examples,
                              heldout_templates=s.heldout_templates, decoding=decoding_config,
                              name=name or s.results_name(set_split, set_split),
                              log_prefix=s.log_prefix, prompt_length=served.prompt_length,
                              all_templates=s.all_templates,
                              template_aggregate=s.template_aggregate, heldout=s.heldout,
                              selected_by=dict(selected_by) if selected_by else None),
        mesh, served.shardings, rules, params_for_task=served.for_task,
        feature_converter=feature_converter))
  return out
