"""FLAN-style instruction templates: zero-/few-shot, with or without an OPTIONS block.

A template is a pair of Python format strings over an example's fields. `{options_}` in
`inputs` marks where the OPTIONS block goes (FLAN's convention); a template without it gets
the block appended when a format with options is drawn.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Mapping, Sequence

from t5x_lite import errors, validation
from t5x_lite.data.sources import DataError


class TemplateFieldError(errors.UserError, KeyError):
  """A template field the example does not have (a KeyError, as the format lookup was)."""

  def __str__(self):   # KeyError's str() is the repr of its argument
    return str(self.args[0])


# The four FLAN v2 formats.
ZS_OPT, ZS_NOOPT, FS_OPT, FS_NOOPT = 'zs_opt', 'zs_noopt', 'fs_opt', 'fs_noopt'
FORMATS = (ZS_OPT, ZS_NOOPT, FS_OPT, FS_NOOPT)
OPTIONS_FIELD = 'options_'
FEWSHOT_SEPARATOR = '\n\n'


@dataclasses.dataclass(frozen=True)
class Template:
  inputs: str
  targets: str = '{answer}'

  def fields(self) -> set[str]:
    names = set()
    for text in (self.inputs, self.targets):
      names |= {f for _, f, _, _ in string.Formatter().parse(text) if f}
    return names - {OPTIONS_FIELD}


def options_block(options: Sequence[str]) -> str:
  return '\n\nOPTIONS:\n' + '\n'.join(f'- {o}' for o in options)


def _fill(text: str, example: Mapping, template: Template) -> str:
  try:
    return text.format(**example)
  except KeyError as e:
    raise TemplateFieldError(f'template {template} needs field {e.args[0]!r}; the example '
                             f'has {sorted(example)}') from None


def _reference_fields(template: Template, example: Mapping) -> dict[str, list]:
  """The list-valued example fields that `template.targets` reads: several references."""
  names = {f for _, f, _, _ in string.Formatter().parse(template.targets) if f}
  lists = {n: list(example[n]) for n in names if isinstance(example.get(n), (list, tuple))}
  sizes = {n: len(v) for n, v in lists.items()}
  if any(size == 0 for size in sizes.values()) or len(set(sizes.values())) > 1:
    raise DataError(f'template {template}: the target fields {sizes} (their number of '
                     'references) must be non-empty lists of one length')
  return lists


def references(template: Template, example: Mapping) -> list[str]:
  """Every target text of `example`: one per element where the targets read a list-valued
  field (SQuAD's answers, several translations; several such fields go in step)."""
  lists = _reference_fields(template, example)
  count = len(next(iter(lists.values()))) if lists else 1
  return [_fill(template.targets, {**example, **{n: v[i] for n, v in lists.items()}}, template)
          for i in range(count)]


def render(template: Template, example: Mapping, options: Sequence[str] | None,
           with_options: bool) -> tuple[str, str]:
  """(inputs, targets) text of one example; a list-valued target field gives its first
  element as the target trained on (T5's squad preprocessor trains on answers[0])."""
  block = options_block(options) if (with_options and options) else ''
  fields = {**example, OPTIONS_FIELD: block}
  inputs = _fill(template.inputs, fields, template)
  if block and '{' + OPTIONS_FIELD + '}' not in template.inputs:
    inputs += block
  firsts = {n: v[0] for n, v in _reference_fields(template, example).items()}
  return inputs, _fill(template.targets, {**fields, **firsts}, template)


def format_example(template: Template, example: Mapping, fmt: str,
                   options: Sequence[str] | None = None,
                   exemplars: Sequence[tuple[Mapping, Sequence[str] | None]] = ()
                   ) -> tuple[str, str]:
  """Render `example` in one of FORMATS; few-shot formats prepend the rendered exemplars
  ("inputs\\ntargets" each) before the query, all with the same template."""
  if fmt not in FORMATS:
    raise validation.ConfigError(f'unknown template format {fmt!r}; use one of {FORMATS}')
  with_options = fmt in (ZS_OPT, FS_OPT)
  inputs, targets = render(template, example, options, with_options)
  if fmt in (FS_OPT, FS_NOOPT) and exemplars:
    shots = []
    for shot, shot_options in exemplars:
      shot_inputs, shot_targets = render(template, shot, shot_options, with_options)
      shots.append(f'{shot_inputs}\n{shot_targets}')
    inputs = FEWSHOT_SEPARATOR.join(shots + [inputs])
  return inputs, targets


def fit_exemplars(template: Template, example: Mapping, fmt: str,
                  options: Sequence[str] | None,
                  exemplars: Sequence[tuple[Mapping, Sequence[str] | None]],
                  fits=None) -> tuple[str, str, int]:
  """`format_example`, then, while `fits(inputs)` is False and exemplars remain, re-render
  without the longest exemplars, dropping as few as needed. Longest in tokens where `fits`
  counts them (its `tokens(text)` method, as pipeline.InputFits has: fit is decided in
  tokens, which characters misrank where a character takes several, as bytes of non-ASCII
  text), else in characters. The question and its OPTIONS block are never cut here; only a
  prompt with no exemplar left can still fail `fits`, and the tokenizer then truncates it
  (EOS last). Returns inputs, targets and the number of exemplars dropped (`rendered_format`
  names the format rendered: zero-shot when none is left)."""
  inputs, targets, kept = fit_exemplars_kept(template, example, fmt, options, exemplars, fits)
  return inputs, targets, len(exemplars) - len(kept)


def fit_exemplars_kept(template: Template, example: Mapping, fmt: str,
                       options: Sequence[str] | None,
                       exemplars: Sequence[tuple[Mapping, Sequence[str] | None]],
                       fits=None) -> tuple[str, str, list]:
  """`fit_exemplars`, returning the exemplars kept (in order) instead of the count dropped."""
  inputs, targets = format_example(template, example, fmt, options, exemplars)
  if fits is None or not exemplars or fits(inputs):
    return inputs, targets, list(exemplars)
  with_options = fmt in (ZS_OPT, FS_OPT)
  size = getattr(fits, 'tokens', None) or len
  sizes = [size('{}\n{}'.format(*render(template, shot, shot_options, with_options)))
           for shot, shot_options in exemplars]
  longest_first = sorted(range(len(exemplars)), key=lambda i: (-sizes[i], i))
  for dropped in range(1, len(exemplars) + 1):
    gone = set(longest_first[:dropped])
    kept = [e for i, e in enumerate(exemplars) if i not in gone]
    inputs, targets = format_example(template, example, fmt, options, kept)
    if fits(inputs):
      break
  return inputs, targets, kept


def turns(template: Template, example: Mapping, fmt: str, options: Sequence[str] | None,
          exemplars: Sequence[tuple[Mapping, Sequence[str] | None]]) -> tuple[list, str]:
  """The few-shot prompt as a conversation: ([(exemplar inputs, exemplar targets), ...],
  the query's inputs), each rendered as `format_example` renders it (a chat template then
  puts the exemplars in earlier user/assistant turns: feature_converters' chat_template)."""
  with_options = fmt in (ZS_OPT, FS_OPT)
  shots = [render(template, shot, shot_options, with_options)
           for shot, shot_options in exemplars] if fmt in (FS_OPT, FS_NOOPT) else []
  return [list(s) for s in shots], render(template, example, options, with_options)[0]


def rendered_format(fmt: str, exemplars: int) -> str:
  """The format that a prompt drawn as `fmt` renders with `exemplars` exemplars in it: a
  few-shot format with none (all dropped to fit, or none to draw) renders exactly as its
  zero-shot one, with or without options as `fmt` (format_example), and is reported so."""
  if exemplars == 0 and fmt in (FS_OPT, FS_NOOPT):
    return ZS_OPT if fmt == FS_OPT else ZS_NOOPT
  return fmt


def normalize_mix(mix: Mapping[str, float]) -> dict[str, float]:
  unknown = set(mix) - set(FORMATS)
  if unknown:
    raise validation.ConfigError(f'template_mix has unknown formats {sorted(unknown)}; use '
                                 f'{FORMATS}')
  total = sum(mix.values())
  if total <= 0 or any(v < 0 for v in mix.values()):
    raise validation.ConfigError(f'template_mix weights must be >= 0 with a positive sum, got '
                                 f'{dict(mix)}')
  return {k: v / total for k, v in mix.items() if v > 0}
