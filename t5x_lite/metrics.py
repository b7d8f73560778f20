"""Task metrics on postprocessed text, all on a 0-100 scale as in T5/seqio.

accuracy / exact_match: string equality; f1: SQuAD token F1 (normalised: lower case, no
punctuation or articles); bleu: sacrebleu corpus BLEU; rouge1/rouge2/rougeL: rouge-score
F-measures with stemming, averaged over examples.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import re
import string
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class MetricOptions:
  """How a task's text is tokenized for scoring, and its classification settings.

  INTERFACE DRAFT (issue #19): the metrics engineer completes it.
  bleu_tokenize: sacrebleu's tokenizer; 'intl' as T5 computes BLEU; 'zh' for Chinese,
    'char' for scripts without spaces (or 'ja-mecab' when installed).
  rouge_tokenizer: 'unicode' (letters of every script; identical to rouge-score's default on
    ASCII text) or 'rouge_score' (rouge-score's default, T5's: keeps only [a-z0-9]).
  positive_label: the positive class of a binary classification F1 (None: macro F1).
  """
  bleu_tokenize: str = 'intl'
  rouge_tokenizer: str = 'unicode'
  positive_label: str | None = None


def options_for_language(language: str | None, **overrides) -> MetricOptions:
  """The scoring options of text in `language` (a code like 'en', 'zh'), with overrides."""
  unknown = set(overrides) - {f.name for f in dataclasses.fields(MetricOptions)}
  if unknown:
    raise ValueError(f'unknown metric options {sorted(unknown)}; known: '
                     f'{[f.name for f in dataclasses.fields(MetricOptions)]}')
  defaults = {'bleu_tokenize': 'zh'} if language == 'zh' else {}
  return MetricOptions(**{**defaults, **overrides})


def _normalize_answer(text: str) -> str:
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> float:
  return 100.0 * sum(t == p for t, p in zip(targets, predictions)) / max(len(targets), 1)


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> float:
  """SQuAD-normalised equality (ignores case, punctuation and articles)."""
  return 100.0 * sum(_normalize_answer(t) == _normalize_answer(p)
                     for t, p in zip(targets, predictions)) / max(len(targets), 1)


def _token_f1(target: str, prediction: str) -> float:
  t, p = _normalize_answer(target).split(), _normalize_answer(prediction).split()
  if not t or not p:
    return float(t == p)
  common = sum((collections.Counter(t) & collections.Counter(p)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(t)
  return 2 * precision * recall / (precision + recall)


def f1(targets: Sequence[str], predictions: Sequence[str]) -> float:
  return 100.0 * sum(_token_f1(t, p) for t, p in zip(targets, predictions)) / max(len(targets), 1)


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> float:
  import sacrebleu  # pylint: disable=import-outside-toplevel
  return sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score


def _rouge(kind: str) -> Callable[[Sequence[str], Sequence[str]], float]:
  def metric(targets: Sequence[str], predictions: Sequence[str]) -> float:
    from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    scores = [scorer.score(t, p)[kind].fmeasure for t, p in zip(targets, predictions)]
    return 100.0 * sum(scores) / max(len(scores), 1)
  metric.__name__ = kind
  return metric


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    'accuracy': accuracy,
    'exact_match': exact_match,
    'f1': f1,
    'bleu': bleu,
    'rouge1': _rouge('rouge1'),
    'rouge2': _rouge('rouge2'),
    'rougeL': _rouge('rougeL'),
}


def check_metric_names(names: Sequence[str]) -> None:
  for name in names:
    if name not in METRICS:
      close = difflib.get_close_matches(name, METRICS, n=3)
      raise ValueError(f'unknown metric {name!r}' + (f' (did you mean {close}?)' if close else '')
                       + f'; known: {sorted(METRICS)}')


def compute(names: Sequence[str], targets: Sequence[str],
            predictions: Sequence[str]) -> dict[str, float]:
  check_metric_names(names)
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')
  return {name: float(METRICS[name](targets, predictions)) for name in names}
