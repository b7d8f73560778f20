"""The vocabulary interface (`Vocabulary`), its errors and T5's ids: what every vocabulary
(vocab.py: SentencePiece and bytes; hf_tokenizer.py: Hugging Face tokenizer.json) builds on.
"""

from __future__ import annotations

import abc
import re
from typing import Iterable, Sequence

import numpy as np

from t5x_lite import errors

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_PAD_MULTIPLE = 128
# Sentinels written as text, like Hugging Face's tokenizers read them ('<extra_id_007>' is text).
_SENTINEL_RE = re.compile(r'<extra_id_(0|[1-9][0-9]*)>')


class VocabularyError(errors.UserError, ValueError):
  """A vocabulary file or setting that cannot be used (unreadable, T5's ids not where T5
  needs them)."""


class VocabularyNotFound(errors.UserError, FileNotFoundError):
  """A SentencePiece model path that names no file."""


def prompt_ids(prompt_length: int) -> np.ndarray:
  """The ids that mark the soft prompt's positions: -1, -2, ..., -n (the encoder embeds id
  -(k+1) as prompt_embedding[k]; 0 stays padding, so every nonzero id is a real position).
  Prompt tuning's inputs start with them (pipeline.tokenize, Objective.make_chunk)."""
  return -np.arange(1, prompt_length + 1, dtype=np.int32)


def _round_up(n: int, multiple: int = _PAD_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


class Vocabulary(abc.ABC):
  """Text <-> ids. Subclasses implement `_encode`, `_decode`, `extra_id`, `spec`."""

  pad_id = PAD_ID
  eos_id = EOS_ID
  unk_id = UNK_ID
  bos_id: int | None = None    # T5's vocabularies have none
  add_bos = False              # whether the tokenizer's template starts a text with BOS

  pad_starts_sequences = True   # seqio: with no BOS a decoder reads PAD first (T5's vocabularies)

  @property
  def decoder_start_id(self) -> int | None:
    """The id a decoder reads first in every sequence (feature_converters.py): BOS where the
    tokenizer's template prepends one, else PAD (seqio's bos_id=0, T5's decoder start) where
    `pad_starts_sequences`, else None: the sequence starts with its own first token, which
    is read and never predicted (Hugging Face's causal LMs without BOS, e.g. Qwen)."""
    if self.add_bos and self.bos_id is not None:
      return self.bos_id
    return self.pad_id if self.pad_starts_sequences else None

  def __init__(self, extra_ids: int):
    if extra_ids < 0:
      raise VocabularyError(f'extra_ids must be >= 0, got {extra_ids}')
    self.extra_ids = extra_ids

  @property
  @abc.abstractmethod
  def base_vocab_size(self) -> int:
    """Ids of real tokens (special ids included), below the sentinels."""

  @property
  @abc.abstractmethod
  def spec(self) -> str:
    """What `get_vocabulary` rebuilds this vocabulary from (checkpoint metadata)."""

  @abc.abstractmethod
  def extra_id(self, i: int) -> int:
    """The id of sentinel `<extra_id_{i}>`."""

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of text that holds no sentinel."""

  @abc.abstractmethod
  def _decode(self, ids: list[int]) -> str:
    """Text of valid ids: no PAD, no EOS, none at or above `base_vocab_size + extra_ids`."""

  @property
  def vocab_size(self) -> int:
    """The model's embedding size: all ids, padded to a multiple of 128 for fast matmuls."""
    return _round_up(self.base_vocab_size + self.extra_ids)

  def _split_sentinels(self, text: str) -> list[str | int]:
    """Text chunks and the sentinel ids written in `text` as `<extra_id_N>`."""
    parts: list[str | int] = []
    start = 0
    for m in _SENTINEL_RE.finditer(text):
      if int(m.group(1)) < self.extra_ids:
        parts += [text[start:m.start()], self.extra_id(int(m.group(1)))]
        start = m.end()
    parts.append(text[start:])
    return parts

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no EOS appended. `<extra_id_N>` in the text becomes sentinel N (as in HF)."""
    if '<extra_id_' not in text:
      return self._encode(text)
    ids: list[int] = []
    for part in self._split_sentinels(text):
      if isinstance(part, int):
        ids.append(part)
      else:
        ids += self._encode(part)
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` over many texts; subclasses override it with a faster path."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of ids up to the first EOS; PAD and ids outside the vocabulary are skipped."""
    arr = np.asarray(ids if hasattr(ids, '__len__') else list(ids), dtype=np.int64)
    if arr.ndim != 1:
      raise ValueError(f'decode takes one sequence of ids, got shape {arr.shape}')  # internal
    eos = np.flatnonzero(arr == self.eos_id)
    if eos.size:
      arr = arr[:eos[0]]
    arr = arr[(arr != self.pad_id) & (arr >= 0) & (arr < self.base_vocab_size + self.extra_ids)]
    return self._decode(arr.tolist())

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Vocabulary):
      return NotImplemented
    return type(self) is type(other) and self.spec == other.spec

  def __hash__(self) -> int:
    return hash((type(self).__name__, self.spec))

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.spec!r})'
