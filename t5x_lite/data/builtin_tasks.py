"""Built-in instruction tasks and the mixtures `builtin` and `builtin_heldout`.

Generated procedurally from a seed (builtin_generators.py), so the demo and the tests have
real multi-task data with no downloads: classification with options, extractive QA,
arithmetic, sorting, counting, case conversion, active-to-passive rewriting and number
words in five languages. Every task has FLAN-style templates plus held-out templates, and
the held-out tasks (never in `builtin`) need a skill combination no training task teaches
directly, for zero-shot evaluation.

Sized for a tiny byte-level T5: every prompt and target fits FEATURE_LENGTHS (zero-shot
prompts are at most ZERO_SHOT_INPUT_BYTES), and every trivial baseline is beatable.
`register_all()` registers everything; importing `t5x_lite.data` calls it.
"""

from __future__ import annotations

import functools

from t5x_lite.data import builtin_generators as gen
from t5x_lite.data import mixtures, registry, tasks
from t5x_lite.data.sources import GeneratedSource
from t5x_lite.data.templates import Template

# Bytes (UTF-8) of the longest prompts and targets; tests check every example against them.
ZERO_SHOT_INPUT_BYTES = 120
FEATURE_LENGTHS = {'inputs': 256, 'targets': 32}   # few-shot prompts (1 exemplar) included

TRAIN_SIZES = {'train': 3000, 'validation': 200, 'test': 200}
HELDOUT_SIZES = {'train': 1000, 'validation': 200, 'test': 200}
MAX_EXAMPLES = 3000   # cap of examples_proportional in the `builtin` mixture
# FLAN's mix for classification: mostly zero-shot, some with the OPTIONS block left out.
_CLASSIFICATION_MIX = {'zs_opt': 0.5, 'zs_noopt': 0.2, 'fs_opt': 0.3}


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
  return [
      tasks.Task(
          'builtin_sentiment', _source(gen.sentiment, 1), _SENTIMENT, ['accuracy'],
          heldout_templates=_SENTIMENT_HELDOUT, options=list(gen.SENTIMENT_LABELS),
          template_mix=_CLASSIFICATION_MIX, num_fewshot=1, baseline='majority',
          description='Is a one-sentence review (sometimes negated) positive or negative?'),
      tasks.Task(
          'builtin_compare', _source(gen.compare, 2), _COMPARE, ['accuracy'],
          heldout_templates=_COMPARE_HELDOUT, options=list(gen.COMPARE_LABELS),
          template_mix=_CLASSIFICATION_MIX, num_fewshot=1, baseline='majority',
          description='Is the first of two numbers below 100 larger, smaller or equal?'),
      tasks.Task(
          'builtin_qa', _source(gen.qa, 3), _QA, ['exact_match', 'f1'],
          heldout_templates=_QA_HELDOUT, baseline='majority',
          description='Answer a who/where/what question with a span of a 2-3 fact passage.'),
      tasks.Task(
          'builtin_arithmetic', _source(gen.arithmetic, 4), _ARITHMETIC, ['accuracy'],
          heldout_templates=_ARITHMETIC_HELDOUT, baseline='majority',
          description='Add or subtract two numbers below 20.'),
      tasks.Task(
          'builtin_sort', _source(gen.sort_numbers, 5), _SORT, ['exact_match'],
          heldout_templates=_SORT_HELDOUT, baseline='copy:numbers',
          description='Sort 3-4 numbers below 20 in ascending order.'),
      tasks.Task(
          'builtin_word_count', _source(gen.word_count, 6), _WORD_COUNT, ['accuracy'],
          heldout_templates=_WORD_COUNT_HELDOUT, baseline='majority',
          description='Count the words (2-9) of a short text.'),
      # accuracy, not exact_match: exact_match ignores case, so copying would score 100.
      tasks.Task(
          'builtin_uppercase', _source(gen.uppercase, 7), _UPPERCASE, ['accuracy'],
          heldout_templates=_UPPERCASE_HELDOUT, baseline='copy:text',
          description='Rewrite 2-4 lower-case words in capital letters.'),
      tasks.Task(
          'builtin_passive', _source(gen.passive, 8), _PASSIVE, ['bleu', 'rougeL'],
          heldout_templates=_PASSIVE_HELDOUT, baseline='copy:sentence',
          description='Rewrite a simple active sentence (past or present) in the passive.'),
      tasks.Task(
          'builtin_number_words', _source(gen.number_words, 9), _TO_WORDS, ['exact_match'],
          heldout_templates=_TO_WORDS_HELDOUT, baseline='majority',
          description='Write a number 0-99 in English, French, German, Spanish or Chinese words.'),
      tasks.Task(
          'builtin_words_to_number',
          _source(functools.partial(gen.number_words, langs=('en', 'fr', 'de')), 10),
          _TO_DIGITS, ['accuracy'], heldout_templates=_TO_DIGITS_HELDOUT, baseline='majority',
          description='Read English, French or German number words (0-99) as digits.'),
  ]


def _heldout_tasks() -> list[tasks.Task]:
  return [
      tasks.Task(
          'builtin_sort_descending',
          _source(functools.partial(gen.sort_numbers, descending=True), 101, HELDOUT_SIZES),
          _SORT_DESC, ['exact_match'], heldout_templates=_SORT_DESC_HELDOUT,
          baseline='copy:numbers',
          description='Held out: sort 3-4 numbers in descending order (training sorts '
                      'ascending).'),
      tasks.Task(
          'builtin_words_to_number_es_zh',
          _source(functools.partial(gen.number_words, langs=('es', 'zh')), 102, HELDOUT_SIZES),
          _TO_DIGITS, ['accuracy'], heldout_templates=_TO_DIGITS_HELDOUT, baseline='majority',
          description='Held out: read Spanish or Chinese number words as digits (training '
                      'only writes them).'),
      tasks.Task(
          'builtin_compare_words',
          _source(functools.partial(gen.compare, lang='en'), 103, HELDOUT_SIZES),
          _COMPARE, ['accuracy'], heldout_templates=_COMPARE_HELDOUT,
          options=list(gen.COMPARE_LABELS), template_mix=_CLASSIFICATION_MIX, num_fewshot=1,
          baseline='majority',
          description='Held out: compare two numbers written as English words.'),
  ]


TRAINING_TASKS = tuple(t.name for t in _training_tasks())
HELDOUT_TASKS = tuple(t.name for t in _heldout_tasks())


def builtin_task_names(heldout: bool = False) -> tuple[str, ...]:
  """Names of the tasks of `builtin` (or, with heldout=True, of `builtin_heldout`)."""
  return HELDOUT_TASKS if heldout else TRAINING_TASKS


def register_all() -> None:
  """(Re-)register every built-in task and both mixtures; idempotent."""
  training = _training_tasks()
  for task in training + _heldout_tasks():
    registry.register(task, overwrite=True)
  registry.register(mixtures.Mixture(
      'builtin', [t.name for t in training],
      default_rate=mixtures.examples_proportional(maximum=MAX_EXAMPLES),
      description='The built-in generated training tasks, examples-proportional.'),
      overwrite=True)
  registry.register(mixtures.Mixture(
      'builtin_heldout', list(HELDOUT_TASKS),
      description='Built-in tasks held out of `builtin`, for zero-shot evaluation.'),
      overwrite=True)

