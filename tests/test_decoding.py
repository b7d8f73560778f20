"""Decoding: parity with transformers' generate, beam search, sampling, scoring, infer CLI."""

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

from t5x_lite import beam_search, decoding, hf, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 14


def _hf_model(seed, vocab_size=32):
  """A random model whose EOS (id 1) is likely enough that sequences end early."""
  torch.manual_seed(seed)
  config = transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64,
                                 num_layers=2, num_heads=4, feed_forward_proj='gated-gelu',
                                 tie_word_embeddings=False, dropout_rate=0.0,
                                 decoder_start_token_id=0)
  config.tie_word_embeddings = False
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.encoder.embed_tokens = model.shared
  model.decoder.embed_tokens = model.shared
  with torch.no_grad():
    model.lm_head.weight[1] *= 3.0   # EOS wins often enough for sequences to end early
  return model


@pytest.fixture(scope='module', params=[0, 1])
def pair(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(f'hf{request.param}')
  model = _hf_model(request.param)
  model.save_pretrained(str(path))
  config, params = hf.load(str(path))
  rng = np.random.default_rng(request.param)
  enc = rng.integers(2, config.vocab_size, (16, 9))
  enc[1, 4:] = 0
  enc[5, 2:] = 0
  return model, models.Transformer(config), params, enc


def _generate(model, enc, **kwargs):
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                         decoder_start_token_id=0, max_new_tokens=LENGTH, do_sample=False,
                         **kwargs).numpy()[:, 1:]
  return np.pad(out, ((0, 0), (0, LENGTH - out.shape[1])))


def _strip_after_eos(seqs):
  out = np.array(seqs)
  for row in out:
    eos = np.flatnonzero(row == 1)
    if len(eos):
      row[eos[0] + 1:] = 0
  return out


def _log_likelihood(model, params, enc, seqs):
  """Log-likelihood of generated sequences up to their first EOS (a generated 0 counts:
  `decoding.score` would take it for padding)."""
  logits = model.apply({'params': params}, enc, np.pad(seqs[:, :-1], ((0, 0), (1, 0))))
  logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), seqs[..., None], -1)[..., 0]
  first_eos = np.where((seqs == 1).any(1), (seqs == 1).argmax(1), seqs.shape[1] - 1)
  return np.array([row[:end + 1].sum() for row, end in zip(logp, first_eos)])


def test_greedy_tokens_equal_generate(pair):
  hf_model, model, params, enc = pair
  ours = np.asarray(jax.jit(lambda p, e: decoding.greedy_decode(model, p, e, LENGTH))(params, enc))
  theirs = _strip_after_eos(_generate(hf_model, enc, num_beams=1))
  np.testing.assert_array_equal(ours, theirs)
  assert (ours == 1).any(axis=1).sum() >= 3    # several sequences really end with EOS


def test_beam_search_is_at_least_as_likely_as_generate(pair):
  hf_model, model, params, enc = pair
  seqs, scores = jax.jit(lambda p, e: beam_search.beam_search(model, p, e, LENGTH, 4, alpha=0.0))(
      params, enc)
  ours = np.asarray(seqs[:, 0])
  theirs = _strip_after_eos(_generate(hf_model, enc, num_beams=4, length_penalty=0.0))
  ll_ours, ll_theirs = _log_likelihood(model, params, enc, ours), _log_likelihood(
      model, params, enc, theirs)
  np.testing.assert_allclose(np.asarray(scores[:, 0]), ll_ours, atol=1e-4)
  assert np.all(ll_ours >= ll_theirs - 1e-4)
  same = (ours == theirs).all(axis=1)
  print(f'beam: {same.sum()}/{len(same)} identical to generate; log-likelihood ours - HF: '
        f'{np.round(ll_ours - ll_theirs, 4).tolist()}')
  assert same.mean() >= 0.75


def test_every_beam_score_is_its_uncached_log_likelihood(pair):
  """All 4 beams, not only the best: each followed its parents through the decoder's slot
  history, so a wrong history entry would change some beam's score."""
  _, model, params, enc = pair
  seqs, scores = jax.jit(lambda p, e: beam_search.beam_search(model, p, e, LENGTH, 4, alpha=0.0))(
      params, enc)
  seqs = np.asarray(seqs).reshape(-1, LENGTH)
  expected = _log_likelihood(model, params, np.repeat(enc, 4, axis=0), seqs)
  np.testing.assert_allclose(np.asarray(scores).reshape(-1), expected, atol=1e-4)
  assert len({tuple(row) for row in seqs}) > 2 * len(enc)    # beams really differ


def test_score_equals_log_likelihood_from_hf_logits(pair):
  hf_model, model, params, enc = pair
  targets = np.random.default_rng(3).integers(2, 32, (16, 6))
  targets[:, -1] = 1
  targets[2, 3:] = 0
  total, per_token = jax.jit(lambda p, e, t: decoding.score(model, p, e, t))(params, enc, targets)
  labels = torch.tensor(np.where(targets == 0, -100, targets))
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                      labels=labels).logits
  logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
  expected = (logp * torch.tensor(targets != 0)).sum(-1).numpy()
  np.testing.assert_allclose(np.asarray(total), expected, atol=1e-4)
  assert (np.asarray(per_token)[targets == 0] == 0).all()


def test_cached_decoding_equals_uncached(pair):
  _, model, params, enc = pair
  tokens = np.asarray(decoding.greedy_decode(model, params, jnp.asarray(enc), LENGTH))
  # Uncached: re-run the full decoder on the prefix at every step.
  prefix = np.zeros((len(enc), 1), np.int32)
  for _ in range(LENGTH):
    logits = model.apply({'params': params}, enc, prefix)
    prefix = np.concatenate([prefix, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
  np.testing.assert_array_equal(tokens, _strip_after_eos(prefix[:, 1:]))


def test_sampling_reproducible_seeds_differ_and_top_k_1_is_greedy(pair):
  _, model, params, enc = pair

  def run(**kwargs):
    cfg = decoding.DecodingConfig(method='sample', **kwargs)
    return np.asarray(decoding.predict(model, params, jnp.asarray(enc), LENGTH, cfg)[0])
  a, b, c = run(seed=1, num_samples=2), run(seed=1, num_samples=2), run(seed=2, num_samples=2)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (16, 2, LENGTH) and (a != c).any()
  assert (a[:, 0] != a[:, 1]).any()                        # samples of one input differ
  greedy = np.asarray(decoding.greedy_decode(model, params, jnp.asarray(enc), LENGTH))
  np.testing.assert_array_equal(run(seed=5, top_k=1)[:, 0], greedy)
  np.testing.assert_array_equal(run(seed=5, top_p=1e-6)[:, 0], greedy)


def test_truncate_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.asarray(decoding.truncate_logits(logits, top_k=2)) > decoding.NEG_INF / 2
  assert kept.tolist() == [[True, True, False, False]]
  kept = np.asarray(decoding.truncate_logits(logits, top_p=0.7)) > decoding.NEG_INF / 2
  assert kept.tolist() == [[True, True, False, False]]     # 0.5 + 0.3 reaches 0.7
  kept = np.asarray(decoding.truncate_logits(logits, top_p=0.9)) > decoding.NEG_INF / 2
  assert kept.tolist() == [[True, True, True, False]]


def _cli(args):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  return subprocess.run([sys.executable, '-m', 't5x_lite.cli'] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_infer_cli_on_a_converted_hugging_face_model(tmp_path):
  import sentencepiece as spm
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(f'the quick brown fox {i} jumps over the lazy dog' for i in range(100)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / 'sp'),
                                 vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  config = models.preset('flan_t5', 'tiny', vocab_size=256)
  hf.save(config, models.init_params(config, jax.random.key(0)), str(tmp_path / 'hf'),
          spiece_model=str(tmp_path / 'sp.model'))
  out = _cli(['convert', f'--hf_dir={tmp_path / "hf"}', f'--model_dir={tmp_path / "m"}'])
  assert out.returncode == 0, out.stderr
  (tmp_path / 'in.txt').write_text('the quick fox\n\nover the dog\n')
  out = _cli(['infer', f'--model_dir={tmp_path / "m"}', f'--input_file={tmp_path / "in.txt"}',
              f'--output_file={tmp_path / "out.jsonl"}', '--max_decode_length=8',
              '--gin_file=gin_configs/decoding/beam4.gin'])
  assert out.returncode == 0, out.stderr
  rows = [json.loads(line) for line in open(tmp_path / 'out.jsonl')]
  assert [r['inputs'] for r in rows] == ['the quick fox', 'over the dog']
  assert all(isinstance(r['prediction'], str) and r['score'] <= 0 for r in rows)
  assert len(rows[0]['candidates']) == 4
  (tmp_path / 'score.jsonl').write_text(json.dumps({'inputs': 'the quick fox', 'targets': 'the dog'})
                                        + '\n' + json.dumps({'inputs': 'x'}) + '\n')
  out = _cli(['infer', f'--model_dir={tmp_path / "m"}', '--mode=score',
              f'--input_file={tmp_path / "score.jsonl"}', f'--output_file={tmp_path / "s.jsonl"}'])
  assert out.returncode != 0 and 'score.jsonl:2: score mode needs a string field "targets"' in \
      out.stderr


@pytest.mark.parametrize('mesh_shape, rules', [({'data': -1}, 'dp'),
                                                ({'data': 1, 'fsdp': 2, 'tensor': 4}, 'fsdp_tp')])
def test_sharded_decoding_equals_one_device(pair, mesh_shape, rules):
  """Greedy and beam search on 8 devices (params and KV cache sharded as the rules say, the
  beams' shared cache and slot-history table included) give one device's tokens and scores."""
  import flax.linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from t5x_lite import partitioning
  _, model, params, enc = pair
  mesh = partitioning.make_mesh(mesh_shape)
  rules = partitioning.rules_for(rules)
  specs = partitioning.param_specs(models.logical_axes(model.config), rules)
  sharded_params = jax.device_put(params, partitioning.to_shardings(specs, mesh))
  tokens = jax.device_put(jnp.asarray(enc), partitioning.batch_sharding(mesh))

  def run(fn):
    single = decoding.jit(fn)(params, jnp.asarray(enc))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      sharded = decoding.jit(fn, out_shardings=NamedSharding(mesh, P()))(sharded_params, tokens)
    return jax.tree.map(np.asarray, single), jax.tree.map(np.asarray, sharded)

  single, sharded = run(lambda p, e: decoding.greedy_decode(model, p, e, LENGTH))
  np.testing.assert_array_equal(sharded, single)
  single, sharded = run(lambda p, e: beam_search.beam_search(model, p, e, LENGTH, 4, alpha=0.6))
  np.testing.assert_array_equal(sharded[0], single[0])
  np.testing.assert_allclose(sharded[1], single[1], atol=1e-4)
