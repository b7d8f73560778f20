"""Decoding and scoring of the decoder-only family against transformers (#32 part 4): greedy
token ids equal `generate` on a batch of prompts of different lengths (left-padded on their
side, right-padded with a mask on ours), beam search's best sequence equals `generate`'s with
`num_beams` (no length penalty), and `score` equals transformers' per-token log-probabilities.
Prompts and targets hold id 0, a real token of these vocabularies (Llama's "!")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from t5x_lite import decoding, hf_causal, models  # pylint: disable=wrong-import-position
from tests.models.test_hf_causal import ARCHS, VOCAB, _randomize  # pylint: disable=wrong-import-position

EOS = 3
PROMPTS = [[5, 9, 0, 17, 42, 8, 0], [11, 0, 23], [64, 2, 90, 90, 7]]   # two end in token 0
NEW_TOKENS = 8


@pytest.fixture(scope='module', params=['llama', 'gemma'])
def pair(request, tmp_path_factory):
  """(ours: model, params; theirs: the transformers model), the same random weights."""
  config_cls, model_cls, kwargs = ARCHS[request.param]
  config = config_cls(vocab_size=VOCAB, intermediate_size=64, num_hidden_layers=2,
                      max_position_embeddings=64, eos_token_id=EOS, pad_token_id=1,
                      bos_token_id=2, **kwargs)
  hf_model = model_cls(config).eval()
  _randomize(hf_model, seed=7, gemma=request.param == 'gemma')
  path = str(tmp_path_factory.mktemp(request.param))
  hf_model.save_pretrained(path)
  ours_config, params = hf_causal.load(path)
  return models.build(ours_config), params, hf_model


def _ours_inputs():
  width = max(map(len, PROMPTS))
  ids = np.zeros((len(PROMPTS), width), np.int32)
  mask = np.zeros_like(ids, dtype=bool)
  for r, p in enumerate(PROMPTS):
    ids[r, :len(p)], mask[r, :len(p)] = p, True
  return jnp.asarray(ids), jnp.asarray(mask)


def _hf_inputs():
  """Left-padded, as generate wants prompts of different lengths."""
  width = max(map(len, PROMPTS))
  ids = torch.full((len(PROMPTS), width), 1, dtype=torch.long)
  mask = torch.zeros_like(ids)
  for r, p in enumerate(PROMPTS):
    ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
  return ids, mask


def _until_eos(tokens) -> list[int]:
  out = []
  for t in np.asarray(tokens).tolist():
    out.append(t)
    if t == EOS:
      break
  return out


def _hf_generate(hf_model, **kwargs) -> list[list[int]]:
  ids, mask = _hf_inputs()
  with torch.no_grad():
    out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                            eos_token_id=EOS, pad_token_id=1, **kwargs)
  return [_until_eos(row[ids.shape[1]:]) for row in out.numpy()]


def test_greedy_ids_equal_transformers_generate(pair):
  model, params, hf_model = pair
  ids, mask = _ours_inputs()
  tokens, _ = jax.jit(lambda p, i, m: decoding.predict(
      model, p, i, NEW_TOKENS, eos_id=EOS, inputs_mask=m))(params, ids, mask)
  ours = [_until_eos(row[0]) for row in np.asarray(tokens)]
  assert ours == _hf_generate(hf_model, do_sample=False)
  # sampling with top_k=1 is greedy, through the same cache
  sampled, _ = decoding.predict(model, params, ids, NEW_TOKENS, decoding.DecodingConfig(
      method='sample', top_k=1, temperature=0.7, num_samples=2), EOS, inputs_mask=mask)
  assert [[_until_eos(s) for s in row] for row in np.asarray(sampled)] == [[o, o] for o in ours]


def test_beam_search_best_equals_transformers_beam_search(pair):
  model, params, hf_model = pair
  ids, mask = _ours_inputs()
  config = decoding.DecodingConfig(method='beam', num_beams=4, alpha=0.0, beam_end='hf')
  tokens, _ = jax.jit(lambda p, i, m: decoding.predict(
      model, p, i, NEW_TOKENS, config, EOS, inputs_mask=m))(params, ids, mask)
  ours = [_until_eos(row[0]) for row in np.asarray(tokens)]
  assert ours == _hf_generate(hf_model, do_sample=False, num_beams=4, length_penalty=0.0,
                              early_stopping=False)


def test_score_equals_transformers_per_token_log_probabilities(pair):
  model, params, hf_model = pair
  ids, mask = _ours_inputs()
  targets = np.array([[0, 7, EOS, 0], [12, 0, 0, EOS], [EOS, 0, 0, 0]], np.int32)
  targets_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
  total, per_token = jax.jit(lambda p, i, m, t, tm: model.score(
      p, i, t, inputs_mask=m, targets_mask=tm))(params, ids, mask, targets, targets_mask)
  for r, prompt in enumerate(PROMPTS):
    target = targets[r][targets_mask[r]].tolist()
    with torch.no_grad():
      logits = hf_model(torch.tensor([prompt + target])).logits[0].double()
    theirs = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].numpy()
    theirs = theirs[np.arange(len(target)), target]
    np.testing.assert_allclose(np.asarray(per_token)[r, :len(target)], theirs, atol=1e-4)
    assert np.all(np.asarray(per_token)[r, len(target):] == 0)
    np.testing.assert_allclose(float(total[r]), theirs.sum(), atol=3e-4)
