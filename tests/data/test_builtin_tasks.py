"""Built-in generated tasks: lengths, determinism, disjoint splits, number words, baselines,
languages, target bounds, mixtures (incl. the cross-lingual pair)."""

import functools
import json
import os
import pickle

import gin
import numpy as np
import pytest

from t5x_lite import config as gin_config
from t5x_lite import metrics
from t5x_lite.data import builtin_generators as gen
from t5x_lite.data import builtin_tasks, mixtures, registry, spm_training, templates
from t5x_lite.data.sources import GeneratedSource

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XL_TRAIN, XL_HELDOUT = builtin_tasks.CROSSLINGUAL_TASKS, builtin_tasks.CROSSLINGUAL_HELDOUT_TASKS
ALL = builtin_tasks.TRAINING_TASKS + builtin_tasks.HELDOUT_TASKS + XL_TRAIN + XL_HELDOUT
SPLITS = ('train', 'validation', 'test')


def _canonical(example):
  return json.dumps(example, sort_keys=True, ensure_ascii=False)


def _nbytes(text):
  return len(text.encode('utf-8'))


@functools.lru_cache(maxsize=None)
def _examples(name, split):
  task = registry.get(name)
  return tuple(task.example(split, i) for i in range(task.num_examples(split)))


@pytest.fixture(scope='module')
def baselines():
  return {name: registry.get(name).baseline_score('validation') for name in ALL}


@pytest.mark.parametrize('name', ALL)
def test_every_split_and_format_renders_within_the_length_limits(name):
  task = registry.get(name)
  assert set(task.splits) == set(SPLITS) and len(task.templates) >= 3
  assert task.heldout_templates and task.description and task.name.startswith('builtin_')
  limits = builtin_tasks.FEATURE_LENGTHS
  fmt_rng = np.random.default_rng(0)
  for split in SPLITS:
    for i in range(0, task.num_examples(split), 11):
      rendered = [task.render(split, i, task.eval_rng(i)),
                  task.render(split, i, fmt_rng),                     # formats incl. few-shot
                  task.render(split, i, fmt_rng, heldout=True)]
      rendered += [task.render(split, i, fmt_rng, fmt=f) for f in task.formats]
      for r in rendered:
        assert '{' not in r['inputs'] and r['targets'].strip() == r['targets'] != ''
        assert _nbytes(r['targets']) <= limits['targets'], r
        assert _nbytes(r['inputs']) <= limits['inputs'], r
        if r['format'].startswith('zs'):
          assert _nbytes(r['inputs']) <= builtin_tasks.ZERO_SHOT_INPUT_BYTES, r
        if task.options:
          assert r['targets'] in r['options']
          assert (r['inputs'].count('OPTIONS:') > 0) == r['format'].endswith('_opt')


def test_classification_prompts_use_options_and_one_shot():
  task = registry.get('builtin_sentiment')
  r = task.render('validation', 0, np.random.default_rng(0), fmt='fs_opt')
  assert r['inputs'].count('OPTIONS:') == 2 and r['inputs'].count('\n\n') >= 3
  assert r['inputs'].endswith(templates.options_block(['positive', 'negative']))
  assert set(task.formats) == {'zs_opt', 'zs_noopt', 'fs_opt'}


@pytest.mark.parametrize('name', ALL)
def test_examples_are_deterministic_across_fresh_sources(name):
  source = registry.get(name).source
  a = GeneratedSource(source.fn, source.sizes, seed=source.seed)
  b = GeneratedSource(source.fn, source.sizes, seed=source.seed)
  for split in SPLITS:
    for i in (0, 1, source.sizes[split] - 1):
      assert a.split(split)[i] == b.split(split)[i] == source.split(split)[i]
  assert a.split('train')[0] != a.split('train')[1]
  other = GeneratedSource(source.fn, source.sizes, seed=source.seed + 1000)
  assert [other.split('train')[i] for i in range(5)] != [a.split('train')[i] for i in range(5)]


@pytest.mark.parametrize('name', ALL)
def test_train_never_shares_an_example_with_validation_or_test(name):
  content = {s: {_canonical(e) for e in _examples(name, s)} for s in SPLITS}
  assert not content['train'] & content['validation']
  assert not content['train'] & content['test']
  assert not content['validation'] & content['test']
  assert len(content['validation']) >= 20   # enough distinct examples to measure anything


def test_number_pairs_keep_their_split_in_both_directions():
  """A (number, language) pair evaluated in one direction is never trained in the other."""
  def pairs(name, split):
    return {(e['number'], e['lang']) for e in _examples(name, split)}
  train = pairs('builtin_number_words', 'train') | pairs('builtin_words_to_number', 'train')
  for name in ('builtin_number_words', 'builtin_words_to_number',
               'builtin_words_to_number_es_zh'):
    assert not train & (pairs(name, 'validation') | pairs(name, 'test')), name
  train = pairs('builtin_xl_number_words', 'train') | pairs('builtin_xl_words_to_number', 'train')
  for name in ('builtin_xl_number_words', 'builtin_xl_words_to_number'):
    assert not train & (pairs(name, 'validation') | pairs(name, 'test')), name


def test_generators_reject_unknown_splits():
  with pytest.raises(ValueError, match="not 'dev'"):
    gen.arithmetic(np.random.default_rng(0), 'dev')


@pytest.mark.parametrize('lang,n,words', [
    ('en', 0, 'zero'), ('en', 13, 'thirteen'), ('en', 40, 'forty'), ('en', 99, 'ninety-nine'),
    ('fr', 17, 'dix-sept'), ('fr', 21, 'vingt et un'), ('fr', 22, 'vingt-deux'),
    ('fr', 70, 'soixante-dix'), ('fr', 71, 'soixante et onze'), ('fr', 72, 'soixante-douze'),
    ('fr', 79, 'soixante-dix-neuf'), ('fr', 80, 'quatre-vingts'), ('fr', 81, 'quatre-vingt-un'),
    ('fr', 91, 'quatre-vingt-onze'), ('fr', 99, 'quatre-vingt-dix-neuf'),
    ('de', 1, 'eins'), ('de', 16, 'sechzehn'), ('de', 17, 'siebzehn'),
    ('de', 21, 'einundzwanzig'), ('de', 30, 'dreißig'), ('de', 67, 'siebenundsechzig'),
    ('de', 99, 'neunundneunzig'),
    ('es', 15, 'quince'), ('es', 16, 'dieciséis'), ('es', 21, 'veintiuno'),
    ('es', 22, 'veintidós'), ('es', 30, 'treinta'), ('es', 31, 'treinta y uno'),
    ('es', 99, 'noventa y nueve'),
    ('zh', 0, '零'), ('zh', 10, '十'), ('zh', 11, '十一'), ('zh', 20, '二十'), ('zh', 21, '二十一'),
    ('zh', 99, '九十九'),
])
def test_number_words(lang, n, words):
  assert gen.number_to_words(n, lang) == words


def test_number_words_are_distinct_per_language():
  for lang in gen.LANGUAGES:
    assert len({gen.number_to_words(n, lang) for n in range(100)}) == 100
  with pytest.raises(ValueError, match='0..99'):
    gen.number_to_words(100, 'en')


def test_generated_answers_are_correct():
  rng = np.random.default_rng(0)
  for _ in range(200):
    e = gen.arithmetic(rng, 'train')
    a, b = int(e['a']), int(e['b'])
    assert int(e['answer']) == (a + b if e['op'] == '+' else a - b) >= 0
    e = gen.sort_numbers(rng, 'validation', descending=True)
    values = [int(v) for v in e['numbers'].split(', ')]
    assert [int(v) for v in e['answer'].split(', ')] == sorted(values, reverse=True)
    assert 3 <= len(values) <= 4 and max(values) < 20
    e = gen.word_count(rng, 'test')
    assert int(e['answer']) == len(e['text'].split())
    e = gen.qa(rng, 'train')
    assert e['answer'] in e['context'] and 2 <= e['context'].count('.') <= 3
    e = gen.compare(rng, 'train')
    a, b = int(e['a']), int(e['b'])
    assert e['answer'] == ('equal' if a == b else 'larger' if a > b else 'smaller')
    e = gen.compare_words(rng, 'validation', langs=('de', 'zh'))
    a, b = [[n for n in range(100) if gen.number_to_words(n, e['lang']) == e[k]][0]
            for k in ('a', 'b')]
    assert e['answer'] == ('equal' if a == b else 'larger' if a > b else 'smaller')
    assert e['language'] == gen.LANGUAGES[e['lang']] and e['lang'] in ('de', 'zh')
    e = gen.word_count_words(rng, 'test', langs=('fr', 'es'))
    assert set(e['text'].split()) <= set(gen.LEXICONS[e['lang']])
    assert int(e['answer']) == len(e['text'].split()) and e['lang'] in ('fr', 'es')
    e = gen.arithmetic_words(rng, 'train', langs=('es', 'zh'))
    a, b = int(e['a']), int(e['b'])
    plus, minus = gen.ARITHMETIC_OPS[e['lang']]
    assert int(e['answer']) == (a + b if plus in e['ask0'] else a - b) >= 0
    assert (minus in e['ask1']) == (plus not in e['ask1']) and e['ask3'].count(e['b']) >= 1
    e = gen.passive(rng, 'train')
    subject, obj = e['sentence'].split()[1], e['sentence'].split()[-1].rstrip('.')
    assert e['answer'].startswith(f'The {obj} ') and e['answer'].endswith(f'by the {subject}.')


def test_baselines_are_beatable_and_perfect_predictions_score_100(baselines):
  for name in ALL:
    task = registry.get(name)
    scores = baselines[name]
    assert list(scores) == list(task.metric_names)
    assert scores[task.metric_names[0]] < 60, (name, scores)
    refs = task.references('validation')
    perfect = metrics.compute(task.metric_names, refs, refs)
    for metric in ('accuracy', 'exact_match'):
      if metric in perfect:
        assert perfect[metric] == 100.0, name
  # Classification is balanced, so the majority class is right only about 1/k of the time.
  assert 35 < baselines['builtin_sentiment']['accuracy'] < 60
  assert 20 < baselines['builtin_compare']['accuracy'] < 45
  assert baselines['builtin_uppercase']['accuracy'] == 0.0     # copying never matches


def test_references_of_all_validation_splits_are_fast():
  # CPU time, not wall time: a loaded host (CI beside other jobs) stretched the wall time to
  # 4.8 s while the work stayed ~1 s.
  import time  # pylint: disable=import-outside-toplevel
  start = time.process_time()
  for name in ALL:
    registry.get(name).references('validation')
  assert time.process_time() - start < 2.0


def test_mixtures_resolve_are_disjoint_and_rates_sum_to_one():
  train, heldout = mixtures.get_mixture('builtin'), mixtures.get_mixture('builtin_heldout')
  train_names = [t.name for t in train.tasks]
  heldout_names = [t.name for t in heldout.tasks]
  assert train_names == list(builtin_tasks.builtin_task_names())
  assert heldout_names == list(builtin_tasks.builtin_task_names(heldout=True))
  assert len(train_names) >= 8 and len(heldout_names) >= 2
  assert not set(train_names) & set(heldout_names)
  for mixture in (train, heldout):
    rates = [r for _, r in mixture.tasks_and_rates()]
    assert sum(rates) == pytest.approx(1.0) and min(rates) > 0
    np.testing.assert_array_equal(mixture.loss_weights(), np.ones(len(rates), np.float32))
    copy = pickle.loads(pickle.dumps(mixture))        # e.g. for multiprocess data loading
    first = mixture.tasks[0]
    assert copy.tasks[0].example('validation', 5) == first.example('validation', 5)
  capped = mixtures.examples_proportional(maximum=builtin_tasks.MAX_EXAMPLES)
  expected = np.array([capped(t) for t in train.tasks])
  np.testing.assert_allclose([r for _, r in train.tasks_and_rates()], expected / expected.sum())


def test_import_is_idempotent_and_typos_name_the_close_match():
  before = registry.get('builtin_sentiment')
  builtin_tasks.register_all()
  assert registry.get('builtin_sentiment') is not before
  assert registry.get('builtin_sentiment').example('train', 3) == before.example('train', 3)
  with pytest.raises(KeyError, match=r"'builtin_sentimnt'.*Did you mean "
                                      r"\['builtin_sentiment'"):
    registry.get('builtin_sentimnt')


@functools.lru_cache(maxsize=None)
def _targets(name):
  """Every distinct target of every template (held-out ones too) of every split."""
  task = registry.get(name)
  return frozenset(templates.render(t, e, task.example_options(e), False)[1]
                   for split in SPLITS for e in _examples(name, split)
                   for t in task.templates + task.heldout_templates)


@pytest.fixture(scope='module')
def small_sentencepiece(tmp_path_factory):
  """A small SentencePiece vocabulary like the demo's (byte fallback, split digits), fitted to
  100 examples a task, so that many words of the targets fall back to bytes."""
  lines = []
  for mixture in ('builtin', 'builtin_crosslingual'):
    lines += spm_training.training_text(mixture, examples_per_task=100)
  return spm_training.train_sentencepiece(lines, str(tmp_path_factory.mktemp('spm') / 'm.model'),
                                          vocab_size=400)


@pytest.mark.parametrize('name', ALL)
def test_max_target_tokens_bounds_every_target(name, small_sentencepiece):
  """Byte vocabulary: a token a UTF-8 byte (a Chinese character is 3), EOS not counted; the
  bound is reached. SentencePiece: one more for its dummy prefix ('7' -> ['▁', '7'])."""
  task, targets = registry.get(name), _targets(name)
  assert task.max_target_tokens == max(map(_nbytes, targets)) + 1
  assert max(map(_nbytes, targets)) <= builtin_tasks.FEATURE_LENGTHS['targets']
  assert max(len(small_sentencepiece.encode(t)) for t in targets) <= task.max_target_tokens


@pytest.mark.parametrize('name', ALL)
def test_every_example_has_its_language_code(name):
  task = registry.get(name)
  assert bool(task.language) != bool(task.language_field)   # exactly one of the two
  for split in SPLITS:
    for e in _examples(name, split):
      lang = task.example_language(e)
      assert lang in gen.LANGUAGES
      if task.language_field:
        assert lang == e['lang'] and e['language'] == gen.LANGUAGES[lang]
      else:
        assert lang == 'en'


def _languages(name):
  task = registry.get(name)
  return {task.example_language(e) for split in SPLITS for e in _examples(name, split)}


def test_crosslingual_split_never_leaks_a_heldout_language_into_training():
  train = mixtures.get_mixture('builtin_crosslingual')
  heldout = mixtures.get_mixture('builtin_crosslingual_heldout')
  assert [t.name for t in train.tasks] == list(XL_TRAIN)
  assert [t.name for t in heldout.tasks] == list(XL_HELDOUT)
  train_langs = set().union(*(_languages(t.name) for t in train.tasks))
  heldout_langs = set().union(*(_languages(t.name) for t in heldout.tasks))
  assert train_langs == set(builtin_tasks.CROSSLINGUAL_TRAIN_LANGUAGES) == {'en', 'fr', 'zh'}
  assert heldout_langs == set(builtin_tasks.CROSSLINGUAL_HELDOUT_LANGUAGES) == {'de', 'es'}
  assert not train_langs & heldout_langs
  # Every held-out task is a trained family in new languages, with the same templates.
  for task in heldout.tasks:
    family = registry.get(task.name.rsplit('_de_es', 1)[0])
    assert family in train.tasks and family.templates == task.templates
    assert task.metric_names == family.metric_names and _languages(task.name) == heldout_langs
    assert all(f.startswith('zs') for f in task.formats)     # zero-shot: no exemplar
  # 200 (number, language) pairs: most go to the evaluation splits (eval_tenths=4).
  assert len({_canonical(e) for e in _examples('builtin_xl_words_to_number_de_es',
                                               'validation')}) >= 50
  assert _languages('builtin_xl_word_count') == {'en', 'fr'}  # Chinese has no spaces
  for mixture in (train, heldout):
    rates = [r for _, r in mixture.tasks_and_rates()]
    assert sum(rates) == pytest.approx(1.0) and min(rates) > 0
    assert 'de/es' in mixture.description


@pytest.mark.parametrize('name', ['builtin', 'builtin_heldout', 'builtin_crosslingual',
                                  'builtin_crosslingual_heldout'])
def test_mixture_gin_files_name_the_mixture(name):
  gin.clear_config()
  try:
    gin_config.parse_gin([os.path.join(REPO, f'gin_configs/mixtures/{name}.gin')])
    assert gin_config.mixture_name_or_object() == name
    assert mixtures.get_mixture(name).name == name
  finally:
    gin.clear_config()
