"""The contamination audit (evaluation/contamination.py) on planted data: exact duplicates
both ways after normalisation, n-gram overlaps (n configurable, never across two fields,
character n-grams for scripts written without spaces), the template's own words left out,
the report's figures and tables, sampling and the time budget, objective tasks' raw text.

Every fixture is built here: random texts over a made-up vocabulary (4,900 words, so two
texts share no 13-gram, nor 12-gram, by chance) with the overlaps planted where the test
says."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from t5x_lite.data import tasks
from t5x_lite.data.sources import DataSource
from t5x_lite.data.templates import Template
from t5x_lite.evaluation import contamination
from t5x_lite.evaluation.contamination import AuditConfig, AuditedSet

SYLLABLES = [c + v for c in 'bdfgklmnprstvz' for v in 'aeiou']
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES]       # 4,900 made-up words


class Rows(DataSource):
  """Splits held as lists of dicts."""

  def __init__(self, **splits):
    self.rows = splits

  @property
  def splits(self):
    return tuple(self.rows)

  def split(self, name):
    self._check_split(name)
    return self.rows[name]


def words(rng: np.random.Generator, n: int) -> list[str]:
  return [str(w) for w in rng.choice(WORDS, n)]


def qa_task(name, rows, split='validation', inputs='Question: {question}', targets='{answer}'):
  return tasks.Task(name, Rows(**{split: rows}), [Template(inputs, targets)])


def run(eval_tasks, training, heldout=False, split='validation', **config):
  sets = [AuditedSet('set', eval_tasks, split, heldout=heldout)]
  return contamination.audit(sets, training, config=AuditConfig(**config))


def pair(report, eval_task, train_task, set_name='set'):
  return report['sets'][set_name]['tasks'][eval_task]['pairs'].get(train_task)


# --- duplicates --------------------------------------------------------------------------

def vary(text: str, k: int) -> str:
  """The same units written differently: case, punctuation, whitespace."""
  parts = text.split(' ')
  if k % 3 == 0:
    return '  '.join(p.upper() for p in parts) + ' !'
  if k % 3 == 1:
    return ', '.join(parts[:1] + [p.capitalize() for p in parts[1:]]) + '.'
  return '\n' + ' \t'.join(parts) + '?!'


def test_planted_duplicates_are_counted_both_ways_after_normalisation():
  rng = np.random.default_rng(0)
  # Short fields (under 13 units): only the duplicate rules can see them.
  evals = [{'question': ' '.join(words(rng, 9)), 'answer': ' '.join(words(rng, 2))}
           for _ in range(50)]
  rest = ' '.join(words(rng, 3))
  evals[0]['question'] = 'Café au lait in der Straße ' + rest             # 9 units
  train = [{'sentence': ' '.join(words(rng, 9)), 'label': ' '.join(words(rng, 2))}
           for _ in range(300)]
  planted = dict(zip([10, 50, 90, 130, 170, 210, 250], range(7)))   # training idx -> eval idx
  planted[280] = 3                                                 # eval 3 twice in training
  for k, (t, e) in enumerate(planted.items()):
    train[t] = {'sentence': vary(evals[e]['question'], k), 'label': vary(evals[e]['answer'], k)}
  # NFD + capitals + no space after the comma: the same units as eval 0's NFC text.
  train[10]['sentence'] = unicodedata.normalize('NFD', 'CAFÉ AU LAIT IN DER STRASSE,' +
                                                rest.upper())
  # Same inputs, another answer: same_inputs, not a duplicate.
  for t, e in zip([20, 60, 100, 140], range(10, 14)):
    train[t] = {'sentence': evals[e]['question'].upper(), 'label': 'something else'}
  # One word changed: neither.
  train[200] = {'sentence': evals[20]['question'].replace(evals[20]['question'].split()[4],
                                                         'zzzz'),
                'label': evals[20]['answer']}
  eval_task = qa_task('qa', evals)
  train_task = qa_task('train_qa', train, split='train', inputs='{sentence}\nAnswer this.',
                       targets='{label}')
  report = run([eval_task], [train_task])
  p = pair(report, 'qa', 'train_qa')
  assert (p['duplicates'], p['duplicates_in_train'], p['same_inputs']) == (7, 8, 11)
  assert (p['contaminated'], p['ngram']) == (7, 0)
  assert p['fraction'] == pytest.approx(7 / 50)
  assert report['sets']['set']['tasks']['qa']['contaminated'] == 7
  assert [(e['eval_index'], e['train_index'], e['shared']) for e in p['examples']] == [
      (0, 10, None), (1, 50, None), (2, 90, None)]


def test_units_normalise_case_punctuation_whitespace_and_nfc():
  assert contamination.units('Crème  BRÛLÉE,naïve!\n') == ['crème', 'brûlée', 'naïve']
  assert contamination.units(unicodedata.normalize('NFD', 'crème brûlée')) == ['crème', 'brûlée']
  assert contamination.units('STRASSE') == contamination.units('straße')
  assert contamination.units('北京，欢迎你') == ['北', '京', '欢', '迎', '你']
  assert contamination.units('well-known snake_case') == ['well', 'known', 'snake', 'case']


# --- n-grams -----------------------------------------------------------------------------

def overlap_fixture():
  """40 eval documents; 5 share a 13-word span with a training text (eval 2 with two), 3
  share a 12-word span, all inside other words, written differently."""
  rng = np.random.default_rng(1)
  evals = [{'question': ' '.join(words(rng, 30)), 'answer': 'yes'} for _ in range(40)]
  train = [{'text': ' '.join(words(rng, 40))} for _ in range(200)]
  plants = [(e, t, 13) for e, t in zip([0, 1, 2, 3, 4, 2], [7, 30, 55, 80, 105, 150])]
  plants += [(e, t, 12) for e, t in zip([5, 6, 7], [170, 180, 190])]
  spans = {}
  for e, t, length in plants:
    shared = evals[e]['question'].split()[5:5 + length]
    host = train[t]['text'].split()
    train[t]['text'] = ' '.join(host[:10] + [w.upper() + ',' for w in shared] + host[10:])
    spans[e] = ' '.join(shared)
  eval_task = qa_task('docs', evals)
  train_task = tasks.Task('corpus', Rows(train=train), [Template('Continue: {text}', '')])
  return eval_task, train_task, spans


@pytest.mark.parametrize('n, found', [(13, [0, 1, 2, 3, 4]), (12, list(range(8))), (14, [])])
def test_planted_ngram_overlaps_are_found_at_n(n, found):
  eval_task, train_task, spans = overlap_fixture()
  report = run([eval_task], [train_task], n=n, examples_per_pair=10)
  p = pair(report, 'docs', 'corpus')
  if not found:
    assert p is None and report['sets']['set']['tasks']['docs']['contaminated'] == 0
    return
  assert (p['ngram'], p['contaminated'], p['duplicates'], p['same_inputs']) == (
      len(found), len(found), 0, 0)
  assert [e['eval_index'] for e in p['examples']] == found
  for e in p['examples']:   # the shared text is an n-word piece of the planted span
    assert len(e['shared'].split()) == n and e['shared'] in spans[e['eval_index']]
  assert report['n'] == n


def test_every_planted_ngram_is_found_whatever_its_hash():
  """200 eval texts of 13 words (one 13-gram each), each inside its own training text: the
  lookup finds all of them, those whose 64-bit hash has the top bit set too."""
  rng = np.random.default_rng(7)
  evals = [{'question': ' '.join(words(rng, 13)), 'answer': 'a'} for _ in range(200)]
  train = [{'question': ' '.join(words(rng, 5) + [e['question']] + words(rng, 5)), 'answer': 'b'}
           for e in evals]
  p = pair(run([qa_task('q', evals)], [qa_task('t', train, split='train')]), 'q', 't')
  assert (p['ngram'], p['contaminated']) == (200, 200)


def test_unspaced_scripts_are_compared_in_characters():
  zh13, zh12 = '在北京的一家小饭馆里吃了非', '我们明天早上七点钟在学校'
  ja13 = 'きょうはとてもいいてんきですね'[:13]
  th13 = 'วันนี้อากาศดีมากเราไปเที่ยว'[:13]
  evals = [{'question': '我们昨天' + zh13 + '常好吃的饺子', 'answer': '是'},
           {'question': 'せんせいが' + ja13 + 'といいました', 'answer': 'はい'},
           {'question': 'เมื่อวาน' + th13 + 'กับครอบครัว', 'answer': 'ใช่'},
           {'question': '他说' + zh12 + '门口见面', 'answer': '是'},
           {'question': '这是一个完全不同的句子没有任何相同的部分', 'answer': '否'}]
  train = [{'question': '听说他们上个月也' + zh13[:6] + '，' + zh13[6:] + '贵的晚饭', 'answer': '对'},
           {'question': 'ぼくは' + ja13 + 'とおもう', 'answer': 'うん'},
           {'question': 'พรุ่งนี้' + th13 + 'ที่ภูเก็ต', 'answer': 'ไม่'},
           {'question': '你知道吗' + zh12 + '集合吧', 'answer': '对'}]
  eval_task, train_task = qa_task('cjk', evals), qa_task('cjk_train', train, split='train')
  p = pair(run([eval_task], [train_task], examples_per_pair=5), 'cjk', 'cjk_train')
  assert (p['ngram'], p['contaminated']) == (3, 3)
  assert [(e['eval_index'], e['train_index']) for e in p['examples']] == [(0, 0), (1, 1), (2, 2)]
  p12 = pair(run([eval_task], [train_task], n=12, examples_per_pair=5), 'cjk', 'cjk_train')
  assert [e['eval_index'] for e in p12['examples']] == [0, 1, 2, 3]


def test_common_short_phrases_are_not_contamination():
  evals = ['In the middle of the night the old lighthouse keeper heard a knock at the door',
           'According to the report the new bridge will carry twice as many cars by next spring',
           'At the end of the day one of the most important things is a good night of sleep',
           'As a matter of fact the museum was closed for the rest of the year for repairs']
  train = ['The children were playing in the middle of the road when the bus finally arrived',
           'Prices rose sharply in March according to the report published by the central bank',
           'One of the most popular dishes at the end of the day was the soup with fresh bread',
           'For the rest of the year the team will train at the stadium as a matter of fact']
  eval_task = qa_task('news', [{'question': t, 'answer': 'ok'} for t in evals])
  train_task = qa_task('news_train', [{'question': t, 'answer': 'ok'} for t in train],
                       split='train')
  report = run([eval_task], [train_task])
  assert report['sets']['set']['tasks']['news'] == {
      'examples': 4, 'contaminated': 0, 'fraction': 0.0, 'pairs': {}}
  # The phrases are there: short n-grams do find them.
  assert pair(run([eval_task], [train_task], n=4), 'news', 'news_train')['ngram'] == 4


def test_the_templates_own_words_are_not_compared():
  instruction = ('Read the following passage carefully and then answer the question that '
                 'comes after it with a single word taken from the passage: {passage}\n'
                 'Question: {question}')
  rng = np.random.default_rng(2)
  rows = lambda k: [{'passage': ' '.join(words(rng, 6)), 'question': ' '.join(words(rng, 4)),
                     'answer': words(rng, 1)[0]} for _ in range(k)]
  eval_task = qa_task('reading', rows(20), inputs=instruction, targets='{answer}')
  train_task = qa_task('reading_train', rows(50), split='train', inputs=instruction,
                       targets='The answer is {answer}.')
  assert contamination.content(eval_task, 'validation', 0) == (
      [eval_task.example('validation', 0)['passage'],
       eval_task.example('validation', 0)['question']],
      [eval_task.example('validation', 0)['answer']])
  report = run([eval_task], [train_task])
  assert report['sets']['set']['tasks']['reading']['pairs'] == {}


def test_ngrams_never_span_two_fields():
  rng = np.random.default_rng(3)
  title, body = words(rng, 10), words(rng, 20)
  answers = [' '.join(words(rng, 7)), ' '.join(words(rng, 7))]
  other = words(rng, 20)
  evals = [{'title': ' '.join(title), 'body': ' '.join(body), 'answers': answers},
           {'title': ' '.join(words(rng, 5)), 'body': ' '.join(other), 'answers': ['x']}]
  eval_task = tasks.Task('two_fields', Rows(validation=evals),
                         [Template('{title}\n\n{body}', '{answers}')])
  filler = lambda: words(rng, 8)
  train = [  # the end of the title + the start of the body: 13 words in a row
      {'a': ' '.join(filler() + title[-6:] + body[:7] + filler()), 'b': 'x'},
      # the two elements of a list field, one after the other: 14 words
      {'a': ' '.join(filler() + answers[0].split() + answers[1].split()), 'b': 'x'},
      # 13 of the body's words, split across the training example's two fields
      {'a': ' '.join(filler() + body[2:9]), 'b': ' '.join(body[9:15] + filler())},
      # the control: 13 words of eval 1's body inside one field
      {'a': ' '.join(filler() + other[3:16] + filler()), 'b': 'x'}]
  train_task = tasks.Task('train_ab', Rows(train=train), [Template('{a} {b}', '')])
  p = pair(run([eval_task], [train_task]), 'two_fields', 'train_ab')
  assert (p['ngram'], p['contaminated']) == (1, 1)
  assert [(e['eval_index'], e['train_index']) for e in p['examples']] == [(1, 3)]


# --- the report --------------------------------------------------------------------------

def report_fixture():
  rng = np.random.default_rng(4)
  seen = [{'question': ' '.join(words(rng, 20)), 'answer': 'a'} for _ in range(20)]
  held = [{'question': ' '.join(words(rng, 20)), 'answer': 'b'} for _ in range(40)]
  clean = [{'question': ' '.join(words(rng, 20)), 'answer': 'c'} for _ in range(5)]
  train = [{'question': ' '.join(words(rng, 20)), 'answer': 'd'} for _ in range(100)]
  for t, e in enumerate(range(0, 20, 2)):         # 10 of 20: 50%
    train[t]['question'] += ' ' + seen[e]['question']
  for t, e in zip(range(50, 54), range(0, 40, 10)):   # 4 of 40: 10%
    train[t]['question'] = ' '.join(held[e]['question'].split()[:15] + [train[t]['question']])
  sets = [AuditedSet('seen', [qa_task('a', seen)], 'validation'),
          AuditedSet('held', [qa_task('b', held)], 'validation', heldout=True),
          AuditedSet('clean', [qa_task('c', clean)], 'validation')]
  return sets, qa_task('mix', train, split='train'), seen, held


def test_fractions_worst_max_fraction_and_tables():
  sets, train_task, seen, held = report_fixture()
  report = contamination.audit(sets, [train_task])
  a, b = pair(report, 'a', 'mix', 'seen'), pair(report, 'b', 'mix', 'held')
  assert (a['contaminated'], a['fraction']) == (10, 0.5)
  assert (b['contaminated'], b['fraction']) == (4, 0.1)
  assert report['sets']['held']['heldout'] and not report['sets']['seen']['heldout']
  assert contamination.worst(report) == [(0.5, 'seen', 'a', 'mix'), (0.1, 'held', 'b', 'mix')]
  assert contamination.worst(report, k=1) == [(0.5, 'seen', 'a', 'mix')]
  assert contamination.max_fraction(report) == 0.5
  assert contamination.max_fraction(report, heldout_only=True) == 0.1
  table = contamination.format_tables(report)
  row = next(line for line in table.splitlines() if line.startswith('a '))
  assert row.split() == ['a', 'mix', '20', '10', '50.0%', '10', '0', '0', '0']
  assert 'held (held out): 1 tasks, 40 examples (validation)' in table
  assert 'clean: 1 tasks, 5 examples (validation)\n  nothing in common' in table
  shown = a['examples'][0]
  assert (shown['eval_index'], shown['train_index']) == (0, 0)
  assert shown['shared'] in seen[0]['question'] and len(shown['shared'].split()) == 13
  assert f'a[0] ~ mix[0] shares "{shown["shared"]}"' in table
  assert f'eval:  {seen[0]["question"]} | a' in table
  assert 'training side 100 of 100 examples (train)' in table


def test_sampled_training_side_is_deterministic_and_counted():
  rng = np.random.default_rng(5)
  evals = [{'question': ' '.join(words(rng, 15)), 'answer': 'a'} for _ in range(30)]
  train = [{'question': ' '.join(words(rng, 15)), 'answer': 'b'} for _ in range(3000)]
  for t in range(0, 3000, 100):                  # 30 training examples hold an eval text each
    train[t]['question'] = evals[t // 100]['question']
  eval_task, train_task = qa_task('q', evals), qa_task('big', train, split='train')
  first = run([eval_task], [train_task], max_train_examples=500)
  second = run([eval_task], [train_task], max_train_examples=500)
  assert first['train'] == {'big': {'examples': 3000, 'scanned': 500}}
  found = pair(first, 'q', 'big')['ngram']
  assert 0 < found < 30          # a sample: some planted examples, not all
  first.pop('seconds'), second.pop('seconds')
  assert first == second
  assert first['complete']
  everything = run([eval_task], [train_task])
  assert everything['train'] == {'big': {'examples': 3000, 'scanned': 3000}}
  assert pair(everything, 'q', 'big')['ngram'] == 30


def test_a_time_budget_of_zero_stops_before_the_training_side():
  sets, train_task, _, _ = report_fixture()
  report = contamination.audit(sets, [train_task], config=AuditConfig(time_budget_s=0))
  assert not report['complete']
  assert report['train'] == {'mix': {'examples': 100, 'scanned': 0}}
  assert contamination.max_fraction(report) == 0.0
  assert 'training side 0 of 100 examples (train), stopped at the time budget' in (
      contamination.format_tables(report))


def test_objective_tasks_are_audited_on_their_raw_text():
  rng = np.random.default_rng(6)
  evals = [{'question': ' '.join(words(rng, 20)), 'answer': 'a'} for _ in range(10)]
  texts = [{'text': ' '.join(words(rng, 50))} for _ in range(30)]
  texts[12]['text'] += ' ' + evals[4]['question']
  texts[20]['text'] = ' '.join(evals[7]['question'].split()[:12] + [texts[20]['text']])
  corpus = tasks.Task('spans', Rows(train=texts), objective='span_corruption')
  assert contamination.content(corpus, 'train', 12) == ([texts[12]['text']], [])
  p = pair(run([qa_task('q', evals)], [corpus]), 'q', 'spans')
  assert (p['ngram'], p['duplicates'], p['contaminated']) == (1, 0, 1)
  assert (p['examples'][0]['eval_index'], p['examples'][0]['train_index']) == (4, 12)


# --- scripts: combining marks stay in their word; the unspaced scripts' stops separate ---

def test_combining_marks_stay_inside_their_word():
  assert len(contamination.units('हिन्दी भाषा')) == 2             # got 5: ह न द भ ष
  assert contamination.units('भाषा') != contamination.units('भष')  # got equal: marks dropped
  assert len(contamination.units('தமிழ் மொழி')) == 2
  assert len(contamination.units('كَتَبَ الوَلَدُ')) == 2             # got 6


def test_punctuation_of_unspaced_scripts_is_dropped():
  assert contamination.units('ジョン・スミス') == contamination.units('ジョン スミス')
  assert contamination.units('မြန်မာ။') == contamination.units('မြန်မာ')
  assert contamination.units('ខ្ញុំ។') == contamination.units('ខ្ញុំ')
  assert contamination.units('สวัสดี๚') == contamination.units('สวัสดี')
