"""Text -> normalised units -> hashed n-grams, the contamination audit's arithmetic.

Normalisation: Unicode NFC, case folded; a unit is a word (letters and digits with their
combining marks) or a single letter of a script written without spaces (CJK ideographs, kana,
Thai, Lao, Khmer, Myanmar); punctuation and whitespace separate units. N-grams are 64-bit
polynomial hashes over splitmix-mixed unit ids, computed with numpy a batch of texts at a
time, never across two texts.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

import numpy as np

NO_SPACES = ('\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf'
              '\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff')
NO_SPACE_GAP = re.compile(f'(?<=[{NO_SPACES}]) (?=[{NO_SPACES}])')   # shown as written
_MUL = np.uint64(0x9E3779B97F4A7C15)
_BASE = np.uint64(0x100000001B3)


@functools.lru_cache(maxsize=None)
def _units_pattern() -> re.Pattern:
  """Words: letters and digits with their combining marks (Devanagari's vowel signs,
  Arabic's harakat: `\\w` alone would cut a word at each); in the scripts without spaces,
  each letter or mark a unit; everything else (punctuation, the scripts' own stops) a
  separator. Built once: the marks (Unicode categories Mn, Mc, Me) as ranges."""
  marks, start = [], None
  for code in range(sys.maxunicode + 2):
    is_mark = code <= sys.maxunicode and unicodedata.category(chr(code))[0] == 'M'
    if is_mark and start is None:
      start = code
    elif not is_mark and start is not None:
      marks.append(f'{re.escape(chr(start))}-{re.escape(chr(code - 1))}')
      start = None
  mark = ''.join(marks)
  return re.compile(f'(?:(?=[^\\W_])|(?=[{mark}]))[{NO_SPACES}]'
                    f'|(?:(?![{NO_SPACES}])(?:[^\\W_]|[{mark}]))+')


_ASCII_WORDS = re.compile('[a-z0-9]+')


def units(text: str) -> list[str]:
  """The normalised units of `text` (see the module docstring); ASCII text (most of an
  English corpus) takes a simpler pattern with the same result."""
  if text.isascii():
    return _ASCII_WORDS.findall(text.lower())
  return _units_pattern().findall(unicodedata.normalize('NFC', text).casefold())


def _mix(ids: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: well-spread 64-bit values from small ids."""
  z = ids.astype(np.uint64) * _MUL
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


class Encoder:
  """Units -> ids (one table for the whole audit) -> hashed n-grams, a batch at a time."""

  def __init__(self, n: int):
    self.n, self.table = n, {}

  def ids(self, words: list[str]) -> list[int]:
    table = self.table
    return [table.setdefault(w, len(table)) for w in words]

  def ngrams(self, segments: list[list[int]], owners: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, owner of each) of every n-gram inside one segment (never across two)."""
    lengths = np.fromiter((len(s) for s in segments), np.int64, len(segments))
    keep = lengths >= self.n
    if not keep.any():
      return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    segments = [s for s, k in zip(segments, keep) if k]
    lengths, owners = lengths[keep], np.asarray(owners, np.int64)[keep]
    flat = _mix(np.fromiter((i for s in segments for i in s), np.int64, int(lengths.sum())))
    count = len(flat) - self.n + 1
    h = np.zeros(count, np.uint64)
    for k in range(self.n):
      h = h * _BASE + flat[k:k + count]
    ends = np.cumsum(lengths)
    valid = np.arange(count) + self.n <= np.repeat(ends, lengths)[:count]
    return h[valid], np.repeat(owners, lengths)[:count][valid]
