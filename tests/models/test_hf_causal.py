"""Hugging Face parity of the decoder-only family (#32): random-weight LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM and GemmaForCausalLM written with `save_pretrained`, loaded
with `hf_causal.load`: logits within 1e-4 of transformers' in fp32, unpacked and packed (each
packed segment against transformers on that example alone); export round trips bit-exact."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from safetensors.numpy import load_file  # pylint: disable=wrong-import-position

from t5x_lite import hf_causal, models  # pylint: disable=wrong-import-position

_LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
           'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
# Odd shapes: GQA with 3 kv heads, head_dim != hidden / heads, tied and untied outputs.
ARCHS = {
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=12,
        tie_word_embeddings=False, rope_parameters={'rope_theta': 5e5, **_LLAMA3})),
    'llama_tied_bias': (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
        tie_word_embeddings=True)),
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True,
        rope_parameters={'rope_theta': 1e6, 'rope_type': 'default'})),
    'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=10,
        tie_word_embeddings=False)),
    'gemma': (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        tie_word_embeddings=True)),
}
VOCAB = 128


def _randomize(model, seed: int, gemma: bool) -> None:
  """Weights of unit-scale activations (HF's std 0.02 init makes every logit ~0, which would
  hide errors), norm scales away from their neutral value, biases nonzero."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        center = 0.0 if gemma else 1.0
        p.copy_(center + 0.3 * torch.randn(p.shape, generator=gen))
      elif name.endswith('bias'):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      elif 'embed_tokens' in name:
        p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if gemma else 1.0))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


@pytest.fixture(scope='module', params=sorted(ARCHS))
def saved(request, tmp_path_factory):
  config_cls, model_cls, kwargs = ARCHS[request.param]
  config = config_cls(vocab_size=VOCAB, intermediate_size=64, num_hidden_layers=2,
                      max_position_embeddings=64, **kwargs)
  model = model_cls(config).eval()
  _randomize(model, seed=len(request.param), gemma=request.param == 'gemma')
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  return request.param, path, model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def test_load_gives_the_architecture(saved):
  name, path, hf_model = saved
  config, params = hf_causal.load(path)
  assert config.architecture == name.split('_')[0]
  assert models.param_count(config) == sum(p.numel() for p in hf_model.parameters())
  assert config.num_kv_heads < config.num_heads


def test_unpacked_logits_match_transformers(saved):
  _, path, hf_model = saved
  config, params = hf_causal.load(path)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 12))   # id 0 included: a real token
  ours = models.build(config).logits(params, {'decoder_input_tokens': jnp.asarray(tokens)})
  theirs = _hf_logits(hf_model, tokens)
  assert np.abs(theirs).max() > 1.0   # weights that matter
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_packed_segments_match_transformers_on_each_example_alone(saved):
  _, path, hf_model = saved
  config, params = hf_causal.load(path)
  rng = np.random.default_rng(1)
  lengths = [[5, 7], [3, 4, 6], [14]]
  width = 16
  tokens = np.zeros((3, width), np.int32)
  segments = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  examples = []
  for row, row_lengths in enumerate(lengths):
    start = 0
    for seg, n in enumerate(row_lengths):
      example = rng.integers(0, VOCAB, n)
      examples.append((row, start, example))
      tokens[row, start:start + n] = example
      segments[row, start:start + n] = seg + 1
      positions[row, start:start + n] = np.arange(n)
      start += n
  ours = np.asarray(models.build(config).logits(params, {
      'decoder_input_tokens': jnp.asarray(tokens), 'decoder_segment_ids': jnp.asarray(segments),
      'decoder_positions': jnp.asarray(positions)}))
  for row, start, example in examples:
    theirs = _hf_logits(hf_model, example[None])[0]
    np.testing.assert_allclose(ours[row, start:start + len(example)], theirs, atol=1e-4, rtol=0)


def test_export_round_trip_is_bit_exact_and_transformers_loads_it(saved, tmp_path):
  name, path, hf_model = saved
  config, params = hf_causal.load(path)
  out = str(tmp_path / 'export')
  hf_causal.save(config, params, out)
  original, exported = load_file(os.path.join(path, 'model.safetensors')), load_file(
      os.path.join(out, 'model.safetensors'))
  original.pop('lm_head.weight', None) if config.tie_word_embeddings else None
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert type(reloaded).__name__ == type(hf_model).__name__
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 9))
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), tokens), _hf_logits(hf_model, tokens))
  # Sharded: several files and an index, read back to the same params.
  sharded = str(tmp_path / 'sharded')
  hf_causal.save(config, params, sharded, max_shard_bytes=20_000)
  assert os.path.exists(os.path.join(sharded, 'model.safetensors.index.json'))
  config2, params2 = hf_causal.load(sharded)
  assert config2 == config
  for t in hf_causal.tensor_names(config):
    a, b = params, params2
    for part in t.ours.split('/'):
      a, b = a[part], b[part]
    assert np.array_equal(a, b), t.ours


@pytest.mark.parametrize('change, key', [
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}, 'rope_parameters': None},
     'rope_scaling'),
    ({'rope_parameters': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4}},
     'rope_parameters'),
    ({'use_sliding_window': True}, 'use_sliding_window'),
    ({'layer_types': ['sliding_attention', 'full_attention']}, 'layer_types'),
    ({'final_logit_softcapping': 30.0}, 'final_logit_softcapping'),
    ({'num_experts': 8}, 'num_experts'),
    ({'mlp_bias': True}, 'mlp_bias'),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
    ({'model_type': 'mistral'}, 'model_type'),
])
def test_unsupported_config_keys_are_refused_by_name(change, key):
  hf = {'model_type': 'llama', 'vocab_size': VOCAB, 'hidden_size': 32,
        'intermediate_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4, **change}
  with pytest.raises(hf_causal.ConversionError, match=key):
    hf_causal.config_from_hf(hf)


def test_transformers4_style_rope_keys_read_the_same():
  hf = {'model_type': 'llama', 'vocab_size': VOCAB, 'hidden_size': 32, 'intermediate_size': 64,
        'num_hidden_layers': 2, 'num_attention_heads': 4, 'rope_theta': 5e5,
        'rope_scaling': {k: v for k, v in _LLAMA3.items() if k != 'rope_type'} | {
            'rope_type': 'llama3'}}
  v4 = hf_causal.config_from_hf(hf)
  v5 = hf_causal.config_from_hf({**{k: v for k, v in hf.items() if not k.startswith('rope')},
                                 'rope_parameters': {'rope_theta': 5e5, **_LLAMA3}})
  assert v4 == v5 and v4.rope_scaling == (8.0, 1.0, 4.0, 16.0) and v4.rope_theta == 5e5
  exported = hf_causal.config_to_hf(v4)
  assert hf_causal.config_from_hf(json.loads(json.dumps(exported))) == v4


def test_bf16_directory_round_trips_bit_exact(saved, tmp_path):
  """A bf16 checkpoint loads as bf16 (param_dtype bfloat16) and is written back bit for bit."""
  name, _, hf_model = saved
  bf16_dir, out = str(tmp_path / 'bf16'), str(tmp_path / 'out')
  hf_model.to(torch.bfloat16).save_pretrained(bf16_dir)
  hf_model.to(torch.float32)
  config, params = hf_causal.load(bf16_dir)
  assert config.param_dtype == 'bfloat16'
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {'bfloat16'}
  hf_causal.save(config, params, out)
  original = load_file(os.path.join(bf16_dir, 'model.safetensors'))
  written = load_file(os.path.join(out, 'model.safetensors'))
  original.pop('lm_head.weight', None) if config.tie_word_embeddings else None
  assert sorted(written) == sorted(original), name
  for key, value in original.items():
    assert written[key].dtype == value.dtype and written[key].tobytes() == value.tobytes(), key
