"""Built-in instruction tasks: the mixtures `builtin` and `builtin_heldout`, and the
cross-lingual pair `builtin_crosslingual` / `builtin_crosslingual_heldout`.

Generated procedurally from a seed (builtin_generators.py), so the demo and the tests have
real multi-task data with no downloads: classification with options, extractive QA,
arithmetic, sorting, counting, case conversion, active-to-passive rewriting and number
words in five languages. Every task has FLAN-style templates plus held-out templates, and
the held-out tasks (never in `builtin`) need a skill combination no training task teaches
directly, for zero-shot evaluation.

Cross-lingual zero-shot (mT5/XNLI style: train in some languages, evaluate the same task in
others): task families trained in CROSSLINGUAL_TRAIN_LANGUAGES (en, fr, zh) are evaluated in
CROSSLINGUAL_HELDOUT_LANGUAGES (de, es), each held-out language having a related training
language to transfer from (de: en, es: fr). The families: arithmetic asked in the example's
language (instruction and operator word: 'Was ist 3 plus 4?', '¿Cuánto es 3 más 4?'),
reading number words as digits and comparing two numbers written as words (en/fr/zh ->
de/es), counting words (en/fr -> de/es: Chinese does not separate words by spaces). Writing
number words is trained (en/fr/zh) with no held-out side: no model can spell the words of a
language it has never seen. No example of a held-out language is in `builtin_crosslingual`,
so it is not to be trained together with `builtin`, whose number words cover all five
languages. Besides arithmetic, instructions are English and the content is in the example's
language (its 'lang' field); held-out prompts are zero-shot only.

Every task names its language (`language='en'`, or `language_field='lang'` where examples mix
languages) and a bound on its target length (`max_target_tokens`: the longest target's UTF-8
bytes, a Chinese character being 3, plus one for SentencePiece's dummy prefix; see _tokens).

Sized for a tiny byte-level T5: every prompt and target fits FEATURE_LENGTHS (zero-shot
prompts are at most ZERO_SHOT_INPUT_BYTES), and every trivial baseline is beatable.
Raw-text tasks for span corruption (`builtin_text_<lang>`, mixture `builtin_denoise`) are
in builtin_text.py, registered here too but in none of the four mixtures above.

`register_all()` registers everything; importing `t5x_lite.data` calls it.
"""

from __future__ import annotations

import functools

from t5x_lite.data import builtin_generators as gen, builtin_text
from t5x_lite.data import mixtures, registry, tasks
from t5x_lite.data.sources import GeneratedSource
from t5x_lite.data.templates import Template

# Bytes (UTF-8) of the longest prompts and targets; tests check every example against them.
ZERO_SHOT_INPUT_BYTES = 120
FEATURE_LENGTHS = {'inputs': 256, 'targets': 32}   # few-shot prompts (1 exemplar) included

TRAIN_SIZES = {'train': 3000, 'validation': 200, 'test': 200}
HELDOUT_SIZES = {'train': 1000, 'validation': 200, 'test': 200}
CROSSLINGUAL_TRAIN_LANGUAGES = ('en', 'fr', 'zh')
CROSSLINGUAL_HELDOUT_LANGUAGES = ('de', 'es')
_XL_WORD_COUNT_TRAIN_LANGUAGES = ('en', 'fr')   # no zh: Chinese has no spaces between words
MAX_EXAMPLES = 3000   # cap of examples_proportional in the `builtin` mixture
# FLAN's mix for classification: mostly zero-shot, some with the OPTIONS block left out.
_CLASSIFICATION_MIX = {'zs_opt': 0.5, 'zs_noopt': 0.2, 'fs_opt': 0.3}
_ZERO_SHOT_MIX = {'zs_opt': 0.5, 'zs_noopt': 0.2}   # held-out languages: no exemplar in them
# UTF-8 bytes of the longest targets.
_SORT_BYTES = len('10, 11, 12, 13')
_UPPERCASE_BYTES = 4 * max(map(len, gen.WORDS)) + 3
_PASSIVE_BYTES = len('The bear was bitten by the king.')


def _tokens(target_bytes: int) -> int:
  """`max_target_tokens` of targets of at most `target_bytes` UTF-8 bytes: a bound for the
  byte vocabulary (one token a byte) and for SentencePiece with byte fallback, as the demo's
  (at most one token a byte, plus the dummy-prefix piece '▁' before a leading digit:
  '7' -> ['▁', '7']). EOS not counted."""
  return target_bytes + 1


def _source(fn, seed: int, sizes=None) -> GeneratedSource:
  return GeneratedSource(fn, dict(sizes or TRAIN_SIZES), seed=seed)


# --- templates ------------------------------------------------------------------------------

_SENTIMENT = [
    Template('Review: {text}\nIs this review positive or negative?{options_}'),
    Template('{text}\nWhat is the sentiment of this review?{options_}'),
    Template('Is the sentiment of "{text}" positive or negative?{options_}'),
    Template('{text}\nHow does the reviewer feel about it?{options_}'),
]
_SENTIMENT_HELDOUT = [Template('Classify the tone of this sentence: {text}{options_}')]

_COMPARE = [
    Template('Is {a} larger than, smaller than or equal to {b}?{options_}'),
    Template('Compare the numbers {a} and {b}. The first one is{options_}'),
    Template('First: {a}\nSecond: {b}\nIs the first larger, smaller or equal?{options_}'),
]
_COMPARE_HELDOUT = [Template('How does {a} compare with {b}?{options_}')]
# Instructions in the example's own language (gen.ARITHMETIC_QUESTIONS): template i, phrasing i.
_ASK = [Template('{ask0}'), Template('{ask1}'), Template('{ask2}')]
_ASK_HELDOUT = [Template('{ask3}')]
# Shorter, so two French number words (up to 21 bytes each) fit a zero-shot prompt.
_COMPARE_WORDS = [
    Template('Compare {a} with {b}. The first is{options_}'),
    Template('Is {a} larger, smaller or equal to {b}?{options_}'),
    Template('A: {a}\nB: {b}\nIs A larger, smaller or equal?{options_}'),
]

_QA = [
    Template('{context}\nQuestion: {question}'),
    Template('Read the text and answer the question.\n{context}\n{question}'),
    Template('Passage: {context}\nAnswer from the passage: {question}'),
]
_QA_HELDOUT = [Template('{question} Use this text: {context}')]

_ARITHMETIC = [
    Template('What is {a} {op} {b}?'),
    Template('Calculate {a} {op_word} {b}.'),
    Template('Compute: {a} {op} {b} ='),
    Template('Solve {a} {op} {b}. Answer:'),
]
_ARITHMETIC_HELDOUT = [Template('How much is {a} {op_word} {b}?')]

_SORT = [
    Template('Sort from smallest to largest: {numbers}'),
    Template('Put these numbers in ascending order: {numbers}'),
    Template('{numbers}\nArrange the numbers above in increasing order.'),
]
_SORT_HELDOUT = [Template('Order {numbers} from lowest to highest.')]

_SORT_DESC = [
    Template('Sort from largest to smallest: {numbers}'),
    Template('Put these numbers in descending order: {numbers}'),
    Template('{numbers}\nArrange the numbers above in decreasing order.'),
]
_SORT_DESC_HELDOUT = [Template('Order {numbers} from highest to lowest.')]

_WORD_COUNT = [
    Template('How many words are in this text? {text}'),
    Template('Count the words in: {text}'),
    Template('{text}\nHow many words does the text above have?'),
]
_WORD_COUNT_HELDOUT = [Template('Number of words in "{text}":')]

_UPPERCASE = [
    Template('Convert to upper case: {text}'),
    Template('Rewrite in capital letters: {text}'),
    Template('{text}\nWrite the text above in all caps.'),
]
_UPPERCASE_HELDOUT = [Template('Make every letter of "{text}" uppercase.')]

_PASSIVE = [
    Template('Rewrite in the passive voice: {sentence}'),
    Template('Change this sentence to the passive: {sentence}'),
    Template('{sentence}\nSay the same thing in the passive voice.'),
]
_PASSIVE_HELDOUT = [Template('Turn "{sentence}" into a passive sentence.')]

_TO_WORDS = [
    Template('Write {number} in {language} words.', '{words}'),
    Template('How do you say {number} in {language}?', '{words}'),
    Template('Spell out the number {number} in {language}.', '{words}'),
]
_TO_WORDS_HELDOUT = [Template('What is the {language} word for {number}?', '{words}')]

_TO_DIGITS = [
    Template('Write the {language} number "{words}" in digits.', '{number}'),
    Template('What number is "{words}" in {language}?', '{number}'),
    Template('{language}: {words}\nWhat is this number in digits?', '{number}'),
]
_TO_DIGITS_HELDOUT = [Template('Convert "{words}" ({language}) to a numeral.', '{number}')]


# --- tasks ----------------------------------------------------------------------------------

def _training_tasks() -> list[tasks.Task]:
  en = {'language': 'en'}
  return [
      tasks.Task(
          'builtin_sentiment', _source(gen.sentiment, 1), _SENTIMENT, ['accuracy'],
          heldout_templates=_SENTIMENT_HELDOUT, options=list(gen.SENTIMENT_LABELS),
          template_mix=_CLASSIFICATION_MIX, num_fewshot=1, baseline='majority',
          max_target_tokens=_tokens(max(map(len, gen.SENTIMENT_LABELS))), **en,
          description='Is a one-sentence review (sometimes negated) positive or negative?'),
      tasks.Task(
          'builtin_compare', _source(gen.compare, 2), _COMPARE, ['accuracy'],
          heldout_templates=_COMPARE_HELDOUT, options=list(gen.COMPARE_LABELS),
          template_mix=_CLASSIFICATION_MIX, num_fewshot=1, baseline='majority',
          max_target_tokens=_tokens(max(map(len, gen.COMPARE_LABELS))), **en,
          description='Is the first of two numbers below 100 larger, smaller or equal?'),
      tasks.Task(
          'builtin_qa', _source(gen.qa, 3), _QA, ['exact_match', 'f1'],
          heldout_templates=_QA_HELDOUT, baseline='majority', max_target_tokens=_tokens(6),
          **en,
          description='Answer a who/where/what question with a span of a 2-3 fact passage.'),
      tasks.Task(
          'builtin_arithmetic', _source(gen.arithmetic, 4), _ARITHMETIC, ['accuracy'],
          heldout_templates=_ARITHMETIC_HELDOUT, baseline='majority',
          max_target_tokens=_tokens(2), **en, description='Add or subtract two numbers below 20.'),
      tasks.Task(
          'builtin_sort', _source(gen.sort_numbers, 5), _SORT, ['exact_match'],
          heldout_templates=_SORT_HELDOUT, baseline='copy:numbers',
          max_target_tokens=_tokens(_SORT_BYTES), **en,
          description='Sort 3-4 numbers below 20 in ascending order.'),
      tasks.Task(
          'builtin_word_count', _source(gen.word_count, 6), _WORD_COUNT, ['accuracy'],
          heldout_templates=_WORD_COUNT_HELDOUT, baseline='majority',
          max_target_tokens=_tokens(1), **en, description='Count the words (2-9) of a short text.'),
      # accuracy, not exact_match: exact_match ignores case, so copying would score 100.
      tasks.Task(
          'builtin_uppercase', _source(gen.uppercase, 7), _UPPERCASE, ['accuracy'],
          heldout_templates=_UPPERCASE_HELDOUT, baseline='copy:text',
          max_target_tokens=_tokens(_UPPERCASE_BYTES), **en,
          description='Rewrite 2-4 lower-case words in capital letters.'),
      tasks.Task(
          'builtin_passive', _source(gen.passive, 8), _PASSIVE, ['bleu', 'rougeL'],
          heldout_templates=_PASSIVE_HELDOUT, baseline='copy:sentence',
          max_target_tokens=_tokens(_PASSIVE_BYTES), **en,
          description='Rewrite a simple active sentence (past or present) in the passive.'),
      tasks.Task(
          'builtin_number_words', _source(gen.number_words, 9), _TO_WORDS, ['exact_match'],
          heldout_templates=_TO_WORDS_HELDOUT, baseline='majority', language_field='lang',
          max_target_tokens=_tokens(gen.number_words_max_bytes()),
          description='Write a number 0-99 in English, French, German, Spanish or Chinese words.'),
      tasks.Task(
          'builtin_words_to_number',
          _source(functools.partial(gen.number_words, langs=('en', 'fr', 'de')), 10),
          _TO_DIGITS, ['accuracy'], heldout_templates=_TO_DIGITS_HELDOUT, baseline='majority',
          language_field='lang', max_target_tokens=_tokens(2),
          description='Read English, French or German number words (0-99) as digits.'),
  ]


def _heldout_tasks() -> list[tasks.Task]:
  return [
      tasks.Task(
          'builtin_sort_descending',
          _source(functools.partial(gen.sort_numbers, descending=True), 101, HELDOUT_SIZES),
          _SORT_DESC, ['exact_match'], heldout_templates=_SORT_DESC_HELDOUT,
          baseline='copy:numbers', language='en', max_target_tokens=_tokens(_SORT_BYTES),
          description='Held out: sort 3-4 numbers in descending order (training sorts '
                      'ascending).'),
      tasks.Task(
          'builtin_words_to_number_es_zh',
          _source(functools.partial(gen.number_words, langs=('es', 'zh')), 102, HELDOUT_SIZES),
          _TO_DIGITS, ['accuracy'], heldout_templates=_TO_DIGITS_HELDOUT, baseline='majority',
          language_field='lang', max_target_tokens=_tokens(2),
          description='Held out: read Spanish or Chinese number words as digits (training '
                      'only writes them).'),
      tasks.Task(
          'builtin_compare_words',
          _source(functools.partial(gen.compare, lang='en'), 103, HELDOUT_SIZES),
          _COMPARE, ['accuracy'], heldout_templates=_COMPARE_HELDOUT,
          options=list(gen.COMPARE_LABELS), template_mix=_CLASSIFICATION_MIX, num_fewshot=1,
          baseline='majority', language='en',
          max_target_tokens=_tokens(max(map(len, gen.COMPARE_LABELS))),
          description='Held out: compare two numbers written as English words.'),
  ]


def _crosslingual_tasks(heldout: bool) -> list[tasks.Task]:
  """The cross-lingual families in the training languages, or (heldout) in the held-out
  ones; the same templates, new seeds, zero-shot prompts only on the held-out side."""
  langs = CROSSLINGUAL_HELDOUT_LANGUAGES if heldout else CROSSLINGUAL_TRAIN_LANGUAGES
  count_langs = CROSSLINGUAL_HELDOUT_LANGUAGES if heldout else _XL_WORD_COUNT_TRAIN_LANGUAGES
  named = '/'.join(gen.LANGUAGES[lang] for lang in langs)
  suffix, seed = ('_' + '_'.join(langs), 200) if heldout else ('', 100)
  sizes = HELDOUT_SIZES if heldout else TRAIN_SIZES
  shots = {'template_mix': _ZERO_SHOT_MIX} if heldout else {
      'template_mix': _CLASSIFICATION_MIX, 'num_fewshot': 1}

  def describe(text):
    return f'Held out: {text}' if heldout else text[0].upper() + text[1:]

  xl = [
      tasks.Task(
          f'builtin_xl_arithmetic{suffix}',
          _source(functools.partial(gen.arithmetic_words, langs=langs), seed + 15, sizes),
          _ASK, ['accuracy'], heldout_templates=_ASK_HELDOUT, baseline='majority',
          language_field='lang', max_target_tokens=_tokens(2),
          description=describe(f'add or subtract two numbers below 20, asked in {named}.')),
      tasks.Task(
          f'builtin_xl_words_to_number{suffix}',
          _source(functools.partial(gen.number_words, langs=langs,
                                    eval_tenths=4 if heldout else 1), seed + 11, sizes),
          _TO_DIGITS, ['accuracy'], heldout_templates=_TO_DIGITS_HELDOUT, baseline='majority',
          language_field='lang', max_target_tokens=_tokens(2),
          description=describe(f'read {named} number words as digits.')),
      tasks.Task(
          f'builtin_xl_compare_words{suffix}',
          _source(functools.partial(gen.compare_words, langs=langs), seed + 12, sizes),
          _COMPARE_WORDS, ['accuracy'], heldout_templates=_COMPARE_HELDOUT,
          options=list(gen.COMPARE_LABELS), baseline='majority', language_field='lang',
          max_target_tokens=_tokens(max(map(len, gen.COMPARE_LABELS))), **shots,
          description=describe(f'compare two numbers written as {named} words.')),
      tasks.Task(
          f'builtin_xl_word_count{suffix}',
          _source(functools.partial(gen.word_count_words, langs=count_langs), seed + 13, sizes),
          _WORD_COUNT, ['accuracy'], heldout_templates=_WORD_COUNT_HELDOUT, baseline='majority',
          language_field='lang', max_target_tokens=_tokens(1),
          description=describe('count the words (2-9) of a short '
                               f'{"/".join(gen.LANGUAGES[lang] for lang in count_langs)} text.')),
  ]
  if heldout:
    return xl
  return [tasks.Task(
      'builtin_xl_number_words',
      _source(functools.partial(gen.number_words, langs=langs), seed + 14),
      _TO_WORDS, ['exact_match'], heldout_templates=_TO_WORDS_HELDOUT, baseline='majority',
      language_field='lang', max_target_tokens=_tokens(gen.number_words_max_bytes(langs)),
      description=f'Write a number 0-99 in {named} words.')] + xl


TRAINING_TASKS = tuple(t.name for t in _training_tasks())
HELDOUT_TASKS = tuple(t.name for t in _heldout_tasks())
CROSSLINGUAL_TASKS = tuple(t.name for t in _crosslingual_tasks(heldout=False))
CROSSLINGUAL_HELDOUT_TASKS = tuple(t.name for t in _crosslingual_tasks(heldout=True))


def builtin_task_names(heldout: bool = False) -> tuple[str, ...]:
  """Names of the tasks of `builtin` (or, with heldout=True, of `builtin_heldout`)."""
  return HELDOUT_TASKS if heldout else TRAINING_TASKS


def register_all() -> None:
  """(Re-)register every built-in task and the four mixtures (and builtin_text's); idempotent."""
  builtin_text.register_all()
  training = _training_tasks()
  for task in (training + _heldout_tasks() + _crosslingual_tasks(heldout=False)
               + _crosslingual_tasks(heldout=True)):
    registry.register(task, overwrite=True)
  capped = mixtures.examples_proportional(maximum=MAX_EXAMPLES)
  registry.register(mixtures.Mixture(
      'builtin', [t.name for t in training], default_rate=capped,
      description='The built-in generated training tasks, examples-proportional.'),
      overwrite=True)
  registry.register(mixtures.Mixture(
      'builtin_heldout', list(HELDOUT_TASKS),
      description='Built-in tasks held out of `builtin`, for zero-shot evaluation.'),
      overwrite=True)
  registry.register(mixtures.Mixture(
      'builtin_crosslingual', list(CROSSLINGUAL_TASKS), default_rate=capped,
      description='Cross-lingual training: arithmetic asked in the language, writing and '
                  'reading number words, comparing numbers in words '
                  f'({"/".join(CROSSLINGUAL_TRAIN_LANGUAGES)}) and word counting '
                  f'({"/".join(_XL_WORD_COUNT_TRAIN_LANGUAGES)}); no example in the held-out '
                  f'languages {"/".join(CROSSLINGUAL_HELDOUT_LANGUAGES)}. Examples-proportional.'),
      overwrite=True)
  registry.register(mixtures.Mixture(
      'builtin_crosslingual_heldout', list(CROSSLINGUAL_HELDOUT_TASKS),
      description='Cross-lingual zero-shot: the families of `builtin_crosslingual` in the '
                  f'held-out languages {"/".join(CROSSLINGUAL_HELDOUT_LANGUAGES)} (arithmetic '
                  'asked in the language, reading number words, comparing numbers in words, '
                  'word counting), zero-shot prompts.'),
      overwrite=True)
