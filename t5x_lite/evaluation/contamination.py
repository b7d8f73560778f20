"""Contamination audit: does an eval example's content occur in the training data?

For every eval set x every training task, over the examples the run uses (each eval set's
split and example cap; each training task's train split):
- exact duplicates after normalisation, counted both ways (eval examples with a duplicate in
  the training task; training examples that duplicate an eval example), and eval examples
  whose inputs alone occur as a training example's inputs;
- eval examples that share at least one n-gram (n = 13) with the training task: the
  decontamination rule of lm-evaluation-harness (`lm_eval/decontamination`, after GPT-3,
  Brown et al. 2020, appendix C). An example is *contaminated* by a task when it has an
  n-gram hit or a duplicate there. Optionally (`common_ngram_examples`, off by default) an
  n-gram found in many training examples is boilerplate and not counted, as GPT-3's analysis
  ignored frequent 13-grams (news sites' "follow us on twitter ...", sports tickers).

What is compared is an example's *content*: the field values its templates put into the
inputs and targets (every element of a list-valued field; an objective task's raw text), not
the template's own words, which every example rendered with a shared template would share,
nor few-shot exemplars, which are training examples by design and are audited as themselves.

Normalisation and hashing are ngrams.py's: words (with their combining marks), or single
letters of the scripts without spaces, so Chinese is compared in character n-grams. A text
shorter than n units has no n-gram; only the duplicate rules see it. The eval side's hashes
are sorted once and the training side streams through them a chunk of examples at a time
(`benchmarks/audit.py`).
"""

from __future__ import annotations

import dataclasses
import string
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from t5x_lite import validation
from t5x_lite.data import tasks as tasks_lib
from t5x_lite.evaluation import ngrams
from t5x_lite.evaluation.ngrams import units

_CHUNK = 1024


def content(task: tasks_lib.Task, split: str, index: int) -> tuple[list[str], list[str]]:
  """(inputs texts, targets texts) of one example: the values of the fields its templates
  read (targets: the fields any template's targets read), or an objective task's raw text."""
  if task.objective is not None:
    return [task.text(split, index)], []
  example = task.example(split, index)
  fields = getattr(task, '_audit_fields', None)
  if fields is None:
    used = lambda text: {f for _, f, _, _ in string.Formatter().parse(text) if f}
    templates = tuple(task.templates) + tuple(task.heldout_templates)
    targets = set().union(*(used(t.targets) for t in templates))
    inputs = set().union(*(used(t.inputs) for t in templates)) - targets
    fields = task._audit_fields = (sorted(inputs - {'options_'}), sorted(targets))
  def texts(names):
    out = []
    for name in names:
      value = example.get(name)
      if value is not None:
        out.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return out
  return texts(fields[0]), texts(fields[1])


@dataclasses.dataclass(frozen=True)
class AuditedSet:
  """One eval set as the run evaluates it: its tasks on `split`, the first `max_examples`."""
  name: str
  tasks: Sequence[tasks_lib.Task]
  split: str
  max_examples: int | None = None
  heldout: bool = False

  def __post_init__(self):
    if self.max_examples is not None and self.max_examples < 1:
      raise validation.ConfigError(f'eval set {self.name!r}: max_examples must be >= 1 or None '
                                   f'(all), got {self.max_examples}')


@dataclasses.dataclass(frozen=True)
class AuditConfig:
  n: int = 13                              # lm-evaluation-harness's 13-grams
  max_train_examples: int | None = None    # per training task: a uniform sample (seed 0)
  time_budget_s: float | None = None       # stop streaming the training side after this
  examples_per_pair: int = 3               # example pairs shown per contaminated pair
  common_ngram_examples: int | None = None  # an n-gram in more training examples than this
                                            # (all tasks) is boilerplate, not counted; None:
                                            # every hit counts (lm-evaluation-harness)

  def __post_init__(self):
    validation.check(self, {'n': '>= 1', 'max_train_examples': '>= 1', 'time_budget_s': '>= 0',
                            'examples_per_pair': '>= 0', 'common_ngram_examples': '>= 1'})


@dataclasses.dataclass
class _Eval:
  """The eval side: every audited example's keys, and its n-grams sorted for lookup."""
  refs: list            # global eval id -> (task, split, index)
  exact: dict           # content hash -> eval ids
  inputs: dict          # inputs hash -> eval ids
  hashes: np.ndarray    # sorted unique n-gram hashes
  starts: np.ndarray    # owners[starts[g]:starts[g+1]]: the eval ids having hashes[g]
  owners: np.ndarray


def _keys(encoder: ngrams.Encoder, inputs: list[str], targets: list[str]):
  segments = [encoder.ids(units(t)) for t in inputs + targets]
  joined = [' '.join(map(str, s)) for s in segments]
  inputs_key = hash('\x1f'.join(joined[:len(inputs)]))
  return segments, hash((inputs_key, '\x1e', '\x1f'.join(joined[len(inputs):]))), inputs_key


def _eval_side(sets: Sequence[AuditedSet], encoder: ngrams.Encoder) -> tuple[_Eval, dict]:
  refs, exact, inputs, ids_of = [], {}, {}, {}
  all_h, all_o = [], []
  for s in sets:
    for task in s.tasks:
      n = task.num_examples(s.split)
      n = min(n, s.max_examples) if s.max_examples else n
      key = (task.name, s.split, n)
      if key in ids_of:
        continue
      ids_of[key] = range(len(refs), len(refs) + n)
      segments, owners = [], []
      for i in range(n):
        eid = len(refs)
        refs.append((task, s.split, i))
        segs, k, k_in = _keys(encoder, *content(task, s.split, i))
        exact.setdefault(k, []).append(eid)
        inputs.setdefault(k_in, []).append(eid)
        segments += segs
        owners += [eid] * len(segs)
      h, o = encoder.ngrams(segments, owners)
      all_h.append(h)
      all_o.append(o)
  h = np.concatenate(all_h) if all_h else np.zeros(0, np.uint64)
  o = np.concatenate(all_o) if all_o else np.zeros(0, np.int64)
  order = np.lexsort((o, h))       # by hash (unsigned, as searched), then owner
  h, o = h[order], o[order]
  fresh = np.r_[True, (h[1:] != h[:-1]) | (o[1:] != o[:-1])] if len(h) else np.zeros(0, bool)
  h, o = h[fresh], o[fresh]
  first = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else np.zeros(0, np.int64)
  return _Eval(refs, exact, inputs, h[first], np.r_[first, len(h)], o), ids_of


@dataclasses.dataclass
class _Hits:
  """What one training task shares with the eval side (eval ids -> a training index)."""
  ngram: dict = dataclasses.field(default_factory=dict)    # filled by _resolve_ngrams
  groups: list = dataclasses.field(default_factory=list)   # (eval n-gram groups, training idx)
  exact: dict = dataclasses.field(default_factory=dict)
  inputs: dict = dataclasses.field(default_factory=dict)
  train_exact: dict = dataclasses.field(default_factory=dict)   # training index -> eval ids
  scanned: int = 0


def _scan_chunk(task, split, indices, encoder, ev: _Eval, hits: _Hits) -> None:
  segments, owners = [], []
  for i in indices:
    segs, k, k_in = _keys(encoder, *content(task, split, int(i)))
    duplicated = ev.exact.get(k, ())
    for eid in duplicated:
      hits.exact.setdefault(eid, int(i))
    if duplicated:
      hits.train_exact[int(i)] = duplicated
    for eid in ev.inputs.get(k_in, ()):
      hits.inputs.setdefault(eid, int(i))
    segments += segs
    owners += [int(i)] * len(segs)
  hits.scanned += len(indices)
  h, o = encoder.ngrams(segments, owners)
  if not len(h) or not len(ev.hashes):
    return
  g = np.minimum(np.searchsorted(ev.hashes, h), len(ev.hashes) - 1)
  found = ev.hashes[g] == h
  if found.any():
    hits.groups.append(np.unique(np.stack([g[found], o[found]]), axis=1))


def _resolve_ngrams(training, hits: dict, ev: _Eval, common: int | None) -> None:
  """Each task's n-gram hits as {eval id: first training index}, leaving out the n-grams
  found in more than `common` training examples (counted over every task scanned)."""
  found = {t.name: (np.concatenate(hits[t.name].groups, axis=1) if hits[t.name].groups
                    else np.zeros((2, 0), np.int64)) for t in training}
  keep = None
  if common is not None:
    frequency = np.zeros(len(ev.hashes), np.int64)
    for pairs in found.values():
      frequency += np.bincount(np.unique(pairs, axis=1)[0], minlength=len(ev.hashes))
    keep = frequency <= common
  for t in training:
    g, train_index = found[t.name]
    if keep is not None:
      g, train_index = g[keep[g]], train_index[keep[g]]
    counts = ev.starts[g + 1] - ev.starts[g]
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    eids = ev.owners[np.repeat(ev.starts[g], counts) + offsets]
    train_index = np.repeat(train_index, counts)
    order = np.lexsort((train_index, eids))
    eids, train_index = eids[order], train_index[order]
    first = np.r_[True, eids[1:] != eids[:-1]] if len(eids) else np.zeros(0, bool)
    hits[t.name].ngram = dict(zip(eids[first].tolist(), train_index[first].tolist()))


def _training_order(task, split, config: AuditConfig) -> np.ndarray:
  n = task.num_examples(split)
  if config.max_train_examples and config.max_train_examples < n:
    return np.random.default_rng(0).permutation(n)[:config.max_train_examples]
  return np.arange(n)


def audit(sets: Sequence[AuditedSet], training: Sequence[tasks_lib.Task], split: str = 'train',
          config: AuditConfig = AuditConfig(),
          progress: Callable[[Iterable, int], Iterable] | None = None) -> dict:
  """The audit report (a JSON-able dict; `format_tables` prints it). The training tasks are
  streamed round-robin, a chunk of each in turn, so a time budget cuts every task alike.
  `progress(chunks, total_examples)` wraps the chunk stream (e.g. a tqdm bar)."""
  began = time.perf_counter()
  encoder = ngrams.Encoder(config.n)
  ev, ids_of = _eval_side(sets, encoder)
  orders = {t.name: _training_order(t, split, config) for t in training}
  hits = {t.name: _Hits() for t in training}
  chunks = [(t, orders[t.name][c:c + _CHUNK]) for c in range(0, max(
      (len(o) for o in orders.values()), default=0), _CHUNK) for t in training
            if c < len(orders[t.name])]
  total = sum(len(o) for o in orders.values())
  complete = True
  for task, indices in (progress(chunks, total) if progress else chunks):
    if config.time_budget_s is not None and time.perf_counter() - began > config.time_budget_s:
      complete = False
      break
    _scan_chunk(task, split, indices, encoder, ev, hits[task.name])
  _resolve_ngrams(training, hits, ev, config.common_ngram_examples)
  report = {'n': config.n, 'split': split, 'complete': complete,
            'common_ngram_examples': config.common_ngram_examples,
            'seconds': round(time.perf_counter() - began, 2),
            'train': {t.name: {'examples': t.num_examples(split), 'scanned': hits[t.name].scanned}
                      for t in training},
            'sets': {}}
  for s in sets:
    out = report['sets'][s.name] = {'split': s.split, 'heldout': s.heldout, 'tasks': {}}
    for task in s.tasks:
      n = task.num_examples(s.split)
      ids = ids_of[(task.name, s.split, min(n, s.max_examples) if s.max_examples else n)]
      out['tasks'][task.name] = _task_report(ids, training, split, hits, ev, config)
  return report


def _task_report(ids: range, training, split: str, hits: dict, ev: _Eval,
                 config: AuditConfig) -> dict:
  pairs, dirty = {}, set()
  for t in training:
    h = hits[t.name]
    ngram = [e for e in ids if e in h.ngram]
    exact = [e for e in ids if e in h.exact]
    same_inputs = [e for e in ids if e in h.inputs]
    bad = set(ngram) | set(exact)
    dirty |= bad
    if not bad and not same_inputs:
      continue
    shown = sorted(bad) or same_inputs
    pairs[t.name] = {
        'contaminated': len(bad), 'fraction': len(bad) / max(len(ids), 1),
        'ngram': len(ngram), 'duplicates': len(exact),
        'duplicates_in_train': sum(any(e in ids for e in eids)
                                   for eids in h.train_exact.values()),
        'same_inputs': len(same_inputs),
        'examples': [_pair(ev.refs[e], t, split, h.ngram.get(e, h.exact.get(e, h.inputs.get(e))),
                           config.n) for e in shown[:config.examples_per_pair]]}
  return {'examples': len(ids), 'contaminated': len(dirty),
          'fraction': len(dirty) / max(len(ids), 1), 'pairs': pairs}


def _shared_ngram(a: list[str], b: list[str], n: int) -> str | None:
  grams = {tuple(a[i:i + n]) for i in range(len(a) - n + 1)}
  for i in range(len(b) - n + 1):
    if tuple(b[i:i + n]) in grams:
      return ngrams.NO_SPACE_GAP.sub('', ' '.join(b[i:i + n]))
  return None


def _pair(ref, train_task, train_split: str, train_index: int, n: int) -> dict:
  task, split, index = ref
  eval_texts = sum(content(task, split, index), [])
  train_texts = sum(content(train_task, train_split, train_index), [])
  shared = None
  for a in eval_texts:
    for b in train_texts:
      shared = shared or _shared_ngram(units(a), units(b), n)
  clip = lambda texts: ' | '.join(texts)[:160]
  return {'eval_index': index, 'train_index': train_index, 'eval': clip(eval_texts),
          'train': clip(train_texts), 'shared': shared}


def worst(report: dict, k: int = 3) -> list[tuple[float, str, str, str]]:
  """The `k` most contaminated (fraction, set, eval task, training task) pairs."""
  rows = [(p['fraction'], s, task, train) for s, out in report['sets'].items()
          for task, r in out['tasks'].items() for train, p in r['pairs'].items()
          if p['contaminated']]
  return sorted(rows, key=lambda r: (-r[0], r[1:]))[:k]


def max_fraction(report: dict, heldout_only: bool = False) -> float:
  """The largest fraction of one eval task's examples contaminated by the training data."""
  return max((r['fraction'] for out in report['sets'].values()
              if out['heldout'] or not heldout_only for r in out['tasks'].values()),
             default=0.0)


def format_tables(report: dict) -> str:
  """Per eval set: the (eval task, training task) pairs with anything in common, their counts
  and fractions, and up to three example pairs each."""
  lines = []
  scanned = sum(t['scanned'] for t in report['train'].values())
  total = sum(t['examples'] for t in report['train'].values())
  lines.append(f'contamination audit: {report["n"]}-grams and duplicates; training side '
               f'{scanned} of {total} examples ({report["split"]})'
               + ('' if report['complete'] else ', stopped at the time budget')
               + f', {report["seconds"]:.1f} s')
  for name, out in report['sets'].items():
    rows = [('eval task', 'training task', 'examples', 'contaminated', 'fraction',
             f'{report["n"]}-gram', 'duplicates', 'in train', 'same inputs')]
    examples = []
    for task, r in out['tasks'].items():
      for train, p in r['pairs'].items():
        rows.append((task, train, str(r['examples']), str(p['contaminated']),
                     f'{100 * p["fraction"]:.1f}%', str(p['ngram']), str(p['duplicates']),
                     str(p['duplicates_in_train']), str(p['same_inputs'])))
        for e in p['examples']:
          examples.append(f'  {task}[{e["eval_index"]}] ~ {train}[{e["train_index"]}]'
                          + (f' shares "{e["shared"]}"' if e['shared'] else '')
                          + f'\n    eval:  {e["eval"]}\n    train: {e["train"]}')
    heldout = ' (held out)' if out['heldout'] else ''
    counted = sum(r['examples'] for r in out['tasks'].values())
    lines.append(f'\n{name}{heldout}: {len(out["tasks"])} tasks, {counted} examples '
                 f'({out["split"]})')
    if len(rows) == 1:
      lines.append('  nothing in common with the training data')
      continue
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ['  '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    table.insert(1, '-' * len(table[0]))
    lines += table + examples
  return '\n'.join(lines)
