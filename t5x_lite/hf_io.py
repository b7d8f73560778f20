"""Hugging Face model directories of every family: `load` picks the converter by config.json's
`model_type` (T5: hf.py; Llama, Qwen2/3, Gemma: hf_causal.py), `save` by the config's family,
and the tokenizer files travel with the weights both ways (`copy_tokenizer`), so a converted
run decodes with the model's own tokenizer and an export is a directory transformers'
`AutoTokenizer` and `AutoModelFor...` both load.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from t5x_lite import hf, hf_causal

# What transformers' tokenizers read from a model directory (the weights' config.json is
# copied beside them: it holds the embedding size and special ids HfTokenizerVocabulary reads).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json',
                   'special_tokens_map.json', 'added_tokens.json', 'chat_template.jinja',
                   'chat_template.json')


def model_types() -> list[str]:
  return sorted(set(hf.SUPPORTED_MODEL_TYPES) | set(hf_causal.SUPPORTED))


def load(path: str) -> tuple[Any, dict]:
  """(config, host params in the stored dtype) of a Hugging Face directory of any family."""
  model_type = hf.read_config(path).get('model_type')
  if model_type in hf.SUPPORTED_MODEL_TYPES:
    return hf.load(path)
  if model_type in hf_causal.SUPPORTED:
    return hf_causal.load(path)
  raise hf.ConversionError(f'{path}/config.json has model_type={model_type!r}; t5x_lite '
                           f'converts {", ".join(model_types())}.')


def copy_tokenizer(source: str, destination: str) -> list[str]:
  """Copy the tokenizer files of directory `source` into `destination` (made if needed);
  the names copied (none: `source` holds no tokenizer)."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
  if not {'tokenizer.json', 'tokenizer.model'} & set(names):
    return []
  os.makedirs(destination, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
  return names


def _save_t5(config: Any, params: dict, path: str, vocabulary: str) -> None:
  spiece = vocabulary if vocabulary.endswith('.model') and os.path.isfile(vocabulary) else None
  hf.save(config, params, path, spiece_model=spiece)


def _save_causal(config: Any, params: dict, path: str, vocabulary: str) -> None:
  hf_causal.save(config, params, path)
  if vocabulary and os.path.isdir(vocabulary):
    copy_tokenizer(vocabulary, path)


SAVERS = {'t5': _save_t5, 'decoder_only': _save_causal}   # a config's family -> its writer
# a config's family -> its tensors' names (our path, the Hugging Face name, layout, shape)
TENSOR_NAMES = {'t5': hf.tensor_names, 'decoder_only': hf_causal.tensor_names}


def tensor_names(config: Any) -> list[hf.Tensor]:
  """Every parameter of `config`'s family's Hugging Face model: `hf.Tensor`s."""
  if config.family not in TENSOR_NAMES:
    raise hf.ConversionError(f'no Hugging Face format for the model family {config.family!r}')
  return TENSOR_NAMES[config.family](config)


def save(config: Any, params: dict, path: str, vocabulary: str = '') -> None:
  """Write `config`'s family's Hugging Face directory, with the tokenizer of `vocabulary`
  (a checkpoint's recorded spec): T5's spiece.model, or a Hugging Face tokenizer directory's
  files."""
  if config.family not in SAVERS:
    raise hf.ConversionError(f'no Hugging Face format for the model family {config.family!r}')
  SAVERS[config.family](config, params, path, vocabulary)
