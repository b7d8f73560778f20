"""Built-in raw-text tasks for span corruption: `builtin_text_<lang>` in the five languages of
the number-word tasks, and the mixture `builtin_denoise` of them (not part of `builtin`,
`builtin_heldout` or the cross-lingual mixtures).

Short generated texts (MIN_TEXT_BYTES..MAX_TEXT_BYTES UTF-8 bytes: a few sentences about
people, cities, numbers written as words, weather), deterministic from a seed like every
built-in task, so a CPU run can mix denoising with the instruction tasks. Sized for the
built-in FEATURE_LENGTHS (256/32) on the byte vocabulary: a text is one chunk (the 256-input
chunk is 284 tokens), and span corruption of at most 151 tokens (150 bytes; SentencePiece
with byte fallback: at most one more, the dummy prefix) makes at most 23 noise tokens in 8
spans, so targets of at most 32 tokens with EOS: none is cut.

So these tasks mask each text alone (`merge_examples_to_reduce_padding=False`), unlike T5's
span_corruption and this library's default, which merge 128 texts into full chunks: a full
284-token chunk needs targets of 58 at inputs 256, more than the built-in 32 that the CPU
runs mixing them with the instruction tasks use. For T5's merged chunks of these texts, give
a task `Objective('span_corruption')` (default merging) and targets of at least 58 at 256.
"""

from __future__ import annotations

import functools

import numpy as np

from t5x_lite.data import builtin_generators as gen
from t5x_lite.data import mixtures, registry, tasks
from t5x_lite.data.objective_tasks import Objective
from t5x_lite.data.sources import GeneratedSource

MIN_TEXT_BYTES, MAX_TEXT_BYTES = 100, 150
TEXT_LANGUAGES = tuple(gen.LANGUAGES)            # en, fr, de, es, zh
SIZES = {'train': 3000, 'validation': 200, 'test': 200}
# +1: SentencePiece's dummy-prefix piece; the byte vocabulary needs exactly the bytes.
# Per document: each text alone fits the built-in 256/32 (merged chunks need 58 targets).
OBJECTIVE = Objective('span_corruption', max_text_tokens=MAX_TEXT_BYTES + 1,
                      merge_examples_to_reduce_padding=False)

_ZH_NAMES = ('小明', '小红', '王芳', '李雷', '张伟', '刘洋', '陈静', '赵磊')
_ZH_CITIES = ('北京', '上海', '广州', '成都', '西安', '南京', '杭州', '武汉')
# {name}, {city}, {n} (a number 2..99 in words, never ending in one: 'un'/'uno' agree).
_SENTENCES = {
    'en': ('{name} lives in {city}.', 'It is {n} degrees in {city} today.',
           '{name} has {n} friends.', 'The cat sleeps under the table.',
           '{name} reads a book by the river.', 'It has rained in {city} for {n} days.',
           'We bought {n} apples at the market.', '{name} takes the train to {city}.',
           'The old bridge in {city} is {n} metres long.'),
    'fr': ('{name} habite à {city}.', "Il fait {n} degrés à {city} aujourd'hui.",
           '{name} a {n} amis.', 'Le chat dort sous la table.',
           '{name} lit un livre près de la rivière.', 'Il pleut à {city} depuis {n} jours.',
           'Nous avons acheté {n} pommes.', '{name} prend le train pour {city}.',
           'Le vieux pont de {city} mesure {n} mètres.'),
    'de': ('{name} wohnt in {city}.', 'Heute hat es {n} Grad in {city}.',
           '{name} hat {n} Freunde.', 'Die Katze schläft unter dem Tisch.',
           '{name} liest ein Buch am Fluss.', 'In {city} regnet es seit {n} Tagen.',
           'Wir haben {n} Äpfel gekauft.', '{name} fährt mit dem Zug nach {city}.',
           'Die alte Brücke in {city} ist {n} Meter lang.'),
    'es': ('{name} vive en {city}.', 'Hoy hace {n} grados en {city}.',
           '{name} tiene {n} amigos.', 'El gato duerme debajo de la mesa.',
           '{name} lee un libro junto al río.', 'En {city} llueve desde hace {n} días.',
           'Compramos {n} manzanas en el mercado.', '{name} toma el tren a {city}.',
           'El puente viejo de {city} mide {n} metros.'),
    'zh': ('{name}住在{city}。', '今天{city}的气温是{n}度。', '{name}有{n}个朋友。',
           '猫在桌子下面睡觉。', '{name}在河边看书。', '{city}已经下了{n}天雨。',
           '我们在市场买了{n}个苹果。', '{name}坐火车去{city}。', '{city}的老桥长{n}米。'),
}
_NUMBERS = tuple(n for n in range(2, 100) if n % 10 != 1)


def _sentence(rng: np.random.Generator, lang: str) -> str:
  names, cities = (_ZH_NAMES, _ZH_CITIES) if lang == 'zh' else (gen._NAMES, gen._CITIES)  # pylint: disable=protected-access
  return gen._pick(rng, _SENTENCES[lang]).format(  # pylint: disable=protected-access
      name=gen._pick(rng, names), city=gen._pick(rng, cities),  # pylint: disable=protected-access
      n=gen.number_to_words(int(gen._pick(rng, _NUMBERS)), lang))  # pylint: disable=protected-access


def _text_example(rng: np.random.Generator, lang: str):
  """Sentences added until the text has MIN_TEXT_BYTES; one that would pass MAX_TEXT_BYTES
  is redrawn (short ones always fit)."""
  sep, parts = ('' if lang == 'zh' else ' '), []
  for _ in range(1000):
    sentence = _sentence(rng, lang)
    candidate = sep.join(parts + [sentence])
    if len(candidate.encode('utf-8')) <= MAX_TEXT_BYTES:
      parts.append(sentence)
      if len(candidate.encode('utf-8')) >= MIN_TEXT_BYTES:
        return f'{candidate}:{lang}', {'text': candidate, 'lang': lang}
  raise RuntimeError(f'no {lang} text of {MIN_TEXT_BYTES}-{MAX_TEXT_BYTES} bytes')  # internal


def text(rng: np.random.Generator, split: str, lang: str) -> dict:
  """A short multi-sentence text in `lang`: {'text', 'lang'}."""
  return gen._draw(rng, split, _text_example, lang)  # pylint: disable=protected-access


def text_tasks() -> list[tasks.Task]:
  return [tasks.Task(
      f'builtin_text_{lang}', GeneratedSource(functools.partial(text, lang=lang), SIZES,
                                              seed=300 + i),
      objective=OBJECTIVE, language=lang,
      description=f'Span corruption (T5) of short generated {gen.LANGUAGES[lang]} texts.')
          for i, lang in enumerate(TEXT_LANGUAGES)]


TEXT_TASKS = tuple(t.name for t in text_tasks())


def register_all() -> None:
  """(Re-)register the raw-text tasks and `builtin_denoise` (equal rates); idempotent."""
  for task in text_tasks():
    registry.register(task, overwrite=True)
  registry.register(mixtures.Mixture(
      'builtin_denoise', list(TEXT_TASKS),
      description='Span corruption of short generated texts in '
                  f'{"/".join(TEXT_LANGUAGES)}, equal rates; not decode-evaluated.'),
      overwrite=True)
