"""Example generators of the built-in tasks: `fn(rng, split) -> dict`, no files, no downloads.

Every generator draws only from the `rng` it is given, so an index is always the same
example. Each example has a canonical key (its content, e.g. '71:fr' or the sentence); a
stable hash of the key assigns it to one split, and the generator redraws until the key
belongs to the requested split, so no split ever contains another split's content even
where the example space is small. Value ranges and vocabularies are kept small so that a
tiny byte-level model can learn every task on a CPU in minutes.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import numpy as np

SPLITS = ('train', 'validation', 'test')
_MAX_DRAWS = 10_000


def split_of(key: str, eval_tenths: int = 1) -> str:
  """The split a canonical key belongs to: b = crc32 % 10; b < eval_tenths -> test,
  b < 2 * eval_tenths -> validation, else train (default: 0 -> test, 1 -> validation)."""
  bucket = zlib.crc32(key.encode('utf-8')) % 10
  return ('test' if bucket < eval_tenths else 'validation' if bucket < 2 * eval_tenths
          else 'train')


def _draw(rng: np.random.Generator, split: str,
          make: Callable[..., tuple[str, dict]], *args, eval_tenths: int = 1) -> dict:
  """Call `make(rng, *args) -> (key, example)` until the key belongs to `split`."""
  if split not in SPLITS:
    raise ValueError(f'built-in tasks have splits {SPLITS}, not {split!r}')  # internal
  for _ in range(_MAX_DRAWS):
    key, example = make(rng, *args)
    if split_of(key, eval_tenths) == split:
      return example
  raise RuntimeError(f'{make.__name__}{args}: no example of split {split!r} in '  # internal
                     f'{_MAX_DRAWS} draws; the example space is too small')


def _pick(rng: np.random.Generator, items: Sequence):
  return items[int(rng.integers(len(items)))]


def _distinct(rng: np.random.Generator, items: Sequence, k: int) -> list:
  """k distinct items in random order (argsort of uniforms: 4x faster than rng.choice)."""
  return [items[i] for i in rng.random(len(items)).argsort()[:k]]


def _several(rng: np.random.Generator, items: Sequence, k: int) -> list:
  """k items drawn with replacement."""
  return [items[i] for i in (rng.random(k) * len(items)).astype(np.int64)]


# --- number words 0..99 ---------------------------------------------------------------------

LANGUAGES = {'en': 'English', 'fr': 'French', 'de': 'German', 'es': 'Spanish', 'zh': 'Chinese'}

_EN = ('zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen '
       'fifteen sixteen seventeen eighteen nineteen').split()
_EN_TENS = 'twenty thirty forty fifty sixty seventy eighty ninety'.split()
_FR = ('zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze '
       'quinze seize dix-sept dix-huit dix-neuf').split()
_FR_TENS = 'vingt trente quarante cinquante soixante'.split()
_DE = ('null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn '
       'fünfzehn sechzehn siebzehn achtzehn neunzehn').split()
_DE_TENS = 'zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig'.split()
_ES = ('cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce '
       'quince dieciséis diecisiete dieciocho diecinueve veinte veintiuno veintidós veintitrés '
       'veinticuatro veinticinco veintiséis veintisiete veintiocho veintinueve').split()
_ES_TENS = 'treinta cuarenta cincuenta sesenta setenta ochenta noventa'.split()
_ZH = '零一二三四五六七八九'


def _en(n: int) -> str:
  if n < 20:
    return _EN[n]
  tens, unit = divmod(n, 10)
  return _EN_TENS[tens - 2] + (f'-{_EN[unit]}' if unit else '')


def _fr(n: int) -> str:
  """Traditional spelling: vingt et un, soixante et onze, quatre-vingts, quatre-vingt-un."""
  if n < 20:
    return _FR[n]
  if n < 70:
    tens, unit = divmod(n, 10)
    word = _FR_TENS[tens - 2]
    return word if unit == 0 else f'{word} et un' if unit == 1 else f'{word}-{_FR[unit]}'
  if n < 80:
    return 'soixante et onze' if n == 71 else f'soixante-{_FR[n - 60]}'
  return 'quatre-vingts' if n == 80 else f'quatre-vingt-{_FR[n - 80]}'


def _de(n: int) -> str:
  if n < 20:
    return _DE[n]
  tens, unit = divmod(n, 10)
  word = _DE_TENS[tens - 2]
  return word if unit == 0 else ('ein' if unit == 1 else _DE[unit]) + 'und' + word


def _es(n: int) -> str:
  if n < 30:
    return _ES[n]
  tens, unit = divmod(n, 10)
  word = _ES_TENS[tens - 3]
  return f'{word} y {_ES[unit]}' if unit else word


def _zh(n: int) -> str:
  if n < 10:
    return _ZH[n]
  tens, unit = divmod(n, 10)
  return ('' if tens == 1 else _ZH[tens]) + '十' + (_ZH[unit] if unit else '')


_SPELLERS = {'en': _en, 'fr': _fr, 'de': _de, 'es': _es, 'zh': _zh}


def number_to_words(n: int, lang: str) -> str:
  """`n` in 0..99 written out in `lang` (one of LANGUAGES)."""
  if not 0 <= n <= 99:
    raise ValueError(f'number words cover 0..99, got {n}')  # internal
  return _SPELLERS[lang](n)


def _number_example(rng, langs):
  n, lang = int(rng.integers(100)), _pick(rng, langs)
  # Keyed by (number, language) only, so both directions put a pair in the same split.
  return f'{n}:{lang}', {'number': str(n), 'words': number_to_words(n, lang), 'lang': lang,
                         'language': LANGUAGES[lang]}


def number_words(rng, split, langs: Sequence[str] = tuple(LANGUAGES), eval_tenths: int = 1):
  """Digits <-> number words; the answer field depends on the direction (the template).

  Only 100 pairs per language: a task in languages no training task has (cross-lingual
  zero-shot) takes eval_tenths=4, so that validation and test hold ~40% of the pairs each
  (instead of ~10%: about 20 distinct examples for two languages); its train split only
  feeds the majority baseline."""
  return _draw(rng, split, _number_example, tuple(langs), eval_tenths=eval_tenths)


def number_words_max_bytes(langs: Sequence[str] = tuple(LANGUAGES)) -> int:
  """UTF-8 bytes of the longest number word of `langs` (a Chinese character is 3 bytes)."""
  return max(len(number_to_words(n, lang).encode('utf-8')) for n in range(100) for lang in langs)


# --- classification -------------------------------------------------------------------------

SENTIMENT_LABELS = ('positive', 'negative')
_THINGS = ('food', 'film', 'hotel', 'staff', 'book', 'show', 'room', 'music', 'game', 'trip',
           'cafe', 'class', 'view', 'band')
_ADJS = {'positive': ('great', 'lovely', 'superb', 'fun', 'charming', 'excellent', 'amazing',
                      'wonderful', 'perfect', 'pleasant'),
         'negative': ('awful', 'boring', 'terrible', 'dull', 'rude', 'dreadful', 'poor',
                      'bland', 'horrible', 'noisy')}
_FEEL = {'positive': ('loved', 'enjoyed', 'liked'), 'negative': ('hated', 'disliked')}


def _sentiment_example(rng, label):
  other = SENTIMENT_LABELS[1 - SENTIMENT_LABELS.index(label)]
  thing = 'the ' + _pick(rng, _THINGS)
  kind = int(rng.integers(4))
  if kind == 0:
    text = f'{thing} was {_pick(rng, _ADJS[label])}.'
  elif kind == 1:
    a, b = _distinct(rng, _ADJS[label], 2)
    text = f'{thing} was {a} and {b}.'
  elif kind == 2:
    text = f'I {_pick(rng, _FEEL[label])} {thing}.'
  else:  # negation flips the polarity of the word
    text = f'{thing} was not {_pick(rng, _ADJS[other])}.'
  text = text[0].upper() + text[1:]
  return text, {'text': text, 'answer': label}


def sentiment(rng, split):
  """A one-sentence review, positive or negative (balanced), sometimes negated."""
  return _draw(rng, split, _sentiment_example, _pick(rng, SENTIMENT_LABELS))


COMPARE_LABELS = ('larger', 'smaller', 'equal')


def _spell(n: int, lang: str | None) -> str:
  return str(n) if lang is None else number_to_words(n, lang)


def _compare_example(rng, label, lang):
  a = int(rng.integers(100))
  if label == 'equal':
    b = a
  else:
    b = int(rng.integers(100))
    while b == a:
      b = int(rng.integers(100))
    if (a > b) != (label == 'larger'):
      a, b = b, a
  return f'{a},{b}', {'a': _spell(a, lang), 'b': _spell(b, lang), 'answer': label}


def compare(rng, split, lang: str | None = None):
  """Is a larger than, smaller than or equal to b (classes balanced); in digits, or in
  number words of `lang`."""
  return _draw(rng, split, _compare_example, _pick(rng, COMPARE_LABELS), lang)


def _compare_words_example(rng, label, langs):
  lang = _pick(rng, langs)
  key, example = _compare_example(rng, label, lang)
  return f'{key}:{lang}', {**example, 'lang': lang, 'language': LANGUAGES[lang]}


def compare_words(rng, split, langs: Sequence[str]):
  """`compare` with both numbers written in words of one of `langs`, named in 'lang'."""
  return _draw(rng, split, _compare_words_example, _pick(rng, COMPARE_LABELS), tuple(langs))


# --- extractive QA --------------------------------------------------------------------------

_NAMES = ('Ann', 'Ben', 'Cal', 'Dan', 'Eve', 'Fay', 'Gus', 'Hal', 'Ivy', 'Joe', 'Kim', 'Liz')
_CITIES = ('Oslo', 'Rome', 'Lima', 'Kyiv', 'Cairo', 'Paris', 'Delhi', 'Tokyo', 'Bern', 'Doha')
_JOBS = ('pilot', 'baker', 'nurse', 'judge', 'chef', 'poet', 'vet', 'farmer', 'singer', 'tailor')


def _qa_example(rng):
  k = 2 + int(rng.integers(2))
  names, cities = _distinct(rng, _NAMES, k), _distinct(rng, _CITIES, k)
  jobs, is_city = _distinct(rng, _JOBS, k), rng.random(k) < 0.5
  facts = [f'{n} lives in {c}.' if city else f'{n} is a {j}.'
           for n, c, j, city in zip(names, cities, jobs, is_city)]
  i, ask_name = int(rng.integers(k)), bool(rng.integers(2))
  if is_city[i]:
    question, answer = ((f'Who lives in {cities[i]}?', names[i]) if ask_name else
                        (f'Where does {names[i]} live?', cities[i]))
  else:
    question, answer = ((f'Who is a {jobs[i]}?', names[i]) if ask_name else
                        (f"What is {names[i]}'s job?", jobs[i]))
  context = ' '.join(facts)
  return f'{context}|{question}', {'context': context, 'question': question, 'answer': answer}


def qa(rng, split):
  """2-3 short facts about people (city or job) and a question answered by a span."""
  return _draw(rng, split, _qa_example)


# --- numbers: arithmetic, sorting, counting -------------------------------------------------

def _arithmetic_example(rng):
  a, b = int(rng.integers(20)), int(rng.integers(20))
  if rng.integers(2):
    op, op_word, answer = '+', 'plus', a + b
  else:
    a, b = max(a, b), min(a, b)  # no negative results
    op, op_word, answer = '-', 'minus', a - b
  return f'{a}{op}{b}', {'a': str(a), 'b': str(b), 'op': op, 'op_word': op_word,
                         'answer': str(answer)}


def arithmetic(rng, split):
  """a + b or a - b with a, b < 20 and a non-negative result (small enough that the CPU
  demo's tiny model learns it in minutes; validation pairs are still unseen in training)."""
  return _draw(rng, split, _arithmetic_example)


# The same question asked in each language: phrasing i is template i of the task (the last
# one its held-out template), so instruction and operator words are in the example's language.
ARITHMETIC_OPS = {'en': ('plus', 'minus'), 'fr': ('plus', 'moins'), 'de': ('plus', 'minus'),
                  'es': ('más', 'menos'), 'zh': ('加', '减')}
ARITHMETIC_QUESTIONS = {
    'en': ('What is {a} {op} {b}?', 'Calculate {a} {op} {b}.', '{a} {op} {b} equals what?',
           'How much is {a} {op} {b}?'),
    'fr': ('Combien font {a} {op} {b} ?', 'Calcule {a} {op} {b}.', '{a} {op} {b} égale quoi ?',
           'Quel est le résultat de {a} {op} {b} ?'),
    'de': ('Was ist {a} {op} {b}?', 'Berechne {a} {op} {b}.', '{a} {op} {b} ergibt was?',
           'Wie viel ist {a} {op} {b}?'),
    'es': ('¿Cuánto es {a} {op} {b}?', 'Calcula {a} {op} {b}.', '¿{a} {op} {b} es igual a qué?',
           '¿Qué resultado da {a} {op} {b}?'),
    'zh': ('{a}{op}{b}等于多少？', '计算{a}{op}{b}。', '{a}{op}{b}是多少？', '请算出{a}{op}{b}。'),
}


def _arithmetic_words_example(rng, langs):
  lang = _pick(rng, langs)
  key, e = _arithmetic_example(rng)
  op = ARITHMETIC_OPS[lang][e['op'] == '-']
  asks = {f'ask{i}': q.format(a=e['a'], op=op, b=e['b'])
          for i, q in enumerate(ARITHMETIC_QUESTIONS[lang])}
  return f'{key}:{lang}', {'a': e['a'], 'b': e['b'], 'answer': e['answer'], 'lang': lang,
                           'language': LANGUAGES[lang], **asks}


def arithmetic_words(rng, split, langs: Sequence[str]):
  """`arithmetic` asked in one of `langs` (instruction and operator word): fields ask0..ask3,
  one phrasing each (ask3 for held-out templates)."""
  return _draw(rng, split, _arithmetic_words_example, tuple(langs))


def _sort_example(rng, descending):
  k = 3 + int(rng.integers(2))
  values = _distinct(rng, range(20), k)
  numbers = ', '.join(map(str, values))
  answer = ', '.join(map(str, sorted(values, reverse=descending)))
  return numbers, {'numbers': numbers, 'answer': answer}


def sort_numbers(rng, split, descending: bool = False):
  """3-4 distinct numbers below 20, to be sorted (sized for the CPU demo)."""
  return _draw(rng, split, _sort_example, descending)


WORDS = ('red', 'blue', 'green', 'cat', 'dog', 'bird', 'fish', 'tree', 'house', 'river', 'sun',
         'moon', 'star', 'big', 'small', 'old', 'new', 'happy', 'quick', 'slow', 'run', 'jump',
         'sing', 'read', 'play', 'apple', 'bread', 'milk', 'water', 'stone', 'hill', 'road',
         'book', 'door', 'chair', 'lamp', 'cloud', 'rain', 'snow', 'wind')


def _word_count_example(rng):
  k = 2 + int(rng.integers(8))
  text = ' '.join(_several(rng, WORDS, k))
  return text, {'text': text, 'answer': str(k)}


def word_count(rng, split):
  """2-9 random words; the answer is how many."""
  return _draw(rng, split, _word_count_example)


# Words of at most 6 UTF-8 bytes, so 9 of them still fit a zero-shot prompt. No Chinese:
# its words are not separated by spaces.
LEXICONS = {
    'en': WORDS,
    'fr': tuple('chat chien arbre maison soleil lune pain lait eau pierre porte livre pluie '
                'neige vent rouge bleu vert petit grand été île rêve'.split()),
    'de': tuple('Katze Hund Vogel Baum Haus Sonne Mond Brot Milch Wasser Stein Tür Buch Regen '
                'Schnee Wind rot blau grün klein groß Fluss Käse'.split()),
    'es': tuple('gato perro árbol casa sol luna pan leche agua piedra puerta libro lluvia '
                'nieve viento rojo azul verde grande niño año río flor'.split()),
}


def _word_count_words_example(rng, langs):
  lang = _pick(rng, langs)
  k = 2 + int(rng.integers(8))
  text = ' '.join(_several(rng, LEXICONS[lang], k))
  return f'{text}:{lang}', {'text': text, 'answer': str(k), 'lang': lang,
                            'language': LANGUAGES[lang]}


def word_count_words(rng, split, langs: Sequence[str]):
  """`word_count` on words of one of `langs` (keys of LEXICONS), named in 'lang'."""
  return _draw(rng, split, _word_count_words_example, tuple(langs))


# --- text transformation and rewriting ------------------------------------------------------

def _uppercase_example(rng):
  text = ' '.join(_several(rng, WORDS, 2 + int(rng.integers(3))))
  return text, {'text': text, 'answer': text.upper()}


def uppercase(rng, split):
  """2-4 lower-case words to write in capitals."""
  return _draw(rng, split, _uppercase_example)


_ANIMATE = ('cat', 'dog', 'fox', 'owl', 'boy', 'girl', 'king', 'man', 'cow', 'hen', 'duck',
            'bear')
# (present, past, past participle); participles of at most 6 letters keep targets short.
_VERBS = (('chases', 'chased', 'chased'), ('helps', 'helped', 'helped'),
          ('calls', 'called', 'called'), ('sees', 'saw', 'seen'), ('finds', 'found', 'found'),
          ('pushes', 'pushed', 'pushed'), ('kicks', 'kicked', 'kicked'),
          ('bites', 'bit', 'bitten'), ('hugs', 'hugged', 'hugged'), ('feeds', 'fed', 'fed'),
          ('catches', 'caught', 'caught'), ('saves', 'saved', 'saved'))


def _passive_example(rng):
  subject, obj = _distinct(rng, _ANIMATE, 2)
  present, past, participle = _pick(rng, _VERBS)
  if rng.integers(2):
    sentence, aux = f'The {subject} {past} the {obj}.', 'was'
  else:
    sentence, aux = f'The {subject} {present} the {obj}.', 'is'
  return sentence, {'sentence': sentence,
                    'answer': f'The {obj} {aux} {participle} by the {subject}.'}


def passive(rng, split):
  """'The cat chased the dog.' -> 'The dog was chased by the cat.' (past or present)."""
  return _draw(rng, split, _passive_example)
