"""Hugging Face <-> t5x_lite: T5-family configs and weights, exact both ways.

`load(dir)` reads `config.json` plus `model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` (only through
`torch.load(weights_only=True)`, when torch is installed). `save(config, params, dir)` writes
a directory that `transformers.T5ForConditionalGeneration.from_pretrained` loads with no
missing or unexpected keys. Safetensors are read and written with numpy: no torch needed.
Conversion is transposes only, so a round trip is bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator, NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from t5x_lite import errors
from t5x_lite.models.t5 import T5Config

SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
TORCH_BIN = 'pytorch_model.bin'
TORCH_BIN_INDEX = 'pytorch_model.bin.index.json'
SUPPORTED_MODEL_TYPES = ('t5', 'mt5')
MAX_SHARD_BYTES = 5 * 2**30
_TIED_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')


class ConversionError(errors.UserError, ValueError):
  """A Hugging Face directory or tree that does not describe a supported T5 model."""


# --- configs --------------------------------------------------------------------------

def _flag(hf: dict[str, Any], key: str, default: bool) -> bool:
  value = hf.get(key, default)
  if not isinstance(value, bool):
    raise ConversionError(f'config.json has {key}={value!r}; expected true or false.')
  return value


def output_layer(hf: dict[str, Any], lm_head: str) -> tuple[bool, bool]:
  """(tie_word_embeddings, scale_decoder_outputs) of a checkpoint whose `lm_head.weight` is
  'absent', 'shared' (stored, equal to shared.weight) or 'own', as transformers computes it.

  transformers 5.x (`T5Config.__post_init__`, `T5ForConditionalGeneration.forward`,
  `PreTrainedModel.tie_weights`): logits are scaled by d_model**-0.5 iff
  `scale_decoder_outputs`, which defaults to `tie_word_embeddings is not False`, the rule
  transformers 4 applied to `tie_word_embeddings` alone, so configs without the key mean
  the same in both; the lm_head is shared.weight unless the file stores a different one
  (5.x always ties in memory, unties on load). mT5 never scales. Refused, since transformers
  4 and 5 compute different functions there: `tie_word_embeddings: false` with no
  lm_head.weight (4: random lm_head; 5: shared), and an own lm_head beside
  `tie_word_embeddings: true` in a config without `scale_decoder_outputs` (4 ties it).
  """
  tie = _flag(hf, 'tie_word_embeddings', True)
  if hf['model_type'] == 'mt5':
    return lm_head == 'absent', False
  scale = _flag(hf, 'scale_decoder_outputs', tie)
  if lm_head == 'absent' and not tie:
    raise ConversionError(
        'config.json says "tie_word_embeddings": false (an lm_head of its own) but the '
        "checkpoint's tensor 'lm_head.weight' is missing: transformers 4 would initialise it "
        'randomly, transformers 5 would use shared.weight. If the model ties its output layer, '
        'set "tie_word_embeddings": true (and "scale_decoder_outputs" as it was trained).')
  if lm_head == 'own' and tie and 'scale_decoder_outputs' not in hf:
    raise ConversionError(
        "tensor 'lm_head.weight' differs from shared.weight, but config.json ties them "
        '("tie_word_embeddings" true or absent, no "scale_decoder_outputs": transformers 4 '
        'ignores this lm_head, transformers 5 uses it). A separate lm_head needs '
        '"tie_word_embeddings": false in config.json (or "scale_decoder_outputs" written beside '
        'it, as transformers 5 does).')
  return (lm_head == 'absent' or (lm_head == 'shared' and tie)), scale


REQUIRED_KEYS = ('vocab_size', 'd_model', 'num_heads', 'd_kv', 'd_ff', 'num_layers')


def config_from_hf(hf: dict[str, Any], lm_head: str = 'absent') -> T5Config:
  """Our config of a HF config.json; `lm_head` as in `output_layer`."""
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConversionError(
        f'config.json has model_type={model_type!r}; t5x_lite converts {SUPPORTED_MODEL_TYPES} '
        '(T5 v1.0/v1.1, Flan-T5, mT5, ByT5). UMT5/LongT5 have other architectures.')
  for key, want in (('pad_token_id', 0), ('eos_token_id', 1), ('decoder_start_token_id', 0)):
    if hf.get(key, want) not in (want, None):
      raise ConversionError(f'config.json has {key}={hf[key]}; T5 models use {want}.')
  # transformers would fill these from its T5Config defaults, which need not be the
  # checkpoint's: name what is missing instead.
  missing = [k for k in REQUIRED_KEYS if k not in hf]
  if missing:
    raise ConversionError(f'config.json lacks {", ".join(missing)} (a T5 config.json has '
                          f'{", ".join(REQUIRED_KEYS)}): add the missing key(s).')
  for key in REQUIRED_KEYS + ('num_decoder_layers',):
    if hf.get(key) is not None and (not isinstance(hf[key], int) or isinstance(hf[key], bool)
                                    or hf[key] <= 0):
      raise ConversionError(f'config.json has {key}={hf[key]!r}; it must be a positive integer.')
  num_layers = hf['num_layers']
  tie, scale = output_layer(hf, lm_head)
  return T5Config(
      vocab_size=hf['vocab_size'], d_model=hf['d_model'], num_heads=hf['num_heads'],
      d_kv=hf['d_kv'], d_ff=hf['d_ff'], num_encoder_layers=num_layers,
      num_decoder_layers=hf.get('num_decoder_layers') or num_layers,
      feed_forward_proj=hf.get('feed_forward_proj', 'relu'),
      tie_word_embeddings=tie, scale_decoder_outputs=scale,
      relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
      dropout_rate=hf.get('dropout_rate', 0.1),
      layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6))


def config_to_hf(config: T5Config, dtype: str = 'float32') -> dict[str, Any]:
  act = config.feed_forward_proj.split('-')[-1]
  return {
      'architectures': ['T5ForConditionalGeneration'], 'model_type': 't5',
      'vocab_size': config.vocab_size, 'd_model': config.d_model, 'num_heads': config.num_heads,
      'd_kv': config.d_kv, 'd_ff': config.d_ff, 'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers,
      'feed_forward_proj': config.feed_forward_proj,
      'dense_act_fn': 'gelu_new' if config.feed_forward_proj == 'gated-gelu' else act,
      'is_gated_act': config.feed_forward_proj.startswith('gated-'),
      # As transformers 5 writes them (4 ignores the second key: the same function there
      # only when the two agree, as in every published T5 model).
      'tie_word_embeddings': config.tie_word_embeddings,
      'scale_decoder_outputs': config.scale_decoder_outputs,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'dropout_rate': config.dropout_rate, 'layer_norm_epsilon': config.layer_norm_epsilon,
      'initializer_factor': 1.0, 'is_encoder_decoder': True, 'use_cache': True,
      'pad_token_id': 0, 'eos_token_id': 1, 'decoder_start_token_id': 0, 'dtype': dtype,
  }


# --- tensor names ---------------------------------------------------------------------

class Tensor(NamedTuple):
  ours: str                 # '/'-joined path in our params tree
  theirs: str               # Hugging Face tensor name
  layout: str               # 'same' | 'linear' (transposed)
  shape: tuple[int, ...]    # our shape


def _attention_tensors(c: T5Config, ours: str, theirs: str) -> Iterator[Tensor]:
  """q/k/v are [D, H*K] here and [H*K, D] in HF; o is [H*K, D] here and [D, H*K] in HF."""
  joined = c.num_heads * c.d_kv
  for mine, hf in (('query', 'q'), ('key', 'k'), ('value', 'v')):
    yield Tensor(f'{ours}/{mine}', f'{theirs}.{hf}.weight', 'linear', (c.d_model, joined))
  yield Tensor(f'{ours}/out', f'{theirs}.o.weight', 'linear', (joined, c.d_model))


def _mlp_tensors(c: T5Config, ours: str, theirs: str) -> Iterator[Tensor]:
  wis = ('wi_0', 'wi_1') if c.feed_forward_proj.startswith('gated-') else ('wi',)
  for wi in wis:
    yield Tensor(f'{ours}/{wi}', f'{theirs}.DenseReluDense.{wi}.weight', 'linear', (c.d_model, c.d_ff))
  yield Tensor(f'{ours}/wo', f'{theirs}.DenseReluDense.wo.weight', 'linear', (c.d_ff, c.d_model))


def tensor_names(c: T5Config) -> list[Tensor]:
  """Every parameter of `c`: our path, the HF name, the layout change and our shape."""
  def norm(ours, theirs):
    return Tensor(f'{ours}/scale', f'{theirs}.weight', 'same', (c.d_model,))

  names = [Tensor('token_embedder/embedding', 'shared.weight', 'same', (c.vocab_size, c.d_model))]
  for stack, n in (('encoder', c.num_encoder_layers), ('decoder', c.num_decoder_layers)):
    names.append(Tensor(f'{stack}/relpos_bias/rel_embedding',
                        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
                        'same', (c.relative_attention_num_buckets, c.num_heads)))
    for i in range(n):
      ours, hf = f'{stack}/layers_{i}', f'{stack}.block.{i}.layer'
      if stack == 'encoder':
        names.append(norm(f'{ours}/pre_attention_layer_norm', f'{hf}.0.layer_norm'))
        names += _attention_tensors(c, f'{ours}/attention', f'{hf}.0.SelfAttention')
        names.append(norm(f'{ours}/pre_mlp_layer_norm', f'{hf}.1.layer_norm'))
        names += _mlp_tensors(c, f'{ours}/mlp', f'{hf}.1')
      else:
        names.append(norm(f'{ours}/pre_self_attention_layer_norm', f'{hf}.0.layer_norm'))
        names += _attention_tensors(c, f'{ours}/self_attention', f'{hf}.0.SelfAttention')
        names.append(norm(f'{ours}/pre_cross_attention_layer_norm', f'{hf}.1.layer_norm'))
        names += _attention_tensors(c, f'{ours}/encoder_decoder_attention', f'{hf}.1.EncDecAttention')
        names.append(norm(f'{ours}/pre_mlp_layer_norm', f'{hf}.2.layer_norm'))
        names += _mlp_tensors(c, f'{ours}/mlp', f'{hf}.2')
    names.append(norm(f'{stack}/{stack}_norm', f'{stack}.final_layer_norm'))
  if not c.tie_word_embeddings:
    names.append(Tensor('decoder/logits_dense', 'lm_head.weight', 'linear', (c.d_model, c.vocab_size)))
  return names


def _from_hf(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'linear':
    return np.ascontiguousarray(x.T)
  return x


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'linear':
    return np.ascontiguousarray(x.T)
  return np.asarray(x)


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  return tuple(reversed(shape)) if layout == 'linear' else tuple(shape)


# --- reading --------------------------------------------------------------------------

class _TensorReader:
  """Lazy access to the tensors of a HF directory, whatever its weight format."""

  def __init__(self, path: str):
    self.files: dict[str, str] = {}  # tensor name -> file
    if os.path.exists(os.path.join(path, SAFETENSORS)):
      self._index_safetensors([os.path.join(path, SAFETENSORS)])
    elif os.path.exists(os.path.join(path, SAFETENSORS_INDEX)):
      with open(os.path.join(path, SAFETENSORS_INDEX)) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      self._index_safetensors([os.path.join(path, s) for s in shards])
    elif os.path.exists(os.path.join(path, TORCH_BIN)) or os.path.exists(
        os.path.join(path, TORCH_BIN_INDEX)):
      self._load_torch(path)
    else:
      raise ConversionError(
          f'{path} holds no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}.')

  def _index_safetensors(self, files):
    for file in files:
      try:
        with safe_open(file, framework='numpy') as f:
          for name in f.keys():
            self.files[name] = file
      except Exception as e:  # safetensors raises its own error types
        raise ConversionError(f'cannot read {file}: {e}') from e
    self.torch_tensors = None

  def _load_torch(self, path):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ConversionError(
          f'{path} holds only {TORCH_BIN}, which needs torch to read. Install torch or convert '
          'the checkpoint to safetensors.') from e
    index = os.path.join(path, TORCH_BIN_INDEX)
    shards = [TORCH_BIN] if not os.path.exists(index) else sorted(
        set(json.load(open(index))['weight_map'].values()))
    self.torch_tensors = {}
    for shard in shards:
      state = torch.load(os.path.join(path, shard), map_location='cpu', weights_only=True)
      for name, t in state.items():
        if t.dtype == torch.bfloat16:
          import ml_dtypes  # pylint: disable=import-outside-toplevel
          arr = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
          arr = t.numpy()
        self.torch_tensors[name] = arr
        self.files[name] = shard

  def names(self) -> set[str]:
    return set(self.files)

  def get(self, name: str) -> np.ndarray:
    if self.torch_tensors is not None:
      return self.torch_tensors[name]
    with safe_open(self.files[name], framework='numpy') as f:
      return f.get_tensor(name)


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split('/'):
    tree = tree[p]
  return tree


def read_config(path: str) -> dict:
  """The config.json of a Hugging Face model directory (any family), or a ConversionError."""
  config_file = os.path.join(path, 'config.json')
  if not os.path.exists(config_file):
    raise ConversionError(f'{path} is not a Hugging Face model directory: no config.json.')
  with open(config_file) as f:
    return json.load(f)


def load(path: str) -> tuple[T5Config, dict]:
  """(T5Config, params as a nested dict of numpy arrays in the checkpoint's dtype)."""
  hf_config = read_config(path)
  reader = _TensorReader(path)
  available = reader.names()
  lm_head = 'absent' if 'lm_head.weight' not in available else 'own'
  if (lm_head == 'own' and hf_config.get('tie_word_embeddings', True) is not False
      and 'shared.weight' in available  # only then can it matter (mT5: absent or not)
      and np.array_equal(reader.get('lm_head.weight'), reader.get('shared.weight'))):
    lm_head = 'shared'
  config = config_from_hf(hf_config, lm_head)
  params: dict = {}
  dtypes = set()
  for ours, theirs, layout, shape in tensor_names(config):
    if theirs not in available:
      raise ConversionError(f'{path}: tensor {theirs!r} is missing (config: {config}).')
    x = reader.get(theirs)
    expected = _hf_shape(shape, layout)
    if tuple(x.shape) != expected:
      raise ConversionError(
          f'{path}: tensor {theirs!r} has shape {tuple(x.shape)}, config.json implies {expected}.')
    dtypes.add(str(x.dtype))
    _set(params, ours, _from_hf(x, layout))

  used = {t.theirs for t in tensor_names(config)}
  shared = _get(params, 'token_embedder/embedding')
  for name in sorted(available - used):
    # Copies of the shared embedding (a tied lm_head: checked above) are allowed if equal.
    if name in _TIED_COPIES:
      if not np.array_equal(reader.get(name), shared):
        raise ConversionError(f'{path}: tensor {name!r} differs from shared.weight, but T5 ties '
                              'them.')
    elif name not in ('lm_head.weight',
                      'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight'):
      raise ConversionError(f'{path}: unexpected tensor {name!r} for a T5 model with {config}.')
  if len(dtypes) == 1 and (dtype := dtypes.pop()) in ('bfloat16', 'float16'):
    config = config.replace(param_dtype=dtype)
  return config, params


# --- writing --------------------------------------------------------------------------

def to_hf_tensors(config: T5Config, params: dict) -> dict[str, np.ndarray]:
  tensors = {}
  for t in tensor_names(config):
    tensors[t.theirs] = _to_hf(np.asarray(_get(params, t.ours)), t.layout)
  # Like transformers' own save_pretrained: the encoder/decoder `embed_tokens` copies of
  # `shared` are left out (transformers ties them on load).
  return tensors


def save(config: T5Config, params: dict, path: str, spiece_model: str | None = None,
         max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """Write config.json, generation_config.json and safetensors (sharded above
  `max_shard_bytes`), plus `spiece.model` and a tokenizer config when one is given."""
  os.makedirs(path, exist_ok=True)
  tensors = to_hf_tensors(config, params)
  dtype = str(next(iter(tensors.values())).dtype)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config_to_hf(config, dtype), f, indent=2, sort_keys=True)
  with open(os.path.join(path, 'generation_config.json'), 'w') as f:
    json.dump({'decoder_start_token_id': 0, 'eos_token_id': 1, 'pad_token_id': 0}, f, indent=2)
  _write_safetensors(tensors, path, max_shard_bytes)
  if spiece_model:
    shutil.copyfile(spiece_model, os.path.join(path, 'spiece.model'))
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
      json.dump({'tokenizer_class': 'T5Tokenizer', 'extra_ids': 100, 'eos_token': '</s>',
                 'unk_token': '<unk>', 'pad_token': '<pad>', 'model_max_length': 512}, f,
                indent=2)


def _write_safetensors(tensors: dict[str, np.ndarray], path: str, max_shard_bytes: int) -> None:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  for stale in (SAFETENSORS, SAFETENSORS_INDEX):
    if os.path.exists(os.path.join(path, stale)):
      os.remove(os.path.join(path, stale))
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, SAFETENSORS), metadata={'format': 'pt'})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(path, file), metadata={'format': 'pt'})
    weight_map.update({name: file for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(path, SAFETENSORS_INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
