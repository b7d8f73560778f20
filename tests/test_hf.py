"""Hugging Face interop: exact logit parity, bit-identical round trips, clear errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from t5x_lite import hf, models
from tests.hf_models import STYLES, make_hf_model, save_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _padded_batch(vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab_size, (4, 13))
  enc[0, 8:] = 0   # padding of different lengths
  enc[2, 3:] = 0
  dec = rng.integers(2, vocab_size, (4, 7))
  dec[:, 0] = 0    # decoder start token
  dec[1, 5:] = 0
  return enc, dec


def _hf_logits(model, enc, dec):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                decoder_input_ids=torch.tensor(dec))
  return out.logits.float().numpy()


def _our_logits(config, params, enc, dec):
  apply = jax.jit(models.Transformer(config).apply)
  return np.asarray(apply({'params': params}, jnp.asarray(enc), jnp.asarray(dec)))


@pytest.mark.parametrize('style', sorted(STYLES))
def test_logit_parity_with_transformers(style, tmp_path):
  model = save_hf_model(style, tmp_path)
  config, params = hf.load(str(tmp_path))
  assert (config.tie_word_embeddings, config.scale_decoder_outputs) == STYLES[style][3:]
  enc, dec = _padded_batch(config.vocab_size)
  theirs, ours = _hf_logits(model, enc, dec), _our_logits(config, params, enc, dec)
  err = np.abs(ours - theirs).max()
  print(f'{style}: max |dlogit| = {err:.3g} (max |logit| {np.abs(theirs).max():.3g})')
  assert err <= 1e-4


def assert_same_tensors(original_dir, written_dir):
  """The same tensor names, dtypes and bits in two safetensors directories."""
  original = load_file(str(original_dir / hf.SAFETENSORS))
  written = load_file(str(written_dir / hf.SAFETENSORS))
  assert sorted(written) == sorted(original)
  for name, tensor in original.items():
    assert written[name].dtype == tensor.dtype and np.array_equal(written[name], tensor), name


@pytest.mark.parametrize('style', sorted(STYLES))
def test_round_trip_is_bit_identical(style, tmp_path):
  model = save_hf_model(style, tmp_path / 'hf')
  config, params = hf.load(str(tmp_path / 'hf'))
  hf.save(config, params, str(tmp_path / 'out'))
  assert_same_tensors(tmp_path / 'hf', tmp_path / 'out')
  # transformers loads our directory with nothing missing and computes the same logits.
  reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
      str(tmp_path / 'out'), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  enc, dec = _padded_batch(config.vocab_size, seed=1)
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), enc, dec), _hf_logits(model, enc, dec))
  assert hf.load(str(tmp_path / 'out'))[0] == config


def test_sharded_safetensors_both_ways(tmp_path):
  save_hf_model('flan_t5', tmp_path / 'hf', max_shard_size='30KB')
  assert os.path.exists(tmp_path / 'hf' / hf.SAFETENSORS_INDEX)
  config, params = hf.load(str(tmp_path / 'hf'))
  save_hf_model('flan_t5', tmp_path / 'single')
  _, single = hf.load(str(tmp_path / 'single'))
  np.testing.assert_equal(params, single)
  hf.save(config, params, str(tmp_path / 'out'), max_shard_bytes=40_000)
  index = json.load(open(tmp_path / 'out' / hf.SAFETENSORS_INDEX))
  assert len(set(index['weight_map'].values())) > 1
  _, info = transformers.T5ForConditionalGeneration.from_pretrained(
      str(tmp_path / 'out'), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  np.testing.assert_equal(hf.load(str(tmp_path / 'out'))[1], params)


def test_pytorch_bin_is_read_with_weights_only(tmp_path):
  model = make_hf_model('t5_v1_0')
  model.config.save_pretrained(str(tmp_path))
  torch.save(model.state_dict(), tmp_path / hf.TORCH_BIN)  # includes the tied copies
  config, params = hf.load(str(tmp_path))
  enc, dec = _padded_batch(config.vocab_size)
  assert np.abs(_our_logits(config, params, enc, dec) - _hf_logits(model, enc, dec)).max() <= 1e-4


def _edit(tmp_path, edit_tensors=None, edit_config=None, style='flan_t5'):
  model = save_hf_model(style, tmp_path)
  if edit_tensors:
    tensors = load_file(str(tmp_path / hf.SAFETENSORS))
    edit_tensors(tensors)
    save_file(tensors, str(tmp_path / hf.SAFETENSORS))
  if edit_config:
    cfg = json.load(open(tmp_path / 'config.json'))
    edit_config(cfg)
    json.dump(cfg, open(tmp_path / 'config.json', 'w'))
  return model


def _pop(*keys):
  return lambda d: [d.pop(k) for k in keys]


def _assert_same_function_as_transformers(path):
  """Our reading of `path` computes what transformers' own reading of it computes."""
  config, params = hf.load(str(path))
  reference = transformers.T5ForConditionalGeneration.from_pretrained(str(path)).eval()
  enc, dec = _padded_batch(config.vocab_size)
  theirs = _hf_logits(reference, enc, dec)
  assert np.abs(_our_logits(config, params, enc, dec) - theirs).max() <= 1e-4
  return config, theirs


@pytest.mark.parametrize('style,keys,expected', [
    ('t5_v1_0', ('scale_decoder_outputs',), (True, True)),
    ('t5_v1_0', ('scale_decoder_outputs', 'tie_word_embeddings'), (True, True)),
    ('flan_t5', ('scale_decoder_outputs',), (False, False)),
])
def test_transformers_4_configs_without_scale_decoder_outputs(tmp_path, style, keys, expected):
  model = _edit(tmp_path, edit_config=_pop(*keys), style=style)
  config, theirs = _assert_same_function_as_transformers(tmp_path)
  assert (config.tie_word_embeddings, config.scale_decoder_outputs) == expected
  enc, dec = _padded_batch(config.vocab_size)
  np.testing.assert_allclose(theirs, _hf_logits(model, enc, dec), atol=1e-5)  # as written


def test_tied_copies_must_equal_shared(tmp_path):
  def copies(t):  # older files carry them: accepted when equal
    t['lm_head.weight'] = t['shared.weight'].copy()
    t['encoder.embed_tokens.weight'] = t['shared.weight'].copy()
  _edit(tmp_path, copies, style='t5_v1_0')
  assert hf.load(str(tmp_path))[0].tie_word_embeddings
  _edit(tmp_path, lambda t: (copies(t), t.update(
      {'encoder.embed_tokens.weight': t['shared.weight'] + 1})), style='t5_v1_0')
  with pytest.raises(hf.ConversionError,
                     match="'encoder.embed_tokens.weight' differs from shared.weight"):
    hf.load(str(tmp_path))


def test_an_own_lm_head_beside_tie_word_embeddings_true(tmp_path):
  """transformers 5 unties a stored lm_head that differs from `shared` (and keeps the
  scaling its config says); with a transformers-4 config (no scale_decoder_outputs) 4 would
  ignore that lm_head and 5 use it: refused."""
  own_lm_head = lambda t: t.update(
      {'lm_head.weight': np.ascontiguousarray(t['shared.weight'][::-1])})
  _edit(tmp_path, own_lm_head, style='t5_v1_0')
  config, _ = _assert_same_function_as_transformers(tmp_path)
  assert (config.tie_word_embeddings, config.scale_decoder_outputs) == (False, True)
  _edit(tmp_path, own_lm_head, _pop('scale_decoder_outputs'), style='t5_v1_0')
  with pytest.raises(hf.ConversionError, match="'lm_head.weight' differs from shared.weight"):
    hf.load(str(tmp_path))


def test_non_boolean_output_layer_keys_are_refused(tmp_path):
  _edit(tmp_path, edit_config=lambda c: c.update(scale_decoder_outputs='yes'))
  with pytest.raises(hf.ConversionError, match="scale_decoder_outputs='yes'"):
    hf.load(str(tmp_path))


def test_configs_without_scale_decoder_outputs_keep_their_meaning():
  """Checkpoint metas and gin files written before the field: scaling goes with tying."""
  for tied in (True, False):
    meta = dataclasses.asdict(models.preset('t5_1_0' if tied else 'flan_t5', 'tiny'))
    assert meta.pop('scale_decoder_outputs') is tied
    assert models.T5Config(**meta).scale_decoder_outputs is tied


@pytest.mark.parametrize('edit_tensors,edit_config,message', [
    (lambda t: t.pop('decoder.block.1.layer.2.DenseReluDense.wi_1.weight'), None,
     "tensor 'decoder.block.1.layer.2.DenseReluDense.wi_1.weight' is missing"),
    (lambda t: t.update({'encoder.block.9.layer.0.SelfAttention.q.weight': np.zeros((2, 2))}),
     None, "unexpected tensor 'encoder.block.9.layer.0.SelfAttention.q.weight'"),
    (None, lambda c: c.update(d_ff=96),
     r"tensor 'encoder.block.0.layer.1.DenseReluDense.wi_0.weight' has shape \(80, 48\), "
     r"config.json implies \(96, 48\)"),
    (None, lambda c: c.update(model_type='bart'), "model_type='bart'"),
    (lambda t: t.pop('lm_head.weight'), None, "tensor 'lm_head.weight' is missing"),
])
def test_bad_checkpoints_name_the_problem(tmp_path, edit_tensors, edit_config, message):
  _edit(tmp_path, edit_tensors, edit_config)
  with pytest.raises(hf.ConversionError, match=message):
    hf.load(str(tmp_path))


def test_missing_files_and_unreadable_weights(tmp_path):
  with pytest.raises(hf.ConversionError, match='no config.json'):
    hf.load(str(tmp_path))
  make_hf_model('flan_t5').config.save_pretrained(str(tmp_path))
  with pytest.raises(hf.ConversionError, match='holds no weights'):
    hf.load(str(tmp_path))
  (tmp_path / hf.SAFETENSORS).write_bytes(b'not a safetensors file')
  with pytest.raises(hf.ConversionError, match='cannot read'):
    hf.load(str(tmp_path))


def test_sentencepiece_vocab_is_exported(tmp_path):
  import sentencepiece as spm
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(f'the quick brown fox {i} jumps over the lazy dog {i * 7}'
                              for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / 'sp'),
                                 vocab_size=60, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  config = models.preset('flan_t5', 'tiny', vocab_size=160)
  params = models.init_params(config, jax.random.key(0))
  hf.save(config, params, str(tmp_path / 'out'), spiece_model=str(tmp_path / 'sp.model'))
  assert (tmp_path / 'out' / 'spiece.model').read_bytes() == (tmp_path / 'sp.model').read_bytes()
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'out'))
  ids = tok('the lazy dog').input_ids
  assert ids[-1] == 1 and tok.decode(ids, skip_special_tokens=True) == 'the lazy dog'


def test_library_runs_without_torch_or_transformers(tmp_path):
  save_hf_model('flan_t5', tmp_path / 'hf')
  code = f"""
import sys
sys.modules['torch'] = None          # any import of torch or transformers now fails
sys.modules['transformers'] = None
import t5x_lite, t5x_lite.cli, t5x_lite.config, t5x_lite.hf, t5x_lite.models
config, params = t5x_lite.hf.load({str(tmp_path / 'hf')!r})
t5x_lite.hf.save(config, params, {str(tmp_path / 'out')!r})
print('ok', config.d_model)
"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[-2:] == ['ok', '48']


@pytest.mark.parametrize('style', ['t5_v1_0', 'flan_t5'])
def test_logit_parity_beyond_the_bucket_range(style, tmp_path):
  """Inputs of 300 and targets of 150 tokens: relative distances past max_distance (128)
  fall in the last bucket, both bidirectional (encoder) and causal (decoder)."""
  model = save_hf_model(style, tmp_path)
  config, params = hf.load(str(tmp_path))
  assert config.relative_attention_max_distance == 128
  rng = np.random.default_rng(3)
  enc = rng.integers(2, config.vocab_size, (2, 300))
  enc[1, 200:] = 0
  dec = rng.integers(2, config.vocab_size, (2, 150))
  dec[:, 0] = 0
  theirs, ours = _hf_logits(model, enc, dec), _our_logits(config, params, enc, dec)
  assert np.abs(ours - theirs).max() <= 1e-4


def test_bfloat16_checkpoint_round_trip(tmp_path):
  """A bf16 checkpoint saved by transformers loads as bf16 arrays, computes what transformers
  computes (exactly in fp32 from the same bf16 weights; within bf16 rounding in bf16), and
  saves back bit-identical."""
  model = save_hf_model('flan_t5', tmp_path / 'hf', dtype=torch.bfloat16)
  config, params = hf.load(str(tmp_path / 'hf'))
  assert config.param_dtype == 'bfloat16'
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  enc, dec = _padded_batch(config.vocab_size)
  exact = _hf_logits(model.float(), enc, dec)
  assert np.abs(_our_logits(config, params, enc, dec) - exact).max() <= 1e-4
  theirs = _hf_logits(model.to(torch.bfloat16), enc, dec)
  ours = _our_logits(config.replace(dtype='bfloat16'), params, enc, dec)
  scale = np.abs(exact).max()
  print(f'bf16: max |dlogit| ours {np.abs(ours - exact).max() / scale:.3g}, '
        f'transformers {np.abs(theirs - exact).max() / scale:.3g} (of max |logit| {scale:.3g})')
  assert np.abs(ours - theirs).max() <= 0.03 * scale
  hf.save(config, params, str(tmp_path / 'out'))
  assert_same_tensors(tmp_path / 'hf', tmp_path / 'out')
  assert json.load(open(tmp_path / 'out' / 'config.json'))['dtype'] == 'bfloat16'
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / 'out'))
  assert next(reloaded.parameters()).dtype == torch.bfloat16
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), enc, dec), theirs)
