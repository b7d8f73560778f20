"""A Hugging Face tokenizer as a `Vocabulary`: `tokenizer.json` through the `tokenizers`
library, with the model's own BOS / EOS / PAD ids (Llama, Qwen, Gemma: not T5's 0 / 1).

`HfTokenizerVocabulary(path)`: `path` is a model directory (its `tokenizer.json`) or a
`tokenizer.json` file. The special tokens are read as `transformers.AutoTokenizer` reads
them: `tokenizer_config.json`, then `special_tokens_map.json` (each token a string or
`{"content": ...}`), then `config.json`'s `*_token_id`; a vocabulary without PAD pads with
EOS (as Llama fine-tuning does). `add_bos` is `tokenizer_config.json`'s `add_bos_token`, or
else whether the tokenizer's post-processor template puts BOS first.

`encode` = `AutoTokenizer(...)(text, add_special_tokens=False).input_ids` (the pipeline adds
EOS after truncation, and the feature converter starts each sequence with BOS:
feature_converters.py); `decode` = its `decode(ids, skip_special_tokens=True)` of the ids
before the first EOS (with transformers' `clean_up_tokenization` where the config asks for it,
which transformers skips for BPE models). `vocab_size` is the model's embedding size
(`config.json`'s `vocab_size`), else the tokenizer's size padded to a multiple of 128.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import tokenizers

from t5x_lite.data.vocab_base import Vocabulary, VocabularyError, VocabularyNotFound, _round_up

_SPECIALS = ('bos', 'eos', 'pad', 'unk')


def resolve(path: str | os.PathLike) -> tuple[str, str]:
  """(the model directory, its tokenizer.json) named by a directory or a tokenizer.json."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    directory, file = path, os.path.join(path, 'tokenizer.json')
  else:
    directory, file = os.path.dirname(path), path
  if not os.path.isfile(file):
    raise VocabularyNotFound(f'no Hugging Face tokenizer at {file} (give a model directory '
                             'holding tokenizer.json, or the tokenizer.json file)')
  return directory, file


def _read_json(directory: str, name: str) -> dict:
  file = os.path.join(directory, name)
  if not os.path.isfile(file):
    return {}
  try:
    with open(file, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise VocabularyError(f'cannot read {file}: {e}') from e
  return data if isinstance(data, dict) else {}


def _content(token) -> str | None:
  if isinstance(token, dict):
    token = token.get('content')
  return token if isinstance(token, str) else None


def read_configs(directory: str) -> list[dict]:
  """A model directory's tokenizer_config.json, special_tokens_map.json and config.json
  (each {} where the file is absent)."""
  return [_read_json(directory, n) for n in ('tokenizer_config.json', 'special_tokens_map.json',
                                             'config.json')]


def special_ids(configs: list[dict], token_to_id: Callable[[str], int | None],
                where: str) -> dict[str, int | None]:
  """{'bos', 'eos', 'pad', 'unk'} -> id as transformers reads them from `read_configs`: the
  token named in tokenizer_config.json, else in special_tokens_map.json (a string or
  `{"content": ...}`, looked up with `token_to_id`), else config.json's `*_token_id`; None
  where none names one."""
  tok_config, special_map, model_config = configs
  ids: dict[str, int | None] = {}
  for name in _SPECIALS:
    ids[name] = None
    for source in (tok_config, special_map):
      content = _content(source.get(f'{name}_token'))
      if content is not None:
        ids[name] = token_to_id(content)
        if ids[name] is None:
          raise VocabularyError(f'{where}: the {name} token {content!r} is not in the '
                                'tokenizer')
        break
    if ids[name] is None:
      value = model_config.get(f'{name}_token_id')
      ids[name] = value[0] if isinstance(value, list) and value else value
      if not isinstance(ids[name], int):
        ids[name] = None
  return ids


def embedding_size(model_config: dict, base_vocab_size: int) -> int:
  """config.json's `vocab_size` (the model's embedding rows), else `base_vocab_size` padded
  to a multiple of 128."""
  size = model_config.get('vocab_size')
  if isinstance(size, int) and size >= base_vocab_size:
    return size
  return _round_up(base_vocab_size)


def clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization` (spaces before punctuation and contractions)."""
  for a, b in ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"),
               (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(a, b)
  return text


class HfTokenizerVocabulary(Vocabulary):
  """A `tokenizer.json` with the model's special ids (module docstring)."""

  pad_starts_sequences = False   # no BOS: a sequence starts with its own first token, as in HF

  def __init__(self, path: str | os.PathLike):
    super().__init__(extra_ids=0)
    directory, file = resolve(path)
    self._path = os.path.abspath(os.fspath(path))
    try:
      with open(file, encoding='utf-8') as f:
        tokenizer_json = f.read()
    except OSError as e:
      raise VocabularyError(f'cannot read {file}: {e}') from e
    configs = read_configs(directory)
    self._setup(tokenizer_json, configs, file)

  def _setup(self, tokenizer_json: str, configs: list[dict], where: str) -> None:
    self._state = (tokenizer_json, configs, where)
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the tokenizers library raises its own Exception type
      raise VocabularyError(f'{where} is not a tokenizer.json the tokenizers library '
                            f'reads: {e}') from e
    tok_config, _, model_config = configs
    ids = special_ids(configs, self._tok.token_to_id, where)
    if ids['eos'] is None:
      raise VocabularyError(f'{where}: no EOS token in tokenizer_config.json, '
                            'special_tokens_map.json or config.json; a causal model needs one')
    self.eos_id, self.bos_id = ids['eos'], ids['bos']
    self.pad_id = ids['pad'] if ids['pad'] is not None else ids['eos']
    self.unk_id = ids['unk'] if ids['unk'] is not None else -1
    if isinstance(tok_config.get('add_bos_token'), bool):
      self.add_bos = tok_config['add_bos_token'] and self.bos_id is not None
    else:
      self.add_bos = self.bos_id is not None and self._template_adds_bos()
    self._cleanup = bool(tok_config.get('clean_up_tokenization_spaces', False)) and (
        type(self._tok.model).__name__ != 'BPE')
    self._model_config = model_config

  def _template_adds_bos(self) -> bool:
    with_special = self._tok.encode('a', add_special_tokens=True).ids
    plain = self._tok.encode('a', add_special_tokens=False).ids
    return with_special[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

  def __getstate__(self) -> dict:
    return {'path': self._path, 'state': self._state}

  def __setstate__(self, state: dict) -> None:
    self.extra_ids, self._path = 0, state['path']
    self._setup(*state['state'])

  @property
  def base_vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def vocab_size(self) -> int:
    return embedding_size(self._model_config, self.base_vocab_size)

  @property
  def spec(self) -> str:
    return self._path

  def extra_id(self, i: int) -> int:
    found = self._tok.token_to_id(f'<extra_id_{i}>')
    if found is None:
      raise VocabularyError(f'{self._path} has no sentinel <extra_id_{i}>: span corruption '
                            'needs a tokenizer with T5-style sentinels')
    return found

  def _encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def _decode(self, ids: list[int]) -> str:
    text = self._tok.decode(ids, skip_special_tokens=True)
    if self._cleanup:
      text = clean_up_tokenization(text)
    return text


def is_hf_tokenizer(spec: str) -> bool:
  """Whether `spec` names a tokenizer.json or a directory holding one."""
  return os.path.basename(spec) == 'tokenizer.json' or (
      os.path.isdir(spec) and os.path.isfile(os.path.join(spec, 'tokenizer.json')))
