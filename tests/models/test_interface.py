"""The model interface carries a second family: a toy model written here, registered with
`models.register`, runs decoding (greedy, beam, sampling), scoring, a train step, `plan`
and a whole train -> checkpoint -> resume -> eval run, with nothing outside `models/`
knowing about it.

The toy: logits of target position t = (mean embedding of its segment's inputs + embedding
of the previous target token) @ output. It has no encoder stack, no layers and no KV cache
(`decode_step` reads the previous token only), so any T5 assumption left in a consumer
(encode/decode methods, a cache layout, layer names) breaks these tests.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import decoding, models, partitioning
from t5x_lite.data import pipeline, vocab as vocab_lib
from t5x_lite.training import loop, memory_plan, optimizers, state as state_lib, step as step_lib

VOCAB, WIDTH = 400, 16


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  family: ClassVar[str] = 'toy'
  vocab_size: int = VOCAB
  d_model: int = WIDTH
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  dropout_rate: float = 0.0
  remat: bool = False


class ToyModel(models.Model):

  def boxed_params(self, rng):
    k1, k2 = jax.random.split(rng)
    c = self.config
    return {'embedding': nn.LogicallyPartitioned(
                jax.random.normal(k1, (c.vocab_size, c.d_model)), ('vocab', 'embed')),
            'output': nn.LogicallyPartitioned(
                jax.random.normal(k2, (c.d_model, c.vocab_size)) * c.d_model ** -0.5,
                ('embed', 'vocab'))}

  def logits(self, params, batch, *, enable_dropout=False, rngs=None):
    inputs, previous = batch['encoder_input_tokens'], batch['decoder_input_tokens']
    in_seg = batch.get('encoder_segment_ids', (inputs != 0).astype(jnp.int32))
    out_seg = batch.get('decoder_segment_ids', jnp.ones_like(previous))
    same = (in_seg[:, None, :] == out_seg[:, :, None]) & (inputs != 0)[:, None, :]  # [B, T, S]
    emb = params['embedding'][inputs]                                              # [B, S, D]
    context = jnp.einsum('bts,bsd->btd', same, emb) / jnp.maximum(same.sum(-1), 1)[..., None]
    return (context + params['embedding'][previous]) @ params['output']

  def score_options(self, params, inputs, option_targets, *, inputs_mask=None,
                    options_mask=None):
    batch, n, length = option_targets.shape
    inputs = jnp.where(models.interface.real_inputs(inputs, inputs_mask), inputs, 0)
    total, _ = self.score(params, jnp.repeat(inputs, n, axis=0),
                          option_targets.reshape(batch * n, length),
                          targets_mask=None if options_mask is None
                          else options_mask.reshape(batch * n, length))
    return total.reshape(batch, n)

  def _context(self, params, inputs):
    mask = (inputs != 0)[..., None]
    return (params['embedding'][inputs] * mask).sum(1) / jnp.maximum(mask.sum(1), 1)

  def init_decode(self, params, inputs, max_decode_length, rows_per_input=1, *,
                  inputs_mask=None):
    inputs = jnp.where(models.interface.real_inputs(inputs, inputs_mask), inputs, 0)
    context = jnp.repeat(self._context(params, inputs), rows_per_input, axis=0)
    return context, {'steps': jnp.zeros((), jnp.int32)}

  def decode_step(self, params, context, cache, tokens):
    logits = (context + params['embedding'][tokens]) @ params['output']
    return logits, {'steps': cache['steps'] + 1}

  def reorder_cache(self, cache, parents):
    return cache   # nothing per row: the next step reads the previous token only

  def activation_bytes(self, batch_size, feature_lengths, axis_sizes, rules):
    rows = -(-batch_size // partitioning.axis_product(partitioning.BATCH_AXES, axis_sizes))
    logits = 4 * rows * feature_lengths['targets'] * self.config.vocab_size
    return models.ActivationBytes(
        stacks=(models.LayerStack('context', 1, 4 * rows * feature_lengths['inputs'] * WIDTH,
                                  4 * rows * feature_lengths['inputs'] * WIDTH),),
        shared=0, output=2 * logits, working=logits, rows_per_device=rows)


models.register('toy', ToyConfig, ToyModel)


@pytest.fixture(scope='module')
def toy():
  model = models.build(ToyConfig())
  return model, model.init_params(jax.random.key(0))


def _numpy_logits(params, inputs, previous):
  emb, out = np.asarray(params['embedding']), np.asarray(params['output'])
  mask = inputs != 0
  context = (emb[inputs] * mask[..., None]).sum(1) / mask.sum(1)[:, None]
  return (context + emb[previous]) @ out


def test_build_picks_the_family_and_meta_json_reads_back_into_its_config():
  model = models.build(ToyConfig(d_model=8))
  assert isinstance(model, ToyModel) and model.family == 'toy'
  recorded = models.config_to_json(ToyConfig(d_model=8))
  assert recorded['family'] == 'toy'
  assert models.config_from_json(recorded) == ToyConfig(d_model=8)
  assert model.param_count() == 2 * VOCAB * 8


def test_greedy_decoding_equals_a_numpy_loop(toy):
  model, params = toy
  inputs = np.array([[5, 6, 7, 0], [9, 3, 0, 0]], np.int32)
  tokens, scores = decoding.decode(model, params, jnp.asarray(inputs), 6, eos_id=1)
  previous = np.zeros(2, np.int32)
  expected, expected_scores = [], np.zeros(2)
  for _ in range(6):
    logits = _numpy_logits(params, inputs, previous)
    token = logits.argmax(-1)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    expected_scores += log_probs[np.arange(2), token]
    expected.append(token)
    previous = token
  np.testing.assert_array_equal(np.asarray(tokens), np.stack(expected, 1))  # no EOS drawn here
  np.testing.assert_allclose(np.asarray(scores), expected_scores, rtol=1e-5)


def test_beam_and_sampling_run_through_the_interface(toy):
  model, params = toy
  inputs = jnp.array([[5, 6, 7, 0], [9, 3, 0, 0]], jnp.int32)
  beams, beam_scores = decoding.predict(model, params, inputs, 5,
                                        decoding.DecodingConfig(method='beam', num_beams=3))
  assert beams.shape == (2, 3, 5) and beam_scores.shape == (2, 3)
  greedy, greedy_score = decoding.predict(model, params, inputs, 5)
  # with alpha = 0 the best beam is at least as likely as the greedy sequence
  plain, plain_scores = decoding.predict(model, params, inputs, 5, decoding.DecodingConfig(
      method='beam', num_beams=3, alpha=0.0))
  assert np.all(np.asarray(plain_scores[:, 0]) >= np.asarray(greedy_score[:, 0]) - 1e-5)
  samples, _ = decoding.predict(model, params, inputs, 5, decoding.DecodingConfig(
      method='sample', num_samples=4, temperature=1.0))
  assert samples.shape == (2, 4, 5)


def test_scoring_and_rank_classification(toy):
  model, params = toy
  inputs = jnp.array([[5, 6, 7, 0]], jnp.int32)
  targets = jnp.array([[11, 12, 1, 0]], jnp.int32)
  total, per_token = model.score(params, inputs, targets)
  previous = np.array([0, 11, 12])
  logits = np.stack([_numpy_logits(params, np.asarray(inputs), previous[i:i + 1])[0]
                     for i in range(3)])
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(total[0]), log_probs[np.arange(3), [11, 12, 1]].sum(),
                             rtol=1e-5)
  assert float(per_token[0, 3]) == 0.0
  options = jnp.stack([targets, jnp.array([[13, 1, 0, 0]], jnp.int32)], axis=1)
  scores = model.score_options(params, inputs, options)
  np.testing.assert_allclose(float(scores[0, 0]), float(total[0]), rtol=1e-6)


def test_one_sharded_train_step_and_plan():
  model = models.build(ToyConfig())
  mesh = partitioning.make_mesh({'data': -1})
  rules = partitioning.rules_for('fsdp')
  optimizer = optax.adam(1e-2)
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  state = state_lib.create_state(model, optimizer, layout, jax.random.key(0))
  before = jax.device_get(state.params)
  data = pipeline.train_iterator('builtin', vocab_lib.get_vocabulary('byte'),
                                 pipeline.PipelineConfig({'inputs': 64, 'targets': 16}, 8))
  step = step_lib.jit_train_step(step_lib.make_train_step(model, optimizer, np.ones(10)),
                                 layout, mesh, rules)
  state, metrics = step(state, partitioning.global_batch(next(data), mesh), jax.random.key(1))
  data.close()
  assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
  assert not np.allclose(before['output'], jax.device_get(state.params['output']))
  train = loop.TrainConfig(model_dir='unused', batch_size=8, partitioning='fsdp',
                           feature_lengths={'inputs': 64, 'targets': 16},
                           optimizer=optimizers.OptimizerConfig(name='adamw'))
  state_bytes, activations = memory_plan.plan(ToyConfig(), train, {'data': 1, 'fsdp': 8,
                                                                    'tensor': 1})
  assert state_bytes.params == 2 * VOCAB * WIDTH * 4 // 8   # fsdp-sharded over 8 devices
  assert activations.stack('context').count == 1 and activations.rows_per_device == 1


def test_train_resume_and_eval_of_the_toy_family(tmp_path):
  """The loop, checkpoints (meta records family 'toy'), the compatibility check on resume and
  the evaluator run the toy without knowing it."""
  config = loop.TrainConfig(
      model_dir=str(tmp_path / 'run'), mixture='builtin', eval_mixture='builtin_uppercase',
      feature_lengths={'inputs': 64, 'targets': 16}, batch_size=8, train_steps=2,
      log_period=1, checkpoint_period=2, async_checkpointing=False, eval_batch_size=8,
      eval_max_examples=4, progress_bar=False,
      optimizer=optimizers.OptimizerConfig(name='adamw', learning_rate=1e-2))
  first = loop.train(config, ToyConfig())
  assert 0 <= first['eval']['builtin_uppercase']['accuracy'] <= 100
  resumed = loop.train(dataclasses.replace(config, train_steps=3), ToyConfig())
  assert int(resumed['state'].step) == 3
  with pytest.raises(Exception, match='d_model 16 in the checkpoint, 8 in this run'):
    loop.train(dataclasses.replace(config, train_steps=4), ToyConfig(d_model=8))
