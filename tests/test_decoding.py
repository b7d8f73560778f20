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

from t5x_lite import decoding, hf, models
from t5x_lite.decoding import beam_search
from tests.conftest import xla_flags

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
  return model, models.build(config), params, enc


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
  `Model.score` would take it for padding)."""
  logits = model.module.apply({'params': params}, enc, np.pad(seqs[:, :-1], ((0, 0), (1, 0))))
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
  """With generate's end (beams cut by the length compete with finished ones)."""
  hf_model, model, params, enc = pair
  seqs, scores = jax.jit(lambda p, e: beam_search.beam_search(model, p, e, LENGTH, 4, alpha=0.0,
                                                              end='hf'))(params, enc)
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
  history, so a wrong history entry would change some beam's score. (end='hf': every slot
  holds a sequence; T5X's end can leave finished slots empty.)"""
  _, model, params, enc = pair
  seqs, scores = jax.jit(lambda p, e: beam_search.beam_search(model, p, e, LENGTH, 4, alpha=0.0,
                                                              end='hf'))(params, enc)
  seqs = np.asarray(seqs).reshape(-1, LENGTH)
  expected = _log_likelihood(model, params, np.repeat(enc, 4, axis=0), seqs)
  np.testing.assert_allclose(np.asarray(scores).reshape(-1), expected, atol=1e-4)
  assert len({tuple(row) for row in seqs}) > 2 * len(enc)    # beams really differ


def _bigram_model(transition_logits):
  """A model whose next-token logits depend only on the previous token: row t of
  `transition_logits` [V, V]. The decoder's attention and MLP outputs are zeroed, token t
  embeds as a one-hot (RMS-normalised to sqrt(V) e_t), and the output layer divides by sqrt(V)."""
  v = transition_logits.shape[0]
  config = models.T5Config(vocab_size=v, d_model=v, num_heads=1, d_kv=4, d_ff=4,
                           num_encoder_layers=1, num_decoder_layers=1,
                           feed_forward_proj='gated-gelu', tie_word_embeddings=False)
  params = jax.tree.map(np.asarray, models.init_params(config, jax.random.key(0)))
  layer = params['decoder']['layers_0']
  for name in ('self_attention', 'encoder_decoder_attention'):
    layer[name]['out'] = np.zeros_like(layer[name]['out'])
  layer['mlp']['wo'] = np.zeros_like(layer['mlp']['wo'])
  params['token_embedder']['embedding'] = np.eye(v, dtype=np.float32)
  params['decoder']['decoder_norm']['scale'] = np.ones(v, np.float32)
  params['decoder']['logits_dense'] = np.asarray(transition_logits, np.float32) / np.sqrt(v)
  return models.build(config), params


def _transitions(eos_after_start):
  """Start (0) -> token 2 likely, EOS with logit `eos_after_start`; tokens 2..7 repeat
  themselves and never end (EOS logit -30)."""
  logits = np.zeros((8, 8), np.float32)
  logits[:, 0] = logits[:, 1] = -30.0
  logits[0, 2], logits[0, 1] = 5.0, eos_after_start
  for t in range(2, 8):
    logits[t, t] = 5.0
  return logits


def _beams(model, params, alpha, end, length=3):
  enc = jnp.asarray([[2, 3, 4], [5, 6, 0]])
  seqs, scores = jax.jit(lambda p, e: beam_search.beam_search(
      model, p, e, length, num_beams=2, alpha=alpha, end=end))(params, enc)
  return np.asarray(seqs), np.asarray(scores)


def test_beam_end_t5x_returns_finished_beams_over_better_cut_ones():
  """0 -> EOS finishes at log p = -2.16; 0 -> 2 2 2 is cut by the length at -0.22: T5X's end
  returns the finished one (its other slot stays empty), generate's end the cut one."""
  model, params = _bigram_model(_transitions(eos_after_start=3.0))
  log_p = jax.nn.log_softmax(_transitions(3.0), axis=-1)
  finished, cut = float(log_p[0, 1]), float(log_p[0, 2] + 2 * log_p[2, 2])
  assert cut > finished + 1
  seqs, scores = _beams(model, params, 0.0, 't5x')
  for row, row_scores in zip(seqs, scores):
    np.testing.assert_array_equal(row, [[1, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(row_scores, [finished, beam_search.NEG_INF], atol=1e-4)
  seqs, scores = _beams(model, params, 0.0, 'hf')
  np.testing.assert_array_equal(seqs[:, 0], [[2, 2, 2]] * 2)
  np.testing.assert_array_equal(seqs[:, 1], [[1, 0, 0]] * 2)
  np.testing.assert_allclose(scores, [[cut, finished]] * 2, atol=1e-4)


def test_beam_end_t5x_returns_live_beams_when_none_finished():
  """No EOS ever ranks in the top 2K: T5X returns the live beams with their log-likelihoods
  (no brevity penalty), generate's end the same beams with the penalty at max length."""
  model, params = _bigram_model(_transitions(eos_after_start=-30.0))
  log_p = np.asarray(jax.nn.log_softmax(_transitions(-30.0), axis=-1))
  seqs, scores = _beams(model, params, 0.6, 't5x')
  np.testing.assert_array_equal(seqs[:, 0], [[2, 2, 2]] * 2)
  expected = [[log_p[0, row[0]] + log_p[row[0], row[1]] + log_p[row[1], row[2]] for row in beams]
              for beams in seqs]
  np.testing.assert_allclose(scores, expected, atol=1e-4)
  hf_seqs, hf_scores = _beams(model, params, 0.6, 'hf')
  np.testing.assert_array_equal(hf_seqs, seqs)
  np.testing.assert_allclose(hf_scores, scores / ((5 + 3) / 6) ** 0.6, atol=1e-4)


def test_decoding_config_names_the_beam_ends():
  assert decoding.DecodingConfig().beam_end == 't5x'
  with pytest.raises(ValueError, match="beam_end 'generate'.*'t5x'.*'hf'"):
    decoding.DecodingConfig(method='beam', beam_end='generate')


def test_score_equals_log_likelihood_from_hf_logits(pair):
  hf_model, model, params, enc = pair
  targets = np.random.default_rng(3).integers(2, 32, (16, 6))
  targets[:, -1] = 1
  targets[2, 3:] = 0
  total, per_token = jax.jit(lambda p, e, t: model.score(p, e, t))(params, enc, targets)
  labels = torch.tensor(np.where(targets == 0, -100, targets))
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                      labels=labels).logits
  logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
  expected = (logp * torch.tensor(targets != 0)).sum(-1).numpy()
  np.testing.assert_allclose(np.asarray(total), expected, atol=1e-4)
  assert (np.asarray(per_token)[targets == 0] == 0).all()


def test_score_options_equals_scoring_each_pair(pair):
  """One encoder pass per input, every option decoded against it: the scores of `score` on
  each (input, option) pair, which re-encodes the input per option; padding options score 0."""
  _, model, params, enc = pair
  options = np.random.default_rng(4).integers(2, 32, (16, 3, 5))
  options[:, :, -1] = 1
  options[3, 1, 2:] = 0                    # a shorter option
  options[7, 2] = 0                        # an example with two options
  got = np.asarray(jax.jit(lambda p, e, o: model.score_options(p, e, o))(
      params, enc, options))
  pairs = jax.jit(lambda p, e, t: model.score(p, e, t)[0])(
      params, np.repeat(enc, 3, axis=0), options.reshape(48, 5))
  assert got.shape == (16, 3) and got[7, 2] == 0
  np.testing.assert_allclose(got, np.asarray(pairs).reshape(16, 3), rtol=1e-5, atol=1e-5)


def test_decoding_stops_when_every_row_ended_and_at_the_limit(pair, monkeypatch):
  """The loop runs until the last row's EOS, not the full length; `limit` (traced) decodes
  what a shorter max_decode_length would, zeros after."""
  _, model, params, enc = pair
  steps = []
  step = type(model).decode_step

  def counted(*args):
    jax.debug.callback(lambda: steps.append(1))
    return step(*args)
  greedy = lambda p, e: decoding.greedy_decode(model, p, e, LENGTH)
  tokens = np.asarray(jax.jit(greedy)(params, enc))
  ends = np.array([np.flatnonzero(row == 1)[0] if (row == 1).any() else LENGTH for row in tokens])
  ended = enc[ends < LENGTH - 2]             # the rows whose EOS comes early
  monkeypatch.setattr(type(model), 'decode_step', counted)
  jax.jit(greedy)(params, ended).block_until_ready()
  assert len(ended) >= 4 and len(steps) == ends[ends < LENGTH - 2].max() + 1 < LENGTH - 1
  monkeypatch.undo()
  got, scores = (np.asarray(x) for x in jax.jit(
      lambda p, e, n: decoding.decode(model, p, e, LENGTH, limit=n))(params, enc, np.int32(4)))
  want, want_scores = jax.jit(lambda p, e: decoding.decode(model, p, e, 4))(params, enc)
  np.testing.assert_array_equal(got, np.pad(np.asarray(want), ((0, 0), (0, LENGTH - 4))))
  np.testing.assert_allclose(scores, np.asarray(want_scores), rtol=1e-5)


def test_cached_decoding_equals_uncached(pair):
  _, model, params, enc = pair
  tokens = np.asarray(decoding.greedy_decode(model, params, jnp.asarray(enc), LENGTH))
  # Uncached: re-run the full decoder on the prefix at every step. One compiled program: the
  # prefix is padded to its final length (the decoder is causal: position i sees 0..i only).
  apply = jax.jit(lambda p, e, d: model.module.apply({'params': p}, e, d))
  prefix = np.zeros((len(enc), LENGTH + 1), np.int32)
  for i in range(LENGTH):
    prefix[:, i + 1] = np.argmax(np.asarray(apply(params, enc, prefix))[:, i], -1)
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
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags()}
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
  # Up to 4 beams: T5X's end leaves the slots of beams that never finished empty (not listed).
  assert all(1 <= len(r['candidates']) <= 4 for r in rows)
  assert all(c['score'] > -1e6 for r in rows for c in r['candidates'])
  assert rows[0]['candidates'][0]['prediction'] == rows[0]['prediction']
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
