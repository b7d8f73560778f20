"""The T5 model: packing, KV-cache decoding, presets, logical axes, dtypes, dropout, remat."""

import glob
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from t5x_lite import config as gin_config
from t5x_lite import models
from t5x_lite.models.layers import relative_position_bucket_table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGICAL_AXES = {'vocab', 'embed', 'mlp', 'heads', 'kv', 'joined_kv', 'relpos_buckets'}


@pytest.fixture(scope='module', params=['t5_1_0', 'flan_t5'])
def tiny(request):
  config = models.preset(request.param, 'tiny')
  return config, models.Transformer(config), models.init_params(config, jax.random.key(1))


def jitted_apply(model):
  return jax.jit(model.apply, static_argnames=('enable_dropout', 'method'))


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (16, 20), (64, 256)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
  rel = torch.arange(-2 * max_distance, 2 * max_distance + 1)
  theirs = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
  table = relative_position_bucket_table(bidirectional, num_buckets, max_distance)
  ours = table[np.clip(rel.numpy(), -max_distance, max_distance) + max_distance]
  np.testing.assert_array_equal(ours, theirs.numpy())


def _shift(targets):
  return np.concatenate([[0], targets[:-1]])


def test_packed_row_equals_separate_rows(tiny):
  config, model, params = tiny
  rng = np.random.default_rng(0)
  examples = [(rng.integers(3, config.vocab_size, n), rng.integers(3, config.vocab_size, m))
              for n, m in ((5, 4), (7, 3), (2, 6))]
  apply = jitted_apply(model)
  alone = [np.asarray(apply({'params': params}, i[None], _shift(t)[None]))[0]
           for i, t in examples]
  packed = {k: np.zeros((1, 18 if k.startswith('enc') else 16), np.int32)
            for k in ('enc', 'enc_seg', 'enc_pos', 'dec', 'dec_seg', 'dec_pos')}
  e = d = 0
  for seg, (inputs, targets) in enumerate(examples, start=1):
    packed['enc'][0, e:e + len(inputs)] = inputs
    packed['enc_seg'][0, e:e + len(inputs)] = seg
    packed['enc_pos'][0, e:e + len(inputs)] = np.arange(len(inputs))
    packed['dec'][0, d:d + len(targets)] = _shift(targets)
    packed['dec_seg'][0, d:d + len(targets)] = seg
    packed['dec_pos'][0, d:d + len(targets)] = np.arange(len(targets))
    e, d = e + len(inputs), d + len(targets)
  logits = np.asarray(apply(
      {'params': params}, packed['enc'], packed['dec'], encoder_segment_ids=packed['enc_seg'],
      decoder_segment_ids=packed['dec_seg'], encoder_positions=packed['enc_pos'],
      decoder_positions=packed['dec_pos']))[0]
  d = 0
  for (_, targets), expected in zip(examples, alone):
    np.testing.assert_allclose(logits[d:d + len(targets)], expected, atol=1e-5, rtol=0)
    d += len(targets)


def test_kv_cache_decode_equals_full_forward(tiny):
  config, model, params = tiny
  rng = np.random.default_rng(1)
  enc = jnp.asarray(rng.integers(3, config.vocab_size, (3, 11))).at[1, 6:].set(0)
  dec = jnp.asarray(rng.integers(3, config.vocab_size, (3, 9))).at[:, 0].set(0)
  apply = jitted_apply(model)
  full = apply({'params': params}, enc, dec)
  interface = models.build(config)
  context, cache = interface.init_decode(params, enc, max_decode_length=9)
  step = jax.jit(lambda c, tok: interface.decode_step(params, context, c, tok))
  for t in range(9):
    logits, cache = step(cache, dec[:, t])
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
  assert int(cache['decoder']['position']) == 9


@pytest.mark.parametrize('family,size,published', [
    ('flan_t5', 'small', 76_961_152),    # google/flan-t5-small
    ('flan_t5', 'base', 247_577_856),    # google/flan-t5-base
    ('t5_1_0', 'small', 60_506_624),     # google-t5/t5-small (tied)
    ('t5_1_0', 'base', 222_903_552),     # google-t5/t5-base
    ('mt5', 'small', 300_176_768),       # google/mt5-small
    ('byt5', 'small', 299_637_760),      # google/byt5-small
])
def test_preset_parameter_counts_match_published(family, size, published):
  config = models.preset(family, size)
  assert models.param_count(config) == published
  assert models.num_params(config) == published


def test_closed_form_count_matches_model_for_every_tiny_preset():
  for family in models.FAMILIES:
    config = models.preset(family, 'tiny')
    assert models.num_params(config) == models.param_count(config)
    assert 100_000 < models.num_params(config) < 1_000_000


def test_unknown_preset_names_close_matches():
  with pytest.raises(ValueError, match=r"Unknown model family 'flan-t5'.*\['flan_t5'"):
    models.preset('flan-t5', 'small')
  with pytest.raises(ValueError, match=r"Unknown model size 'smal'.*\['small'\]"):
    models.preset('mt5', 'smal')
  with pytest.raises(ValueError, match='gated-ACT'):
    models.preset('mt5', 'small', feed_forward_proj='gelu-gated')


def test_gin_model_configs_equal_the_presets():
  files = sorted(f for family in models.FAMILIES   # (decoder-only gin: test_decoder_only.py)
                 for f in glob.glob(os.path.join(REPO, f'gin_configs/models/{family}/*.gin')))
  assert len(files) == len(models.FAMILIES) * len(models.SIZES)
  for path in files:
    family, size = path.split(os.sep)[-2], os.path.basename(path)[:-4]
    gin.clear_config()
    gin_config.parse_gin([path], ['DROPOUT_RATE=0.1', 'ACTIVATION_DTYPE="float32"'])
    assert gin_config.model_config() == models.preset(family, size, dropout_rate=0.1), path
  gin.clear_config()


def test_every_parameter_has_logical_axes():
  config = models.preset('flan_t5', 'tiny')
  shapes = nn.unbox(models.abstract_params(config))
  axes = models.logical_axes(config)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree.leaves(shapes)
  assert len(flat_axes) == len(flat_shapes) > 0
  for spec, shape in zip(flat_axes, flat_shapes):
    assert len(spec) == len(shape.shape) and set(spec) <= LOGICAL_AXES, (spec, shape)


def test_bfloat16_activations_keep_float32_params():
  config = models.preset('flan_t5', 'tiny', dtype='bfloat16')
  params = models.init_params(config, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  model = models.Transformer(config)
  enc = jnp.arange(2, 14).reshape(2, 6)
  dec = jnp.arange(3, 11).reshape(2, 4)
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({'params': p}, enc, dec))(params))
  assert 'dot_general' in jaxpr and 'bf16[2,6,4,16]' in jaxpr  # q/k/v projections in bf16
  logits = jitted_apply(model)({'params': params}, enc, dec)
  reference = jitted_apply(models.Transformer(config.replace(dtype='float32')))(
      {'params': params}, enc, dec)
  assert logits.dtype == jnp.float32
  assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


def test_dropout_is_off_unless_enabled():
  config = models.preset('flan_t5', 'tiny', dropout_rate=0.3)
  model = models.Transformer(config)
  params = models.init_params(config, jax.random.key(0))
  enc, dec = jnp.arange(2, 14).reshape(2, 6), jnp.arange(3, 11).reshape(2, 4)
  apply = jitted_apply(model)
  eval_logits = apply({'params': params}, enc, dec)
  plain = jitted_apply(models.Transformer(config.replace(dropout_rate=0.0)))(
      {'params': params}, enc, dec)
  np.testing.assert_array_equal(eval_logits, plain)

  def train(seed):
    return apply({'params': params}, enc, dec, enable_dropout=True,
                 rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_array_equal(train(1), train(1))
  assert np.abs(train(1) - train(2)).max() > 1e-3
  assert np.abs(train(1) - eval_logits).max() > 1e-3


def test_remat_gives_the_same_gradients():
  config = models.preset('t5_1_0', 'tiny')
  params = models.init_params(config, jax.random.key(0))
  enc, dec = jnp.arange(2, 14).reshape(2, 6), jnp.arange(3, 11).reshape(2, 4)

  def grads(cfg):
    loss = lambda p: jnp.mean(models.Transformer(cfg).apply({'params': p}, enc, dec) ** 2)
    return jax.jit(jax.grad(loss))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads(config), grads(config.replace(remat=True)))
