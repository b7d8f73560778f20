"""The decoder-only family (#32): masks (causal, packed, T5X's prefix LM), scoring, the KV-cache
decode against full forward passes, presets' parameter counts, gin files, partitioning."""

from __future__ import annotations

import glob

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import config as config_lib, decoding, partitioning
from t5x_lite.models import decoder_only, decoder_presets, families
from t5x_lite.models.decoder_only_config import DecoderOnlyConfig

TINY = DecoderOnlyConfig(architecture='qwen3', vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=6, num_kv_heads=3, head_dim=10, qk_norm=True,
                         qkv_bias=True, tie_word_embeddings=False, rope_theta=500.0)


def _model(**changes):
  model = families.build(TINY.replace(**changes))
  params = model.init_params(jax.random.key(0))
  # Nonzero biases and norm scales, so that every parameter shows in the logits.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
      if 'bias' in str(path[-1]) or 'scale' in str(path[-1]) else x, params)
  return model, params


def test_mask_is_t5x_decoder_mask_with_seqio_prefix():
  """seqio's PrefixLMFeatureConverter example (seqio/feature_converters.py): inputs
  [9, 4, 6, 1], targets [3, 9, 1] -> decoder_causal_attention [1, 1, 1, 1, 1, 0, 0, 0, 0]
  (positions < inputs_width + 1); flaxformer's make_decoder_mask: causal OR both marked."""
  causal_attention = jnp.array([[1, 1, 1, 1, 1, 0, 0, 0, 0]])
  segments = jnp.array([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
  bias = decoder_only.attention_bias(9, segments, causal_attention, 1)[0, 0, 0]
  allowed = np.asarray(bias == 0)
  expected = np.tril(np.ones((9, 9), bool))
  expected[:5, :5] = True
  expected &= np.asarray(segments[0][:, None] == segments[0][None, :])
  np.testing.assert_array_equal(allowed, expected)


def test_causal_and_prefix_lm_dependencies():
  model, params = _model()
  prefix_model = families.build(TINY.replace(inputs_bidirectional_attention=True))
  tokens = jnp.array(np.random.default_rng(0).integers(0, 96, (1, 10)))
  causal_attention = jnp.array([[1] * 5 + [0] * 5])
  changed_input = tokens.at[0, 3].set((tokens[0, 3] + 1) % 96)
  changed_target = tokens.at[0, 7].set((tokens[0, 7] + 1) % 96)

  def logits(m, t, ca=causal_attention):
    return np.asarray(jax.jit(m.logits)(params, {'decoder_input_tokens': t, 'decoder_causal_attention': ca}))

  base = logits(model, tokens)
  # Causal: decoder_causal_attention is ignored without inputs_bidirectional_attention.
  np.testing.assert_array_equal(base, logits(model, tokens, ca=jnp.zeros_like(tokens)))
  np.testing.assert_allclose(logits(model, changed_input)[0, :3], base[0, :3], atol=1e-6)
  assert np.abs(logits(model, changed_input)[0, 3:] - base[0, 3:]).max() > 1e-3
  # Prefix LM: earlier inputs see later inputs; nothing sees a later target.
  prefix = logits(prefix_model, tokens)
  assert np.abs(prefix - base).max() > 1e-3
  assert np.abs(logits(prefix_model, changed_input)[0, :3] - prefix[0, :3]).max() > 1e-3
  np.testing.assert_allclose(logits(prefix_model, changed_target)[0, :7], prefix[0, :7], atol=1e-6)
  # Rows without a marked prefix compute the causal LM.
  np.testing.assert_allclose(logits(prefix_model, tokens, ca=jnp.zeros_like(tokens)), base,
                             atol=1e-6)


@pytest.mark.parametrize('bidirectional', [False, True])
def test_packed_rows_equal_each_segment_alone(bidirectional):
  model, params = _model(inputs_bidirectional_attention=bidirectional)
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, 96, 6), rng.integers(0, 96, 5)
  row = jnp.array([np.concatenate([a, b, [0, 0, 0]])])
  feats = {'decoder_input_tokens': row,
           'decoder_segment_ids': jnp.array([[1] * 6 + [2] * 5 + [0] * 3]),
           'decoder_positions': jnp.array([list(range(6)) + list(range(5)) + [0] * 3]),
           'decoder_causal_attention': jnp.array([[1] * 3 + [0] * 3 + [1] * 2 + [0] * 3 + [0] * 3])}
  packed = np.asarray(jax.jit(model.logits)(params, feats))[0]
  for start, seg, n_prefix in ((0, a, 3), (6, b, 2)):
    alone = jax.jit(model.logits)(params, {'decoder_input_tokens': jnp.array([seg]),
                                  'decoder_causal_attention': jnp.array(
                                      [[1] * n_prefix + [0] * (len(seg) - n_prefix)])})
    np.testing.assert_allclose(packed[start:start + len(seg)], np.asarray(alone)[0], atol=2e-5)
  assert np.isfinite(packed).all()


WIDTH = 12


def _unpadded_logits(model, params, prompt, continuation):
  """Logits of one row alone, no padding before it (a causal or prefix-LM row does not read
  the zeros after it: they fill a fixed width, one compiled program for every call)."""
  n, used = len(prompt), len(prompt) + len(continuation)
  tokens = jnp.array([list(prompt) + list(continuation) + [0] * (WIDTH - used)])
  prefix = jnp.array([[1] * n + [0] * (WIDTH - n)])
  logits = jax.jit(model.logits)(params, {'decoder_input_tokens': tokens,
                                          'decoder_causal_attention': prefix})
  return np.asarray(logits)[0, :used]


@pytest.mark.parametrize('bidirectional', [False, True])
def test_score_equals_log_softmax_of_each_row_alone(bidirectional):
  model, params = _model(inputs_bidirectional_attention=bidirectional)
  inputs = jnp.array([[5, 7, 9, 0], [3, 4, 0, 0]])       # right-padded with 0
  targets = jnp.array([[11, 12, 13], [14, 0, 0]])
  total, per_token = jax.jit(model.score)(params, inputs, targets)
  for row, (prompt, target) in enumerate((([5, 7, 9], [11, 12, 13]), ([3, 4], [14]))):
    logits = _unpadded_logits(model, params, prompt, target[:-1])[len(prompt) - 1:]
    log_probs = jax.nn.log_softmax(logits)[np.arange(len(target)), target]
    np.testing.assert_allclose(per_token[row, :len(target)], log_probs, atol=2e-5)
    np.testing.assert_allclose(total[row], log_probs.sum(), atol=5e-5)
  options = jax.jit(model.score_options)(params, inputs, jnp.stack([targets, targets[::-1]], axis=1))
  np.testing.assert_allclose(options[:, 0], total, atol=1e-5)


@pytest.mark.parametrize('bidirectional', [False, True])
def test_greedy_decode_through_the_cache_equals_full_forward_passes(bidirectional):
  model, params = _model(inputs_bidirectional_attention=bidirectional)
  inputs = jnp.array([[5, 7, 9, 2], [3, 4, 0, 0]])
  tokens, _ = decoding.decode(model, params, inputs, 5, eos_id=-1)
  for row, prompt in enumerate(([5, 7, 9, 2], [3, 4])):
    generated = []
    for _ in range(5):
      logits = _unpadded_logits(model, params, prompt, generated)[-1]
      generated.append(int(np.argmax(logits)))
    assert list(np.asarray(tokens[row])) == generated


def test_id_0_is_a_real_token_where_the_masks_say_so():
  """Llama's and Qwen's id 0 is "!": a prompt ending in it and targets holding it are read
  through the masks (the converters' model_inputs_mask / model_targets_mask), never as
  padding; without masks 0 stays padding (T5's vocabularies)."""
  model, params = _model()
  inputs = jnp.array([[5, 7, 0], [3, 0, 0]])
  inputs_mask = jnp.array([[1, 1, 1], [1, 1, 0]])          # both prompts end in token 0
  targets = jnp.array([[0, 12, 13], [14, 0, 0]])
  targets_mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  score = jax.jit(lambda *a: model.score(params, a[0], a[1], inputs_mask=a[2],
                                         targets_mask=a[3]))
  total, per_token = score(inputs, targets, inputs_mask, targets_mask)
  for row, (prompt, target) in enumerate((([5, 7, 0], [0, 12, 13]), ([3, 0], [14, 0]))):
    logits = _unpadded_logits(model, params, prompt, target[:-1])[len(prompt) - 1:]
    log_probs = jax.nn.log_softmax(logits)[np.arange(len(target)), target]
    np.testing.assert_allclose(per_token[row, :len(target)], log_probs, atol=2e-5)
    np.testing.assert_allclose(total[row], log_probs.sum(), atol=5e-5)
  options = model.score_options(params, inputs, targets[:, None], inputs_mask=inputs_mask,
                                options_mask=targets_mask[:, None])
  np.testing.assert_allclose(options[:, 0], total, atol=1e-5)
  unmasked, _ = model.score(params, inputs, targets)      # 0 = padding: other prompts
  assert not np.allclose(unmasked, total, atol=1e-3)
  tokens, _ = decoding.decode(model, params, inputs, 3, eos_id=-1, inputs_mask=inputs_mask)
  for row, prompt in enumerate(([5, 7, 0], [3, 0])):
    generated = []
    for _ in range(3):
      generated.append(int(np.argmax(_unpadded_logits(model, params, prompt, generated)[-1])))
    assert list(np.asarray(tokens[row])) == generated


def test_decode_steps_match_logits_and_follow_reordered_rows():
  model, params = _model()
  inputs = jnp.array([[5, 7, 9], [3, 4, 0]])
  context, cache = model.init_decode(params, inputs, 4, rows_per_input=2)
  step = jax.jit(model.decode_step)
  logits, cache = step(params, context, cache, jnp.zeros((4,), jnp.int32))
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)
  np.testing.assert_allclose(logits[2], _unpadded_logits(model, params, [3, 4], [])[-1],
                             atol=2e-5)
  # Row 1 of each input continues with another token; then both rows follow row 1.
  logits, cache = step(params, context, cache, jnp.array([10, 20, 30, 40]))
  cache = model.reorder_cache(cache, jnp.array([[1, 1], [0, 0]]))
  logits, cache = step(params, context, cache, jnp.array([50, 51, 52, 53]))
  for row, (prompt, history) in enumerate((([5, 7, 9], [20, 50]), ([5, 7, 9], [20, 51]),
                                           ([3, 4], [30, 52]), ([3, 4], [30, 53]))):
    np.testing.assert_allclose(logits[row], _unpadded_logits(model, params, prompt, history)[-1],
                               atol=2e-5)


def test_presets_have_published_parameter_counts():
  for name, count in decoder_presets.PUBLISHED.items():
    family, size = name.split('/')
    assert decoder_presets.num_params(decoder_presets.preset(family, size)) == count, name
  for name in ('llama3/1b', 'qwen3/0.6b', 'gemma/2b', 'qwen2_5/tiny'):
    config = decoder_presets.preset(*name.split('/'))
    assert families.build(config).param_count() == decoder_presets.num_params(config), name


def test_presets_count_what_transformers_builds_from_their_exported_configs():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from t5x_lite import hf_causal  # pylint: disable=import-outside-toplevel
  for name, count in decoder_presets.PUBLISHED.items():
    config = decoder_presets.preset(*name.split('/'))
    hf_config = transformers.AutoConfig.for_model(**hf_causal.config_to_hf(config))
    with torch.device('meta'):
      model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == count, name
    assert hf_causal.config_from_hf(hf_config.to_dict()) == config, name


def test_gin_files_build_the_presets():
  files = [f for d in ('llama', 'qwen2', 'qwen3', 'gemma')
           for f in sorted(glob.glob(f'{config_lib.GIN_CONFIGS}/models/{d}/*.gin'))]
  built = {}
  for path in files:
    gin.clear_config()
    try:
      config_lib.parse_gin([path], ['DROPOUT_RATE=0.0', "ACTIVATION_DTYPE='float32'"])
      built[path] = gin.query_parameter('%MODEL_CONFIG').scoped_configurable_fn()
    finally:
      gin.clear_config()
  assert len(built) == 14
  presets = set(decoder_presets.all_presets().values())
  assert all(config in presets for config in built.values())


def test_config_json_round_trip_and_tensor_parallel_rules():
  config = decoder_presets.preset('llama3', '1b')
  assert families.config_from_json(families.config_to_json(config)) == config
  import json  # pylint: disable=import-outside-toplevel
  assert families.config_from_json(json.loads(json.dumps(families.config_to_json(config)))) == config
  axes = families.build(TINY).logical_axes()
  specs = partitioning.param_specs(axes, partitioning.rules_for('tp'))
  assert tuple(specs['layers_0']['attention']['key']) == (None, 'tensor')
  assert tuple(specs['layers_0']['attention']['query']) == (None, 'tensor')
  assert tuple(specs['embedding']) == ('tensor', None)
