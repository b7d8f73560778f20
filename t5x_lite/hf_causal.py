"""Hugging Face <-> t5x_lite for decoder-only models: LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM and GemmaForCausalLM directories, exact both ways.

`load(dir)` reads `config.json` plus safetensors (one file or sharded) or `pytorch_model.bin`
(through hf.py's reader); `save(config, params, dir)` writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.
Conversion is transposes only, so a round trip is bit-identical.

What a config.json may say, per model_type (anything else refused, naming the key, rather
than loading a different function):
  all      rope: `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters`
           (transformers 5), type default or `llama3`; `tie_word_embeddings`; `head_dim`.
           Refused: other rope types, `mlp_bias`, sliding windows (`use_sliding_window`,
           sliding `layer_types`), soft-capping, mixtures of experts.
  llama    `attention_bias` (biases on q/k/v/o), `hidden_act` silu.
  qwen2    q/k/v biases always, none on o.
  qwen3    q/k RMSNorm per head; `attention_bias` (q/k/v/o).
  gemma    `hidden_act`/`hidden_activation` gelu or gelu_pytorch_tanh (both the tanh GELU:
           transformers maps the legacy "gelu" to it), (1 + w) norms, scaled embeddings.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np

from t5x_lite import hf as hf_t5
from t5x_lite.hf import Tensor
from t5x_lite.models.decoder_only_config import LLAMA3_SCALING_KEYS, DecoderOnlyConfig

SUPPORTED = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
             'qwen3': 'Qwen3ForCausalLM', 'gemma': 'GemmaForCausalLM'}
# transformers' defaults for keys a config.json may leave out.
_DEFAULTS = {'llama': dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=2048),
             'qwen2': dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=32768),
             'qwen3': dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=32768),
             'gemma': dict(rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
                           max_position_embeddings=8192)}
REQUIRED_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                 'num_attention_heads')


ConversionError = hf_t5.ConversionError   # one error for every family's conversion


# --- configs --------------------------------------------------------------------------

def _refuse_unsupported(hf: dict[str, Any]) -> None:
  def refuse(key, why):
    raise ConversionError(f'config.json has {key}={hf[key]!r}: {why} is not supported.')

  if hf.get('mlp_bias'):
    refuse('mlp_bias', 'an MLP with biases')
  if hf.get('use_sliding_window'):
    refuse('use_sliding_window', 'sliding-window attention')
  if any(t != 'full_attention' for t in hf.get('layer_types') or ()):
    refuse('layer_types', 'sliding-window attention')
  for key in ('attn_logit_softcapping', 'final_logit_softcapping'):
    if hf.get(key) is not None:
      refuse(key, 'logit soft-capping')
  for key in ('num_experts', 'num_local_experts', 'moe_intermediate_size'):
    if hf.get(key):
      refuse(key, 'a mixture of experts')


def _rope(hf: dict[str, Any], default_theta: float) -> tuple[float, tuple | None]:
  """(rope_theta, llama3 scaling or None) from transformers 4's or 5's keys."""
  params = hf.get('rope_parameters')
  key = 'rope_parameters' if params else 'rope_scaling'
  scaling = params if params else hf.get('rope_scaling')
  theta = (params or {}).get('rope_theta', hf.get('rope_theta', default_theta))
  kind = (scaling or {}).get('rope_type', (scaling or {}).get('type', 'default'))
  if kind == 'default':
    return float(theta), None
  if kind != 'llama3':
    raise ConversionError(f'config.json has {key} of type {kind!r}: only the default RoPE and '
                          "'llama3' scaling are supported.")
  missing = [k for k in LLAMA3_SCALING_KEYS if k not in scaling]
  if missing:
    raise ConversionError(f'config.json: {key} (llama3) lacks {", ".join(missing)}.')
  return float(theta), tuple(float(scaling[k]) for k in LLAMA3_SCALING_KEYS)


def config_from_hf(hf: dict[str, Any]) -> DecoderOnlyConfig:
  arch = hf.get('model_type')
  if arch not in SUPPORTED:
    raise ConversionError(f'config.json has model_type={arch!r}; t5x_lite converts decoder-only '
                          f'{sorted(SUPPORTED)} (and T5 with t5x_lite.hf).')
  missing = [k for k in REQUIRED_KEYS if k not in hf]
  if missing:
    raise ConversionError(f'config.json lacks {", ".join(missing)}.')
  _refuse_unsupported(hf)
  defaults = _DEFAULTS[arch]
  act = hf.get('hidden_activation') or hf.get('hidden_act', 'silu')
  if arch == 'gemma':
    if act not in ('gelu', 'gelu_pytorch_tanh'):
      raise ConversionError(f'config.json has hidden_act={act!r}: Gemma runs the tanh GELU.')
    act = 'gelu_tanh'
  elif act != 'silu':
    raise ConversionError(f'config.json has hidden_act={act!r}: {arch} runs silu (SwiGLU).')
  heads = hf['num_attention_heads']
  head_dim = hf.get('head_dim') or (256 if arch == 'gemma' and 'head_dim' not in hf else
                                    hf['hidden_size'] // heads)
  if arch == 'qwen3' and 'head_dim' not in hf:
    head_dim = 128   # Qwen3Config's default
  theta, scaling = _rope(hf, defaults['rope_theta'])
  attention_bias = bool(hf.get('attention_bias', False))
  eos = hf.get('eos_token_id')
  return DecoderOnlyConfig(
      architecture=arch, vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      intermediate_size=hf['intermediate_size'], num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads, head_dim=head_dim,
      activation=act, rms_norm_eps=float(hf.get('rms_norm_eps', defaults['rms_norm_eps'])),
      norm_plus_one=arch == 'gemma', scale_embeddings=arch == 'gemma',
      qkv_bias=arch == 'qwen2' or attention_bias,
      out_bias=arch in ('llama', 'qwen3') and attention_bias,
      qk_norm=arch == 'qwen3',
      tie_word_embeddings=bool(hf.get('tie_word_embeddings', defaults['tie_word_embeddings'])),
      rope_theta=theta, rope_scaling=scaling,
      max_position_embeddings=hf.get('max_position_embeddings',
                                     defaults['max_position_embeddings']),
      bos_token_id=hf.get('bos_token_id'),
      eos_token_id=() if eos is None else eos, pad_token_id=hf.get('pad_token_id'))


def config_to_hf(c: DecoderOnlyConfig, dtype: str = 'float32') -> dict[str, Any]:
  if c.architecture == 'qwen2' and (not c.qkv_bias or c.out_bias):
    raise ConversionError('a qwen2 model has q/k/v biases and no output bias; this config '
                          f'has qkv_bias={c.qkv_bias}, out_bias={c.out_bias}.')
  if c.architecture != 'qwen2' and c.qkv_bias != c.out_bias:
    raise ConversionError(f'{c.architecture} biases all of q/k/v/o or none (attention_bias); '
                          f'this config has qkv_bias={c.qkv_bias}, out_bias={c.out_bias}.')
  if c.qk_norm != (c.architecture == 'qwen3') or (
      (c.architecture == 'gemma') != c.norm_plus_one or c.norm_plus_one != c.scale_embeddings):
    raise ConversionError(f'this config is no {c.architecture} model (qk_norm={c.qk_norm}, '
                          f'norm_plus_one={c.norm_plus_one}).')
  rope: dict[str, Any] = {'rope_theta': c.rope_theta, 'rope_type': 'default'}
  if c.rope_scaling is not None:
    rope = {**rope, 'rope_type': 'llama3', **dict(zip(LLAMA3_SCALING_KEYS, c.rope_scaling))}
    rope['original_max_position_embeddings'] = int(rope['original_max_position_embeddings'])
  eos = list(c.eos_token_id)
  out = {
      'architectures': [SUPPORTED[c.architecture]], 'model_type': c.architecture,
      'vocab_size': c.vocab_size, 'hidden_size': c.hidden_size,
      'intermediate_size': c.intermediate_size, 'num_hidden_layers': c.num_layers,
      'num_attention_heads': c.num_heads, 'num_key_value_heads': c.num_kv_heads,
      'head_dim': c.head_dim, 'rms_norm_eps': c.rms_norm_eps,
      'hidden_act': 'gelu_pytorch_tanh' if c.activation == 'gelu_tanh' else 'silu',
      'tie_word_embeddings': c.tie_word_embeddings,
      'max_position_embeddings': c.max_position_embeddings,
      # transformers 5's key and, for transformers 4, the two it replaced.
      'rope_parameters': rope, 'rope_theta': c.rope_theta,
      'rope_scaling': None if c.rope_scaling is None else {k: v for k, v in rope.items()
                                                           if k != 'rope_theta'},
      'bos_token_id': c.bos_token_id, 'eos_token_id': eos[0] if len(eos) == 1 else (eos or None),
      'pad_token_id': c.pad_token_id, 'attention_dropout': 0.0, 'use_cache': True,
      'dtype': dtype,
  }
  if c.architecture in ('llama', 'qwen3'):
    out['attention_bias'] = c.out_bias
  if c.architecture == 'llama':
    out['mlp_bias'] = False
  if c.architecture in ('qwen2', 'qwen3'):
    out['use_sliding_window'] = False
  return out


# --- tensor names ---------------------------------------------------------------------

def tensor_names(c: DecoderOnlyConfig) -> list[Tensor]:
  """Every parameter of `c`: our path, the HF name, the layout change and our shape."""
  d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

  def layer(i: int) -> Iterator[Tensor]:
    ours, theirs = f'layers_{i}', f'model.layers.{i}'
    yield Tensor(f'{ours}/pre_attention_norm/scale', f'{theirs}.input_layernorm.weight',
                 'same', (d,))
    for mine, hf, width in (('query', 'q', q), ('key', 'k', kv), ('value', 'v', kv)):
      yield Tensor(f'{ours}/attention/{mine}', f'{theirs}.self_attn.{hf}_proj.weight', 'linear',
                   (d, width))
      if c.qkv_bias:
        yield Tensor(f'{ours}/attention/{mine}_bias', f'{theirs}.self_attn.{hf}_proj.bias',
                     'same', (width,))
    yield Tensor(f'{ours}/attention/out', f'{theirs}.self_attn.o_proj.weight', 'linear', (q, d))
    if c.out_bias:
      yield Tensor(f'{ours}/attention/out_bias', f'{theirs}.self_attn.o_proj.bias', 'same', (d,))
    if c.qk_norm:
      for mine, hf in (('query', 'q'), ('key', 'k')):
        yield Tensor(f'{ours}/attention/{mine}_norm/scale', f'{theirs}.self_attn.{hf}_norm.weight',
                     'same', (c.head_dim,))
    yield Tensor(f'{ours}/pre_mlp_norm/scale', f'{theirs}.post_attention_layernorm.weight',
                 'same', (d,))
    for mine, hf, shape in (('wi_0', 'gate', (d, c.intermediate_size)),
                            ('wi_1', 'up', (d, c.intermediate_size)),
                            ('wo', 'down', (c.intermediate_size, d))):
      yield Tensor(f'{ours}/mlp/{mine}', f'{theirs}.mlp.{hf}_proj.weight', 'linear', shape)

  names = [Tensor('embedding', 'model.embed_tokens.weight', 'same', (c.vocab_size, d))]
  for i in range(c.num_layers):
    names += layer(i)
  names.append(Tensor('final_norm/scale', 'model.norm.weight', 'same', (d,)))
  if not c.tie_word_embeddings:
    names.append(Tensor('logits_dense', 'lm_head.weight', 'linear', (d, c.vocab_size)))
  return names


# --- reading and writing ----------------------------------------------------------------

def load(path: str) -> tuple[DecoderOnlyConfig, dict]:
  """(config, params as a nested dict of numpy arrays in the checkpoint's dtype)."""
  config = config_from_hf(hf_t5.read_config(path))
  reader = hf_t5._TensorReader(path)  # pylint: disable=protected-access
  available = reader.names()
  params: dict = {}
  dtypes = set()
  names = tensor_names(config)
  for ours, theirs, layout, shape in names:
    if theirs not in available:
      raise ConversionError(f'{path}: tensor {theirs!r} is missing (config: {config}).')
    x = reader.get(theirs)
    expected = hf_t5._hf_shape(shape, layout)  # pylint: disable=protected-access
    if tuple(x.shape) != expected:
      raise ConversionError(
          f'{path}: tensor {theirs!r} has shape {tuple(x.shape)}, config.json implies {expected}.')
    dtypes.add(str(x.dtype))
    hf_t5._set(params, ours, hf_t5._from_hf(x, layout))  # pylint: disable=protected-access
  used = {t.theirs for t in names}
  for name in sorted(available - used):
    if name == 'lm_head.weight' and config.tie_word_embeddings:
      if not np.array_equal(reader.get(name), params['embedding']):
        raise ConversionError(f'{path}: lm_head.weight differs from model.embed_tokens.weight '
                              'but config.json ties them ("tie_word_embeddings").')
    elif not name.endswith('rotary_emb.inv_freq'):
      raise ConversionError(f'{path}: unexpected tensor {name!r} for {config}.')
  if len(dtypes) == 1 and (dtype := dtypes.pop()) in ('bfloat16', 'float16'):
    config = config.replace(param_dtype=dtype)
  return config, params


def to_hf_tensors(config: DecoderOnlyConfig, params: dict) -> dict[str, np.ndarray]:
  return {t.theirs: hf_t5._to_hf(np.asarray(hf_t5._get(params, t.ours)), t.layout)  # pylint: disable=protected-access
          for t in tensor_names(config)}


def save(config: DecoderOnlyConfig, params: dict, path: str,
         max_shard_bytes: int = hf_t5.MAX_SHARD_BYTES) -> None:
  """Write config.json, generation_config.json and safetensors (sharded above
  `max_shard_bytes`)."""
  os.makedirs(path, exist_ok=True)
  tensors = to_hf_tensors(config, params)
  dtype = str(next(iter(tensors.values())).dtype)
  hf_config = config_to_hf(config, dtype)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  with open(os.path.join(path, 'generation_config.json'), 'w') as f:
    json.dump({k: hf_config[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
               if hf_config[k] is not None}, f, indent=2)
  hf_t5._write_safetensors(tensors, path, max_shard_bytes)  # pylint: disable=protected-access
