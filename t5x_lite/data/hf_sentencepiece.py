"""A Hugging Face model directory that ships a SentencePiece `tokenizer.model` and no
`tokenizer.json` (Llama 1/2, Mistral, Gemma) as a `Vocabulary` with the model's own BOS / EOS /
PAD / UNK ids.

`HfSentencePieceVocabulary(path)`: `path` is the model directory or its `tokenizer.model`; its
`spec` is the directory, which `vocab.get_vocabulary` maps back here. The special tokens are
read as for `tokenizer.json` (hf_tokenizer.special_ids: tokenizer_config.json,
special_tokens_map.json, config.json), then taken from the SentencePiece model itself; no PAD
pads with EOS. `add_bos` is tokenizer_config.json's `add_bos_token` (default True, as
`LlamaTokenizer` and `GemmaTokenizer`).

`encode(text)` gives the ids of transformers 4's sentencepiece-based ("slow") `LlamaTokenizer`
or `GemmaTokenizer` called with `add_special_tokens=False`; the class is tokenizer_config.json's
`tokenizer_class` (else config.json's `model_type`): Gemma* is Gemma, anything else Llama. The
text is split at the special / added tokens written in it (each becomes its id), and each
piece in between is encoded by SentencePiece:

- Gemma: `sp.encode(piece)` (Gemma's model adds no dummy prefix);
- Llama with `legacy` true (tokenizer_config.json's `legacy`; absent, True: transformers 4's
  default): `sp.encode(piece)`, so every piece, also one after a special token, gets the
  model's dummy-prefix space;
- Llama with `legacy` false: only the text's start gets a '▁' (if `add_prefix_space`, default
  True), the model's dummy prefix is turned off, a piece that starts with a space keeps it
  (the `<unk>` + piece trick).

Without special tokens in the text all three are `sp.encode(text)`, the ids the model was
trained on. (transformers 5 has no sentencepiece-based Llama tokenizer: its `LlamaTokenizer`
converts tokenizer.model to a `tokenizers` BPE whose Metaspace drops the first space of a text
that starts with one (' x' -> ['▁x'] where sentencepiece gives ['▁', '▁x']) and defaults
to `legacy=False`; this class keeps sentencepiece's ids. Gemma's are the same in both.)

`decode(ids)` = the same tokenizer's `decode(ids, skip_special_tokens=True)` of the ids before
the first EOS: special ids (UNK included) are dropped, non-special added tokens are written as
they are (Llama: joined to the rest by spaces), SentencePiece decodes the rest (Llama: without
the first piece's '▁', then transformers' `clean_up_tokenization` where tokenizer_config.json
asks for it).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import sentencepiece as spm

from t5x_lite.data import hf_tokenizer
from t5x_lite.data.vocab_base import Vocabulary, VocabularyError, VocabularyNotFound

_SPIECE_UNDERLINE = '\u2581'
_MODEL_FILE = 'tokenizer.model'


def resolve(path: str | os.PathLike) -> tuple[str, str]:
  """(the model directory, its tokenizer.model) named by a directory or a tokenizer.model."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    directory, file = path, os.path.join(path, _MODEL_FILE)
  else:
    directory, file = os.path.dirname(path), path
  if not os.path.isfile(file):
    raise VocabularyNotFound(f'no SentencePiece tokenizer at {file} (give a model directory '
                             'holding tokenizer.model, or the tokenizer.model file)')
  return directory, file


def is_hf_sentencepiece(spec: str) -> bool:
  """Whether `spec` is a directory holding tokenizer.model and no tokenizer.json."""
  return (os.path.isdir(spec) and os.path.isfile(os.path.join(spec, _MODEL_FILE))
          and not os.path.isfile(os.path.join(spec, 'tokenizer.json')))


def _added_tokens(tok_config: dict) -> dict[int, dict]:
  """tokenizer_config.json's `added_tokens_decoder`: id -> {content, special, lstrip, rstrip}."""
  out = {}
  decoder = tok_config.get('added_tokens_decoder')
  for key, token in (decoder.items() if isinstance(decoder, dict) else ()):
    if isinstance(token, str):
      token = {'content': token}
    if isinstance(token, dict) and isinstance(token.get('content'), str) and (
        token['content'] and str(key).isdigit()):
      out[int(key)] = token
  return out


def _additional_special(configs: list[dict]) -> list[str]:
  """`additional_special_tokens` (transformers 4) and `extra_special_tokens` (a list in
  transformers 5, a name -> token dict in 4) of tokenizer_config / special_tokens_map."""
  found = []
  for source in configs[:2]:
    for key in ('additional_special_tokens', 'extra_special_tokens'):
      tokens = source.get(key) or ()
      for token in (tokens.values() if isinstance(tokens, dict) else tokens):
        content = hf_tokenizer._content(token)  # pylint: disable=protected-access
        if content:
          found.append(content)
  return found


class HfSentencePieceVocabulary(Vocabulary):
  """A `tokenizer.model` with the model's special ids and transformers' rules (module
  docstring)."""

  pad_starts_sequences = False   # no BOS: a sequence starts with its own first token, as in HF

  def __init__(self, path: str | os.PathLike):
    super().__init__(extra_ids=0)
    directory, file = resolve(path)
    self._dir = directory
    try:
      with open(file, 'rb') as f:
        proto = f.read()
    except OSError as e:
      raise VocabularyError(f'cannot read {file}: {e}') from e
    self._setup(proto, hf_tokenizer.read_configs(directory), file)

  def _setup(self, proto: bytes, configs: list[dict], where: str) -> None:
    self._state = (proto, configs, where)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on bad protos
      raise VocabularyError(f'{where} is not a SentencePiece model: '
                            f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from e
    tok_config, _, model_config = configs
    self._model_config = model_config
    num_pieces = self._sp.get_piece_size()
    kind = tok_config.get('tokenizer_class') or model_config.get('model_type') or ''
    self._gemma = isinstance(kind, str) and kind.lower().startswith('gemma')
    legacy = tok_config.get('legacy')
    # LlamaTokenizer's `legacy` (module docstring); Gemma's rule is the legacy one
    self.legacy = self._gemma or (legacy if isinstance(legacy, bool) else True)
    prefix_space = tok_config.get('add_prefix_space')
    self._prefix_space = not self._gemma and (
        prefix_space if isinstance(prefix_space, bool) else True)

    added = _added_tokens(tok_config)
    self._added_ids = {t['content']: i for i, t in added.items()}
    self._piece_of = {i: t['content'] for i, t in added.items()}

    def token_to_id(content: str) -> int | None:
      if content in self._added_ids:
        return self._added_ids[content]
      i = self._sp.piece_to_id(content)
      return i if self._sp.id_to_piece(i) == content else None

    ids = hf_tokenizer.special_ids(configs, token_to_id, where)
    own = {'bos': self._sp.bos_id(), 'eos': self._sp.eos_id(), 'pad': self._sp.pad_id(),
           'unk': self._sp.unk_id()}
    for name, value in ids.items():
      if value is None and own[name] >= 0:
        ids[name] = own[name]
    if ids['eos'] is None:
      raise VocabularyError(f'{where}: no EOS token in tokenizer_config.json, '
                            'special_tokens_map.json, config.json or the SentencePiece model; '
                            'a causal model needs one')
    self.eos_id, self.bos_id, self.unk_id = ids['eos'], ids['bos'], ids['unk']
    self.pad_id = ids['pad'] if ids['pad'] is not None else ids['eos']
    if isinstance(tok_config.get('add_bos_token'), bool):
      self.add_bos = tok_config['add_bos_token'] and self.bos_id is not None
    else:
      self.add_bos = self.bos_id is not None
    self._base = max([num_pieces] + [i + 1 for i in self._piece_of])

    # The tokens a text is split at (transformers' no-split tokens) and those decode drops.
    # (A config.json id past the tokenizer, an embedding row of its own, has no text.)
    own_ids = {i for i in ids.values() if i is not None}
    specials = {self._piece(i) for i in own_ids if i in self._piece_of or 0 <= i < num_pieces}
    specials |= {c for c in _additional_special(configs) if token_to_id(c) is not None}
    specials |= {t['content'] for t in added.values() if t.get('special') is True}
    self._split_ids = {c: token_to_id(c) for c in specials | set(self._added_ids)}
    self._special_ids = own_ids | {self._split_ids[c] for c in specials}
    self._strip = {c: (bool(t.get('lstrip')), bool(t.get('rstrip')))
                   for t in added.values() for c in [t['content']]}
    self._split_re = re.compile('(' + '|'.join(
        re.escape(c) for c in sorted(self._split_ids, key=len, reverse=True)) + ')') if (
            self._split_ids) else None
    self._cleanup = not self._gemma and bool(tok_config.get('clean_up_tokenization_spaces'))

    # Llama's non-legacy rule: the model without its dummy prefix, and the pieces of '<unk>'.
    self._plain = (None if self.legacy else self._without_dummy_prefix(proto, where)) or self._sp
    unk = self.unk_id if self.unk_id in self._piece_of or 0 <= self.unk_id < num_pieces else (
        self._sp.unk_id())
    self._unk_text = self._piece(unk)   # transformers' str(unk_token)
    self._unk_len = len(self._plain.encode(self._unk_text))
    self._space_id = self._sp.piece_to_id(_SPIECE_UNDERLINE)
    if self._sp.id_to_piece(self._space_id) != _SPIECE_UNDERLINE:
      self._space_id = None

  @staticmethod
  def _without_dummy_prefix(proto: bytes, where: str) -> spm.SentencePieceProcessor | None:
    """The model with its dummy prefix turned off (transformers' non-legacy Llama), or None
    where it has none."""
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    try:
      model = sentencepiece_model_pb2.ModelProto.FromString(proto)
      if not model.normalizer_spec.add_dummy_prefix:
        return None
      model.normalizer_spec.add_dummy_prefix = False
      return spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    except Exception as e:  # protobuf's DecodeError, sentencepiece's RuntimeError
      raise VocabularyError(f'{where}: cannot turn off the dummy prefix ({e})') from e

  def _piece(self, i: int) -> str:
    return self._piece_of[i] if i in self._piece_of else self._sp.id_to_piece(i)

  def __getstate__(self) -> dict:
    return {'dir': self._dir, 'state': self._state}

  def __setstate__(self, state: dict) -> None:
    self.extra_ids, self._dir = 0, state['dir']
    self._setup(*state['state'])

  @property
  def base_vocab_size(self) -> int:
    return self._base

  @property
  def vocab_size(self) -> int:
    return hf_tokenizer.embedding_size(self._model_config, self._base)

  @property
  def spec(self) -> str:
    return self._dir

  @property
  def sp_model(self) -> bytes:
    """The serialized tokenizer.model (e.g. to write it next to an exported checkpoint)."""
    return self._state[0]

  def extra_id(self, i: int) -> int:
    piece = f'<extra_id_{i}>'
    found = self._added_ids.get(piece, self._sp.piece_to_id(piece))
    if self._piece(found) != piece:
      raise VocabularyError(f'{self._dir} has no sentinel {piece}: span corruption needs a '
                            'tokenizer with T5-style sentinels')
    return found

  def _split(self, text: str) -> list[str]:
    """Text pieces and special tokens alternating (the no-split tokens' lstrip / rstrip
    applied to their neighbours, as transformers does)."""
    if self._split_re is None:
      return [text]
    parts = self._split_re.split(text)
    for k in range(1, len(parts), 2):
      lstrip, rstrip = self._strip.get(parts[k], (False, False))
      if lstrip:
        parts[k - 1] = parts[k - 1].rstrip()
      if rstrip:
        parts[k + 1] = parts[k + 1].lstrip()
    return parts

  def _encode(self, text: str) -> list[int]:
    if self.legacy:
      ids: list[int] = []
      for k, part in enumerate(self._split(text)):
        if k % 2:
          ids.append(self._split_ids[part])
        elif part:
          ids += self._sp.encode(part)
      return ids
    if not text:
      return []
    text = text.replace(_SPIECE_UNDERLINE, ' ')
    if self._prefix_space:
      text = _SPIECE_UNDERLINE + text
    ids = []
    for k, part in enumerate(self._split(text)):
      if k % 2:
        ids.append(self._split_ids[part])
      elif part.startswith((_SPIECE_UNDERLINE, ' ')):
        got = self._plain.encode(self._unk_text + part)
        ids += got[self._unk_len:] if len(got) >= self._unk_len else got
      elif part:
        ids += self._plain.encode(part)
    if len(ids) > 1 and ids[0] == self._space_id and ids[1] in self._special_ids:
      ids = ids[1:]   # the prefix '▁' before a special token that starts the text
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """sentencepiece's list encode (C++ loop) where the text holds no special token."""
    texts = list(texts)
    if not self.legacy:
      return [self.encode(t) for t in texts]
    out = self._sp.encode(texts)
    for k, t in enumerate(texts):
      if '<extra_id_' in t or (self._split_re is not None and self._split_re.search(t)):
        out[k] = self.encode(t)
    return out

  def _decode(self, ids: list[int]) -> str:
    ids = [i for i in ids if i not in self._special_ids]
    if self._gemma:   # GemmaTokenizer._decode: added tokens as written, runs by sentencepiece
      parts, run = [], []
      for i in ids:
        if i in self._piece_of:
          if run:
            parts.append(self._sp.decode(run))
          parts.append(self._piece_of[i])
          run = []
        else:
          run.append(i)
      if run:
        parts.append(self._sp.decode(run))
      return ''.join(parts).replace(_SPIECE_UNDERLINE, ' ')
    # LlamaTokenizer: runs between (non-special) added tokens decoded without the first '▁',
    # the pieces joined by spaces (transformers' spaces_between_special_tokens).
    texts, run = [], []
    def flush(keep_empty: bool) -> None:
      if run:
        pieces = [self._sp.id_to_piece(i) for i in run]
        if self._prefix_space and pieces[0].startswith(_SPIECE_UNDERLINE):
          pieces[0] = pieces[0][1:]
        text = (self._sp if self.legacy else self._plain).decode_pieces(pieces)
        if text or keep_empty:
          texts.append(text)
        run.clear()
    for i in ids:
      if i in self._piece_of:
        flush(keep_empty=False)
        texts.append(self._piece_of[i])
      else:
        run.append(i)
    flush(keep_empty=True)
    text = ' '.join(texts)
    return hf_tokenizer.clean_up_tokenization(text) if self._cleanup else text
