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

import functools
import os
import re
from typing import Sequence

import numpy as np
import sentencepiece as spm

from t5x_lite.data import hf_sentencepiece, hf_tokenizer
from t5x_lite.data.vocab_base import (EOS_ID, PAD_ID, UNK_ID, Vocabulary, VocabularyError,
                                      VocabularyNotFound, _PAD_MULTIPLE, _SENTINEL_RE,
                                      _round_up, prompt_ids)

_SPEC_EXTRA_IDS_RE = re.compile(r'^(.*):extra_ids=([0-9]+)$')


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
  (hf_tokenizer.HfTokenizerVocabulary), or a model directory with a `tokenizer.model` and no
  tokenizer.json (hf_sentencepiece.HfSentencePieceVocabulary: Llama 1/2, Gemma), both with
  the model's own BOS/EOS/PAD ids.

  'byte' and a SentencePiece path may end in ':extra_ids=N' for a number of sentinels other
  than the default. Cached: tasks that share a vocabulary share one instance.
  """
  if hf_tokenizer.is_hf_tokenizer(spec):
    return hf_tokenizer.HfTokenizerVocabulary(spec)
  if hf_sentencepiece.is_hf_sentencepiece(spec):
    return hf_sentencepiece.HfSentencePieceVocabulary(spec)
  m = _SPEC_EXTRA_IDS_RE.match(spec)
  name, kwargs = (m.group(1), {'extra_ids': int(m.group(2))}) if m else (spec, {})
  if name == 'byte':
    return ByteVocabulary(**kwargs)
  return SentencePieceVocabulary(name, **kwargs)
