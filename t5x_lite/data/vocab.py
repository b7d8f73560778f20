"""Vocabularies: T5's SentencePiece model with sentinels, and ByT5's bytes.

Both follow T5's conventions (PAD=0, EOS=1, UNK=2) and give the same ids as the Hugging Face
tokenizers of the released checkpoints (`T5Tokenizer`, `ByT5Tokenizer`) without their EOS:
the pipeline appends EOS itself, after truncation. `vocab_size` is the embedding size of
the model, padded to a multiple of 128 like the released checkpoints (32000 pieces + 100
sentinels -> 32128), so ids above the real tokens exist and `decode` skips them.

A vocabulary is named by its `spec` ('byte', or the path of a SentencePiece model), which
checkpoint metadata stores and `get_vocabulary(spec)` turns back into the same vocabulary.
"""

from __future__ import annotations

import abc
import functools
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from t5x_lite import errors

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_PAD_MULTIPLE = 128
# Sentinels written as text, like Hugging Face's tokenizers read them ('<extra_id_007>' is text).
_SENTINEL_RE = re.compile(r'<extra_id_(0|[1-9][0-9]*)>')
_SPEC_EXTRA_IDS_RE = re.compile(r'^(.*):extra_ids=([0-9]+)$')


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

  @property
  def decoder_start_id(self) -> int:
    """The id a decoder reads first in every sequence (feature_converters.py): BOS where the
    tokenizer's template prepends one, else PAD (seqio's bos_id=0, T5's decoder start)."""
    return self.bos_id if self.add_bos and self.bos_id is not None else self.pad_id

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


class SentencePieceVocabulary(Vocabulary):
  """A SentencePiece model plus `extra_ids` sentinels above its pieces, counting down as in T5.

  `<extra_id_0>` is the highest (32099 for T5's 32000 pieces). The model is kept as its
  serialized proto, so pickling (grain workers) does not need the file to be readable there.
  """

  def __init__(self, model_file: str | os.PathLike, extra_ids: int = 100):
    super().__init__(extra_ids)
    self.model_file = os.path.abspath(os.fspath(model_file))
    if os.path.isdir(self.model_file):
      raise VocabularyNotFound(
          f'SentencePiece model {self.model_file} is a directory; pass the model file in it '
          '(e.g. spiece.model)')
    try:
      with open(self.model_file, 'rb') as f:
        proto = f.read()
    except FileNotFoundError:
      raise VocabularyNotFound(f'SentencePiece model not found: {self.model_file}') from None
    except OSError as e:
      raise VocabularyError(f'cannot read SentencePiece model {self.model_file}: {e}') from e
    self._load(proto)

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos.
      raise VocabularyError(f'{self.model_file} is not a valid SentencePiece model: {e}') from e
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if got != (PAD_ID, EOS_ID, UNK_ID):
      raise VocabularyError(
          f'SentencePiece model {self.model_file} has (pad, eos, unk) ids {got}; T5 needs '
          f'{(PAD_ID, EOS_ID, UNK_ID)} (train it with pad_id=0 eos_id=1 unk_id=2 bos_id=-1)')
    self._num_pieces = self._sp.get_piece_size()

  def __getstate__(self) -> dict:
    return {'model_file': self.model_file, 'extra_ids': self.extra_ids, 'proto': self._proto}

  def __setstate__(self, state: dict) -> None:
    self.model_file, self.extra_ids = state['model_file'], state['extra_ids']
    self._load(state['proto'])

  @property
  def sp_model(self) -> bytes:
    """The serialized model, e.g. to write `spiece.model` next to an exported checkpoint."""
    return self._proto

  @property
  def base_vocab_size(self) -> int:
    return self._num_pieces

  @property
  def spec(self) -> str:
    return self.model_file if self.extra_ids == 100 else (
        f'{self.model_file}:extra_ids={self.extra_ids}')

  def extra_id(self, i: int) -> int:
    if not 0 <= i < self.extra_ids:
      raise IndexError(f'extra_id({i}) out of range: this vocabulary has '  # internal
                       f'{self.extra_ids}')
    return self._num_pieces + self.extra_ids - 1 - i

  def _encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """sentencepiece's list encode (C++ loop) for texts without sentinels."""
    texts = list(texts)
    out = self._sp.encode(texts)
    for k, t in enumerate(texts):
      if '<extra_id_' in t:
        out[k] = self.encode(t)
    return out

  def _decode(self, ids: list[int]) -> str:
    top = self._num_pieces
    if all(i < top for i in ids):
      return self._sp.decode(ids)
    # Decode the runs between sentinels; a run that starts a word gets back the space
    # that SentencePiece strips from the start of a text (as HF's T5Tokenizer decodes).
    out, run = [], []
    def flush():
      if run:
        text = self._sp.decode(run)
        if out and self._sp.id_to_piece(run[0]).startswith('\u2581'):
          text = ' ' + text
        out.append(text)
        run.clear()
    for i in ids:
      if i < top:
        run.append(i)
      else:
        flush()
        out.append(f'<extra_id_{top + self.extra_ids - 1 - i}>')
    flush()
    return ''.join(out)


class ByteVocabulary(Vocabulary):
  """ByT5's vocabulary: UTF-8 byte b is id b + 3; no file needed.

  Sentinels follow what Hugging Face's `ByT5Tokenizer` does (not what its docstring says):
  `<extra_id_i>` is 259 + i, counting up, unlike the SentencePiece vocabulary. 125 of them
  make 384 ids, the released checkpoints' embedding size. (ByT5's own pretraining reused
  the top byte ids as sentinels instead; only new span-corruption pretraining cares.)
  """

  _OFFSET = 3
  _NUM_BYTES = 256

  def __init__(self, extra_ids: int = 125):
    super().__init__(extra_ids)

  @property
  def base_vocab_size(self) -> int:
    return self._NUM_BYTES + self._OFFSET

  @property
  def spec(self) -> str:
    return 'byte' if self.extra_ids == 125 else f'byte:extra_ids={self.extra_ids}'

  def extra_id(self, i: int) -> int:
    if not 0 <= i < self.extra_ids:
      raise IndexError(f'extra_id({i}) out of range: this vocabulary has '  # internal
                       f'{self.extra_ids}')
    return self.base_vocab_size + i

  def _encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int64)
            + self._OFFSET).tolist()

  def _decode(self, ids: list[int]) -> str:
    # Bytes are joined before decoding, so a character split by a sentinel is dropped
    # whole ('ignore'), as ByT5Tokenizer does. UNK never comes from bytes: skipped.
    out = bytearray()
    for i in ids:
      if self._OFFSET <= i < self.base_vocab_size:
        out.append(i - self._OFFSET)
      elif i >= self.base_vocab_size:
        out += f'<extra_id_{i - self.base_vocab_size}>'.encode()
    return out.decode('utf-8', errors='ignore')


@functools.lru_cache(maxsize=None)
def get_vocabulary(spec: str) -> Vocabulary:
  """The vocabulary named by `spec`: 'byte', a SentencePiece model path (`Vocabulary.spec`),
  or a Hugging Face tokenizer: a `tokenizer.json` or a model directory holding one
  (hf_tokenizer.HfTokenizerVocabulary, with the model's own BOS/EOS/PAD ids).

  'byte' and a SentencePiece path may end in ':extra_ids=N' for a number of sentinels other
  than the default. Cached: tasks that share a vocabulary share one instance.
  """
  from t5x_lite.data import hf_tokenizer  # pylint: disable=import-outside-toplevel
  if hf_tokenizer.is_hf_tokenizer(spec):
    return hf_tokenizer.HfTokenizerVocabulary(spec)
  m = _SPEC_EXTRA_IDS_RE.match(spec)
  name, kwargs = (m.group(1), {'extra_ids': int(m.group(2))}) if m else (spec, {})
  if name == 'byte':
    return ByteVocabulary(**kwargs)
  return SentencePieceVocabulary(name, **kwargs)
