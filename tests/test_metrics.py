"""metrics.py against the reference libraries called directly (sacrebleu API and CLI,
rouge-score) and against hand-computed values (SQuAD, class F1, MCC)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer, scoring, tokenizers

from t5x_lite import metrics

PREDICTIONS = ['the cat sat on the mat .', 'a quick brown fox jumps over the dog',
               'We stay home . It is raining today .', 'hello world', 'Running dogs were barking']
# Two references each (the second a paraphrase); SINGLE is the first of each.
REFERENCES = [['the cat sat on a mat .', 'a cat was sitting on the mat .'],
              ['the quick brown fox jumped over the lazy dog', 'a fast brown fox leaps over a dog'],
              ['It rains today . We are staying home .', 'Today it is raining . We stay in .'],
              ['hello there world', 'hi world'],
              ['The dogs were running and barking', 'Dogs ran , barking']]
SINGLE = [r[0] for r in REFERENCES]
ENGLISH = [p for p in PREDICTIONS] + [t for r in REFERENCES for t in r] + [
    "Don't stop: it's 3.14159, or ~22/7 (roughly)!", 'e-mail me at foo_bar@example.com',
    'The generalizations were organizationally conditional', 'UPPER lower MiXeD 42nd']


# --- BLEU --------------------------------------------------------------------------------
def test_bleu_equals_sacrebleu_with_t5_arguments():
  ours = metrics.bleu(SINGLE, PREDICTIONS)
  ref = sacrebleu.corpus_bleu(PREDICTIONS, [SINGLE], smooth_method='exp', tokenize='intl')
  assert ours == pytest.approx(ref.score, abs=1e-9) and 0 < ours < 100
  multi = metrics.bleu(REFERENCES, PREDICTIONS)
  streams = [[r[0] for r in REFERENCES], [r[1] for r in REFERENCES]]
  assert multi == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams).score, abs=1e-9)
  assert multi > ours  # a second reference only adds matches
  zh = metrics.bleu(['我们今天去公园。'], ['我们明天去公园。'], metrics.MetricOptions(bleu_tokenize='zh'))
  assert zh == pytest.approx(sacrebleu.corpus_bleu(['我们明天去公园。'], [['我们今天去公园。']],
                                                   tokenize='zh').score, abs=1e-9)


def test_bleu_unequal_reference_counts_use_sacrebleu_none_padding():
  targets = [REFERENCES[0], SINGLE[1], REFERENCES[2] + ['It is raining today .'], SINGLE[3],
             REFERENCES[4]]
  streams = [SINGLE, [REFERENCES[0][1], None, REFERENCES[2][1], None, REFERENCES[4][1]],
             [None, None, 'It is raining today .', None, None]]
  expected = sacrebleu.BLEU(tokenize='intl').corpus_score(PREDICTIONS, streams).score
  assert metrics.bleu(targets, PREDICTIONS) == pytest.approx(expected, abs=1e-9)


def test_bleu_equals_sacrebleu_cli(tmp_path):
  for name, lines in (('hyp', PREDICTIONS), ('ref0', SINGLE), ('ref1', [r[1] for r in REFERENCES])):
    (tmp_path / name).write_text('\n'.join(lines) + '\n', encoding='utf-8')
  out = subprocess.run([sys.executable, '-m', 'sacrebleu', str(tmp_path / 'ref0'),
                        str(tmp_path / 'ref1'), '-i', str(tmp_path / 'hyp'), '-tok', 'intl',
                        '-b', '-w', '4'], capture_output=True, text=True, check=True).stdout
  assert metrics.bleu(REFERENCES, PREDICTIONS) == pytest.approx(float(out), abs=1e-4)


# --- ROUGE -------------------------------------------------------------------------------
def _prepared(text):
  return text.replace(' . ', ' .\n')


def test_rouge_equals_rouge_score_as_t5_calls_it():
  types = ['rouge1', 'rouge2', 'rougeL', 'rougeLsum']
  scorer = rouge_scorer.RougeScorer(types)  # T5: no stemmer, default tokenizer
  scores = [scorer.score(_prepared(t), _prepared(p)) for t, p in zip(SINGLE, PREDICTIONS)]
  np.random.seed(metrics.BOOTSTRAP_SEED)
  aggregator = scoring.BootstrapAggregator()
  for s in scores:
    aggregator.add_scores({'rouge1': s['rouge1']})
  mid = 100 * aggregator.aggregate()['rouge1'].mid.fmeasure
  for tokenizer in ('rouge_score', 'unicode'):  # the same on ASCII text
    options = metrics.MetricOptions(rouge_tokenizer=tokenizer)
    assert metrics.compute(['rouge1'], SINGLE, PREDICTIONS, options)['rouge1'] == pytest.approx(mid)
    mean = metrics.compute(types, SINGLE, PREDICTIONS,
                           metrics.MetricOptions(rouge_tokenizer=tokenizer, rouge_aggregate='mean'))
    for k in types:
      assert mean[k] == pytest.approx(100 * np.mean([s[k].fmeasure for s in scores]))
  # rougeLsum splits ' . ' sentences: it differs from rougeL on the two-sentence example.
  assert scores[2]['rougeLsum'].fmeasure != scores[2]['rougeL'].fmeasure


@pytest.mark.parametrize('n', [1, 7, 4500])  # 4500: the resamples are drawn in two chunks
def test_bootstrap_mid_equals_rouge_score_aggregator(n):
  values = np.random.default_rng(n).random(n)
  np.random.seed(metrics.BOOTSTRAP_SEED)
  aggregator = scoring.BootstrapAggregator()
  for v in values:
    aggregator.add_scores({'r': scoring.Score(v, v, v)})
  expected = aggregator.aggregate()['r'].mid.fmeasure
  assert metrics._bootstrap_mid(values) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_rouge_bootstrap_is_seeded_and_leaves_numpy_alone():
  np.random.seed(123)
  expected_next = np.random.rand()
  np.random.seed(123)
  first = metrics.compute(['rouge1', 'rouge2'], SINGLE, PREDICTIONS)
  assert np.random.rand() == expected_next
  assert metrics.compute(['rouge1'], SINGLE, PREDICTIONS)['rouge1'] == first['rouge1']


def test_rouge_multi_reference_is_score_multi_and_stemmer_option():
  options = metrics.MetricOptions(rouge_aggregate='mean', rouge_stemmer=True)
  scorer = rouge_scorer.RougeScorer(['rouge2'], use_stemmer=True)
  expected = np.mean([scorer.score_multi([_prepared(t) for t in ts], _prepared(p))['rouge2'].fmeasure
                      for ts, p in zip(REFERENCES, PREDICTIONS)])
  assert metrics.compute(['rouge2'], REFERENCES, PREDICTIONS, options)['rouge2'] == pytest.approx(
      100 * expected)


@pytest.mark.parametrize('stem', [False, True])
def test_unicode_tokenizer_is_rouge_score_on_ascii_english(stem):
  ours, ref = metrics.UnicodeTokenizer(stem), tokenizers.DefaultTokenizer(stem)
  for text in ENGLISH:
    assert ours.tokenize(text) == ref.tokenize(text), text


def test_unicode_tokenizer_keeps_every_script():
  tokens = metrics.UnicodeTokenizer().tokenize('Le Café, 我喜欢咖啡。 한국어 문장 नमस्ते ภาษา')
  assert tokens == ['le', 'café', '我', '喜', '欢', '咖', '啡', '한국어', '문장', 'नमस्ते',
                    'ภ', 'า', 'ษ', 'า']
  # NFD input (e + combining accent) is the same word as NFC.
  assert metrics.UnicodeTokenizer().tokenize('cafe\u0301') == ['café']


def test_identical_chinese_scores_100_and_one_changed_character_less():
  targets = [f'我们今天第{i}次去公园散步，天气非常好。' for i in range(50)]
  options = metrics.options_for_language('zh')
  names = ['bleu', 'rouge1', 'rouge2', 'rougeL', 'rougeLsum']
  assert all(v == pytest.approx(100) for v in metrics.compute(names, targets, targets,
                                                              options).values())
  changed = list(targets)
  changed[7] = changed[7].replace('好', '坏')
  for name, value in metrics.compute(names, targets, changed, options).items():
    assert 0 < value < 100, name
  # rouge-score's own tokenizer keeps no Chinese character: nothing to score.
  plain = ['我们今天去公园散步，天气非常好。'] * 50
  assert metrics.compute(['rouge1'], plain, plain, metrics.MetricOptions(
      rouge_tokenizer='rouge_score'))['rouge1'] == 0


def test_french_accents_count_in_rouge():
  target = ['Le café est très bon à côté de la gare']
  accented = metrics.compute(['rouge1'], target, target)['rouge1']
  plain = metrics.compute(['rouge1'], target, ['Le cafe est tres bon a cote de la gare'])['rouge1']
  assert accented == 100 and plain < 100
  assert tokenizers.DefaultTokenizer().tokenize('café très')[:2] == ['caf', 'tr']  # rouge-score


# --- SQuAD, accuracy, classification -------------------------------------------------------
def test_squad_exact_match_and_f1_max_over_answers():
  targets = [['The Eiffel Tower', 'Eiffel tower in Paris'], 'blue whale', ['1889'], '']
  predictions = ['eiffel tower, paris', 'the Blue Whale!', '1890', '']
  # 1: em 0; f1 vs 'eiffel tower' 2/3·1 -> 0.8, vs 'eiffel tower in paris' p=1 r=3/4 -> 6/7.
  # 2: em 1, f1 1. 3: 0, 0. 4: both empty: em 1, f1 0 (T5 qa_utils._f1_score).
  assert metrics.exact_match(targets, predictions) == pytest.approx(50.0)
  assert metrics.f1(targets, predictions) == pytest.approx(100 * (6 / 7 + 1) / 4)
  assert metrics.accuracy([['yes', 'Yes'], 'no'], ['Yes', 'No']) == 50.0


def test_binary_class_f1_counts_invalid_predictions_wrong():
  targets = ['yes', 'yes', 'yes', 'no', 'no', 'no', 'yes', 'no']
  predictions = ['yes', 'yes', 'no', 'no', 'yes', 'maybe', 'maybe', 'no']
  # tp 2, fn 2 (a 'no' and a 'maybe' for yes), fp 2 (a 'yes' and a 'maybe' for no).
  options = metrics.MetricOptions(positive_label='yes')
  got = metrics.compute(['class_precision', 'class_recall', 'class_f1', 'accuracy'], targets,
                        predictions, options)
  assert got == pytest.approx({'class_precision': 50.0, 'class_recall': 50.0, 'class_f1': 50.0,
                               'accuracy': 50.0})
  assert metrics.class_f1(['no', 'no'], ['no', 'no'], options) == 0.0  # no positive: 0 (sklearn)


def test_macro_class_f1_and_mcc_hand_computed():
  targets = ['a', 'b', 'a', 'c', 'b', 'c']
  predictions = ['a', 'a', 'a', 'c', 'b', 'x']
  # a: tp 2 fp 1 fn 0 -> P 2/3 R 1 F 4/5; b: tp 1 fp 0 fn 1 -> 1, 1/2, 2/3; c: 1, 1/2, 2/3.
  got = metrics.compute(['class_precision', 'class_recall', 'class_f1', 'mcc'], targets,
                        predictions)
  assert got['class_precision'] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3)
  assert got['class_recall'] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
  assert got['class_f1'] == pytest.approx(100 * (0.8 + 2 / 3 + 2 / 3) / 3)
  # sklearn multiclass MCC: n 6, correct 4, t_sum a2 b2 c2, p_sum a3 b1 c1 x1:
  # (4·6 - (6+2+2)) / sqrt((36-12)(36-12)) = 14/24.
  assert got['mcc'] == pytest.approx(100 * 14 / 24)
  # Binary MCC (CoLA): tp 2 tn 1 fp 1 fn 1 -> (2·1 - 1·1) / sqrt(3·3·2·2) = 1/6.
  assert metrics.mcc(['1', '1', '1', '0', '0'], ['1', '1', '0', '1', '0']) == pytest.approx(100 / 6)
  assert metrics.mcc(['1', '1'], ['1', '1']) == 0.0  # one class: undefined, 0 as sklearn


def test_macro_class_metrics_over_a_label_set_are_t5_mean_multiclass_f1():
  """T5 mean_multiclass_f1(3): sklearn fbeta_score(labels=range(3), average='macro'), every
  class averaged, also one no reference has; without a label set, the reference labels."""
  targets, predictions = ['a', 'a', 'b', 'b'], ['a', 'c', 'b', 'b']
  names = ['class_precision', 'class_recall', 'class_f1']
  t5 = metrics.compute(names, targets, predictions, metrics.MetricOptions(labels=['a', 'b', 'c']))
  # a: tp 1 fp 0 fn 1 -> P 1 R 1/2 F 2/3; b: 1, 1, 1; c: tp 0 fp 1 -> 0, 0 (zero_division), 0.
  assert t5 == pytest.approx({'class_precision': 200 / 3, 'class_recall': 50.0,
                              'class_f1': 100 * (2 / 3 + 1) / 3})
  assert round(t5['class_f1'], 2) == 55.56
  assert round(metrics.class_f1(targets, predictions), 2) == 83.33     # no label set: a, b
  # T5 maps a text outside the label set to -1 (string_label_to_class_id): a prediction 'x'
  # is a false negative of 'a' only; 'c' (neither predicted nor a reference) scores 0.
  abc = metrics.MetricOptions(labels=('a', 'b', 'c'))
  assert metrics.class_f1(['a', 'b'], ['x', 'b'], abc) == pytest.approx(100 / 3)
  # A reference outside the set ('z') is only a false positive of what was predicted for it.
  assert metrics.class_f1(['z', 'a'], ['a', 'a'], metrics.MetricOptions(labels=['a', 'b'])) == \
      pytest.approx(100 * (2 / 3 + 0) / 2)
  assert metrics.MetricOptions(labels=['b', 'a', 'b']).labels == ('b', 'a')
  with pytest.raises(ValueError, match='labels must be a list of str'):
    metrics.MetricOptions(labels='yes')
  with pytest.raises(ValueError, match="positive_label='Yes' is not one of the labels"):
    metrics.MetricOptions(labels=['yes', 'no'], positive_label='Yes')


def test_score_task_takes_the_label_set_from_options_or_labels():
  """eval_report.score_task: a task's OPTIONS (or `labels`) are its label set; an options
  field gives the union of the options of the examples scored together (per language)."""
  from t5x_lite.evaluation import report as eval_report  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import sources, tasks   # pylint: disable=import-outside-toplevel
  from t5x_lite.data.templates import Template   # pylint: disable=import-outside-toplevel

  def task(**kwargs):
    source = sources.GeneratedSource(lambda rng, split: {'q': 'x', 'a': 'a'}, {'validation': 4})
    return tasks.Task('labels_t', source, [Template('{q}', '{a}')], ['class_f1'], **kwargs)

  examples = [{'targets': t, 'options': ['a', 'b', 'c']} for t in ('a', 'a', 'b', 'b')]
  predictions = ['a', 'c', 'b', 'b']
  score = lambda t, e=examples, p=predictions: eval_report.score_task(t, e, p)[0]['class_f1']
  assert round(score(task(options=['a', 'b', 'c'])), 2) == 55.56
  assert round(score(task(options=[' a', 'b ', 'c'])), 2) == 55.56   # postprocessed (strip)
  assert round(score(task(options='choices', labels=['a', 'b', 'c'])), 2) == 55.56
  assert round(score(task(labels=['a', 'b', 'c'])), 2) == 55.56
  assert round(score(task()), 2) == 83.33                             # no label set
  assert round(score(task(options='choices')), 2) == 55.56           # the examples' options
  assert task(options='choices').label_set([{'options': ['b', 'a']}, {'options': ['c', 'a']},
                                            {'options': None}]) == ('b', 'a', 'c')
  # Per language, each language's own options: English's two classes do not dilute French.
  mixed = [dict(e, language='en', options=['a', 'b', 'c']) for e in examples] + [
      {'targets': t, 'options': ['oui', 'non'], 'language': 'fr'} for t in ('oui', 'non')]
  scores = eval_report.score_task(task(options='choices'), mixed, predictions + ['oui', 'oui'])[0]
  assert round(scores['en/class_f1'], 2) == 55.56
  assert scores['fr/class_f1'] == pytest.approx(100 * (2 / 3 + 0) / 2)


# --- options and errors ------------------------------------------------------------------
def test_options_for_language():
  assert metrics.options_for_language('zh-TW').bleu_tokenize == 'zh'
  assert metrics.options_for_language('th').bleu_tokenize == 'char'
  assert metrics.options_for_language('ko').bleu_tokenize == 'intl'  # words are spaced
  assert metrics.options_for_language('ja').bleu_tokenize in ('ja-mecab', 'char')
  assert metrics.options_for_language('en') == metrics.MetricOptions()
  assert metrics.options_for_language('zh', bleu_tokenize='char').bleu_tokenize == 'char'
  with pytest.raises(ValueError, match='unknown metric options'):
    metrics.options_for_language('en', bleu_tokenizer='zh')
  with pytest.raises(ValueError, match='rouge_tokenizer'):
    metrics.MetricOptions(rouge_tokenizer='spaces')


def test_mecab_missing_names_the_fix():
  if metrics._mecab_installed('ja-mecab'):
    pytest.skip('mecab installed')
  with pytest.raises(ValueError, match=r"pip install 'sacrebleu\[ja\]'"):
    metrics.MetricOptions(bleu_tokenize='ja-mecab')
  assert metrics.options_for_language('ja').bleu_tokenize == 'char'


def test_bad_targets_and_names():
  with pytest.raises(ValueError, match='non-empty list'):
    metrics.compute(['bleu'], [[]], ['x'])
  with pytest.raises(ValueError, match="unknown metric 'rougeLSum'"):
    metrics.check_metric_names(['rougeLSum'])
  assert metrics.compute(['accuracy', 'rouge1'], [], []) == {'accuracy': 0.0, 'rouge1': 0.0}
