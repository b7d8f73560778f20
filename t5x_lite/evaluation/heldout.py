"""Held-out guards: a run refuses to start when an eval set it calls held-out is not.

A held-out set (`EvalSet.heldout`: by default its name says 'heldout' or it renders held-out
templates) makes a zero-shot claim, which is false when
- one of its tasks is in the training mixture (FLAN lists a held-out task that its training
  mixture includes: google-research/FLAN#85); the error names the task and the path of
  mixtures that includes it;
- one of its held-out templates is a template some training task trains on;
- its examples share content with the training data: the contamination audit
  (contamination.py) of the held-out sets runs at train start on a sample bounded in time,
  and fails the run when an eval task has more than `threshold` of its examples contaminated;
- the checkpoint is selected on it (`keep_best`): its score is then optimistic, as a
  checkpoint chosen for doing well on a set is (T0/xP3 and Flan-T5 select on different sets,
  bigscience-workshop/xmtf#10); allowed only when asked for, and recorded.
"""

from __future__ import annotations

import json
import logging
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from t5x_lite import errors
from t5x_lite.data import mixtures
from t5x_lite.evaluation import contamination
from t5x_lite.evaluation.sets import EvalSet
from t5x_lite.rundir import paths, writers


class NotHeldOut(errors.UserError):
  """A held-out eval set that overlaps the training data."""


def task_paths(mixture: mixtures.Mixture) -> dict[str, list[str]]:
  """Each leaf task's name -> the names from `mixture` down to it (the first path found)."""
  out: dict[str, list[str]] = {}
  def walk(m, trail):
    for obj, _ in m._resolved():   # pylint: disable=protected-access
      if isinstance(obj, mixtures.Mixture):
        walk(obj, trail + [obj.name])
      else:
        out.setdefault(obj.name, trail + [obj.name])
  walk(mixture, [mixture.name])
  return out


def _template_text(template) -> tuple[str, str]:
  return ' '.join(template.inputs.split()), ' '.join(template.targets.split())


def check_sets(sets: Sequence[EvalSet], training: mixtures.Mixture) -> None:
  """Refuse held-out sets with a trained task or a trained template (no data is read)."""
  trained = task_paths(training)
  templates: dict[tuple[str, str], str] = {}
  for task in training.tasks:
    for t in task.templates:
      templates.setdefault(_template_text(t), task.name)
  for s in sets:
    if not s.heldout:
      continue
    mixture = mixtures.get_mixture(s.mixture)
    for task in mixture.tasks:
      if not s.heldout_templates and task.name in trained:
        raise NotHeldOut(
            f'eval set {s.name!r} is held out, but its task {task.name!r} is in the training '
            f'mixture ({" > ".join(trained[task.name])}): its scores would not be zero-shot. '
            f'Remove the task from one of them, or mark the set heldout=False.')
      if s.heldout_templates:
        for t in task.heldout_templates:
          if _template_text(t) in templates:
            raise NotHeldOut(
                f'eval set {s.name!r} renders held-out templates, but the held-out template '
                f'{t.inputs!r} of task {task.name!r} is a training template of task '
                f'{templates[_template_text(t)]!r}: write a template not trained on.')


def check_keep_best(key: str | None, sets: Sequence[EvalSet], allow: bool) -> dict | None:
  """The set keep_best selects on ({'key', 'set', 'heldout'}; None without keep_best);
  refused on a held-out set unless `allow`."""
  if not key:
    return None
  chosen = next((s for s in sorted(sets, key=lambda s: -len(s.log_prefix))
                 if key.startswith(s.log_prefix + '/')), None)
  record = {'key': key, 'set': chosen and chosen.name, 'heldout': bool(chosen and chosen.heldout)}
  if record['heldout'] and not allow:
    raise NotHeldOut(
        f'keep_best={key!r} selects the checkpoint on the held-out set {chosen.name!r}: its '
        'zero-shot score would then be optimistic (the checkpoint is chosen for doing well on '
        'it). Select on a seen set, or set keep_best_allow_heldout = True and report the '
        'score as selected on it.')
  return record


def audited_sets(sets: Sequence[EvalSet], eval_split: str, max_examples: int | None,
                 heldout_only: bool = False) -> list[contamination.AuditedSet]:
  """The run's eval sets as the evaluator sees them (tasks with the split, no objective
  tasks; a held-out-template set: the tasks with held-out templates)."""
  out = []
  for s in sets:
    if heldout_only and not s.heldout:
      continue
    split = s.split or eval_split
    tasks = [t for t in mixtures.get_mixture(s.mixture).tasks
             if split in t.splits and t.objective is None
             and (t.heldout_templates or not s.heldout_templates)]
    out.append(contamination.AuditedSet(s.name or 'eval', tasks, split, max_examples,
                                        bool(s.heldout)))
  return out


def write_report(model_dir: str, name: str, report: dict) -> str:
  """MODEL_DIR/audit/<name>.json (atomically); returns its path."""
  directory = paths.under(model_dir, 'audit')
  paths.makedirs(directory)
  path = paths.under(directory, f'{name}.json')
  writers.write_text_atomic(path, json.dumps(report, indent=2, ensure_ascii=False))
  return path


def audit_at_start(sets: Sequence[EvalSet], training: mixtures.Mixture, eval_split: str,
                   max_examples: int | None, threshold: float,
                   config: contamination.AuditConfig, model_dir: str | None) -> dict | None:
  """The contamination audit of the held-out sets (`config`: at train start a uniform
  sample of each training task, stopped at a time budget), logged as tables and written to
  MODEL_DIR/audit/train_start.json; raises NotHeldOut when an eval task's contaminated
  fraction exceeds `threshold` (1.0: never). With several processes, process 0 audits (a
  time budget could cut processes at different points) and every process follows its
  verdict."""
  audited = audited_sets(sets, eval_split, max_examples, heldout_only=True)
  if not audited or threshold >= 1.0:
    return None
  report, message = None, ''
  if jax.process_index() == 0:
    report = contamination.audit(audited, training.tasks, config=config)
    report['threshold'] = threshold
    found = any(r['pairs'] for out in report['sets'].values() for r in out['tasks'].values())
    (logging.warning if found else logging.info)('%s', contamination.format_tables(report))
    if model_dir:
      write_report(model_dir, 'train_start', report)
    if contamination.max_fraction(report) > threshold:
      message = '; '.join(f'{s}/{task} ~ {train}: {100 * f:.1f}% of its examples'
                          for f, s, task, train in contamination.worst(report))
  failed = bool(message)
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
  if failed:
    raise NotHeldOut(
        f'held-out eval data overlaps the training data above audit_threshold='
        f'{threshold:g}: {message or "see process 0"} ({config.n}-gram or duplicate; tables '
        f'in the log and {"MODEL_DIR/audit/train_start.json" if model_dir else "no model_dir"}'
        '). Remove the overlap, or raise audit_threshold (1.0 disables the audit).')
  return report
