"""The train step on 8 fake CPU devices: every mesh preset equals one device (for each model
family: T5 and a decoder-only model); FSDP really shards; gradient accumulation equals the
full batch; λ weights; NaN guard; clear errors.

Equality is checked on what can show a wrong magnitude: the loss, the gradient norm and the
raw (clipped) gradients, read off one SGD step (the parameter change IS -lr times the clipped
gradient; lr 1e4 so that it dwarfs the parameters' fp32 rounding) with a clip below the
gradient's norm, on a preset wide enough that
Adafactor factors its matrices (128-wide), with dropout on; and one factored Adafactor step.
A first Adafactor step on a tiny model is -lr * rms(p) * sign(g): it hides magnitudes.
The decoder-only model is a one-layer tiny Qwen3 with every parameter kind its family can
shard: 8 query heads over 4 key/value heads (grouped-query attention whose kv heads split
whole over `tensor` 4), q/k/v/o biases, q/k norms, a tied embedding; the prefix-LM mask and
dropout on (one layer: each mesh compiles a step, ~3 s on 2 cores)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import models, partitioning
from t5x_lite.data import feature_converters, mixtures, pipeline, vocab
from t5x_lite.models import decoder_presets
from t5x_lite.partitioning import PartitioningError
from t5x_lite.training import losses, optimizers
from t5x_lite.training import state as state_lib
from t5x_lite.training import step as step_lib

CONFIG = models.preset('flan_t5', 'tiny')
OPTIMIZER = optimizers.OptimizerConfig(learning_rate=1e-2).build()
# Every matrix >= 128 x 128 (Adafactor factors them all but the relative position bias).
WIDE = models.preset('flan_t5', 'tiny', d_model=128, num_heads=4, d_kv=32, d_ff=256,
                     dropout_rate=0.1)
CLIP = 0.05   # below the gradient's norm (asserted): the clipping scales every gradient
SGD_LR = 1e4
SGD = optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(SGD_LR))
FACTORED_ADAFACTOR = optimizers.OptimizerConfig(learning_rate=1e-2, clip_grad_norm=CLIP).build()
DECODER_ONLY = decoder_presets.preset('qwen3', 'tiny', num_layers=1, num_heads=8, num_kv_heads=4,
                                      qkv_bias=True, out_bias=True,
                                      inputs_bidirectional_attention=True, dropout_rate=0.1)
# family -> (config of the sharded-equality test, the fixture of its batch)
FAMILIES = {'t5': (WIDE, 'batch'), 'decoder_only': (DECODER_ONLY, 'decoder_only_batch')}


@pytest.fixture(scope='module')
def mixture():
  return mixtures.get_mixture('builtin')


def first_batch(mixture, **kwargs):
  it = pipeline.train_iterator(mixture, vocab.ByteVocabulary(), pipeline.PipelineConfig(
      {'inputs': 64, 'targets': 16}, batch_size=16, prefetch=0, **kwargs), 0, 1)
  out = next(it)
  it.close()
  return out


@pytest.fixture(scope='module')
def batch(mixture):
  return first_batch(mixture)


@pytest.fixture(scope='module')
def decoder_only_batch(mixture):
  return first_batch(mixture,
                     feature_converter=feature_converters.DecoderOnlyFeatureConverter())


_CACHE = {}


def cached_step(mixture, batch, mesh_shape, rules, **kwargs):
  """run_step once per configuration for the whole module (each one compiles a step)."""
  key = (str(mesh_shape), rules, str(kwargs))
  if key not in _CACHE:
    _CACHE[key] = run_step(mixture, batch, mesh_shape, rules, **kwargs)
  return _CACHE[key]


def run_step(mixture, batch, mesh_shape, rules, microbatches=1, devices=None,
             task_weights=None, optimizer=OPTIMIZER, state=None, config=CONFIG,
             step_weights=None):
  mesh = partitioning.make_mesh(mesh_shape, devices)
  rules = partitioning.rules_for(rules)
  model = models.build(config)
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  if state is None:
    state = state_lib.create_state(model, optimizer, layout, jax.random.key(0))
  weights = mixture.loss_weights() if task_weights is None else task_weights
  fn = step_lib.jit_train_step(step_lib.make_train_step(
      model, optimizer, weights, microbatches=microbatches), layout, mesh,
      rules)
  new_state, metrics = fn(state, partitioning.global_batch(batch, mesh), jax.random.key(1),
                          None, step_weights)   # λ of this step (a schedule's), if given
  return layout, new_state, jax.device_get(metrics)


def rel_err(a, b):
  """Largest relative error (in norm) over the leaves of two trees."""
  errs = jax.tree.map(lambda x, y: float(np.linalg.norm(np.asarray(x) - np.asarray(y)) /
                                         max(np.linalg.norm(np.asarray(y)), 1e-30)), a, b)
  return max(jax.tree.leaves(errs))


def sgd_gradients(before, after):
  """The clipped gradients that one SGD step applied."""
  return jax.tree.map(lambda b, a: (np.asarray(b, np.float64) - np.asarray(a)) / SGD_LR,
                      jax.device_get(before), jax.device_get(after))


def initial_params(config):
  return jax.device_get(models.init_params(config, jax.random.key(0)))


def single_device(mixture, batch, config, optimizer):
  return cached_step(mixture, batch, {'data': 1}, 'dp', devices=jax.devices()[:1],
                     config=config, optimizer=optimizer)


def assert_same_step(got, want, optimizer_name, config=WIDE):
  (_, state, metrics), (_, ref_state, ref_metrics) = got, want
  assert ref_metrics['grad_norm'] > 2 * CLIP   # the clip is active
  assert metrics['loss'] == pytest.approx(ref_metrics['loss'], rel=1e-5)
  assert metrics['grad_norm'] == pytest.approx(ref_metrics['grad_norm'], rel=1e-5)
  np.testing.assert_allclose(metrics['tokens'], ref_metrics['tokens'])
  if optimizer_name == 'sgd':
    start = initial_params(config)
    assert rel_err(sgd_gradients(start, state.params),
                   sgd_gradients(start, ref_state.params)) <= 1e-5
  else:
    assert rel_err(jax.device_get(state.params), jax.device_get(ref_state.params)) <= 1e-5


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize('rules,mesh_shape', [
    ('dp', {'data': -1}),
    ('fsdp', {'fsdp': -1}),
    ('tp', {'data': 2, 'tensor': 4}),
    ('fsdp_tp', {'fsdp': 2, 'tensor': 4}),
])
def test_sharded_step_equals_one_device(mixture, request, family, rules, mesh_shape):
  assert jax.device_count() == 8
  config, batch_fixture = FAMILIES[family]
  batch = request.getfixturevalue(batch_fixture)
  got = cached_step(mixture, batch, mesh_shape, rules, config=config, optimizer=SGD)
  assert_same_step(got, single_device(mixture, batch, config, SGD), 'sgd', config)
  if family == 'decoder_only' and 'tensor' in mesh_shape:
    # Grouped-query attention split over `tensor` along whole key/value heads.
    key = got[0].shardings.params['layers_0']['attention']['key']
    assert key.shard_shape((config.hidden_size, config.num_kv_heads * config.head_dim)) == (
        config.hidden_size // mesh_shape.get('fsdp', 1), config.head_dim)


def test_factored_adafactor_step_under_fsdp_tp_equals_one_device(mixture, batch):
  """Its row/column statistics are sharded like the rows/columns they summarise."""
  got = run_step(mixture, batch, {'fsdp': 2, 'tensor': 4}, 'fsdp_tp', config=WIDE,
                 optimizer=FACTORED_ADAFACTOR)
  layout, state, _ = got
  factored = state.opt_state[1][0]   # clip, then optax.adafactor's chain
  assert factored.v_row['encoder']['layers_0']['mlp']['wi_0'].shape == (128,)
  assert_same_step(got, single_device(mixture, batch, WIDE, FACTORED_ADAFACTOR), 'adafactor')


def test_bf16_step_under_fsdp_tp_matches_one_device(mixture, batch):
  """bf16 activations (on a CPU with native bf16: t5x_lite/kernels.py, whose backward pads
  sharded operands) give the one-device step up to bf16 rounding."""
  config = CONFIG.replace(dtype='bfloat16')
  _, one, one_metrics = run_step(mixture, batch, {'data': 1}, 'dp', devices=jax.devices()[:1],
                                 config=config)
  _, eight, metrics = run_step(mixture, batch, {'fsdp': 2, 'tensor': 4}, 'fsdp_tp',
                               config=config)
  # Sharding changes the order of bf16 roundings: the plain bf16 path differs as much
  # (loss ~2e-5 relative, params ~3e-3 after one step).
  assert abs(metrics['loss'] - one_metrics['loss']) <= 1e-3 * abs(one_metrics['loss'])
  assert rel_err(jax.device_get(eight.params), jax.device_get(one.params)) <= 1e-2


def _device0_bytes(tree):
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state_per_device(mixture):
  # Matrices of >= 128 x 128, so Adafactor's factored row/column statistics are included.
  config = models.preset('flan_t5', 'tiny', d_model=256, d_kv=64, d_ff=512)
  mesh = partitioning.make_mesh({'fsdp': -1})
  rules = partitioning.rules_for('fsdp')
  optimizer = optimizers.OptimizerConfig().build()
  model = models.build(config)
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  state = state_lib.create_state(model, optimizer, layout, jax.random.key(0))
  trees = (state.params, state.opt_state)
  total = sum(x.nbytes for x in jax.tree.leaves(trees))
  per_device = _device0_bytes(trees)
  assert per_device == pytest.approx(total / 8, rel=0.02)
  assert partitioning.per_device_bytes(layout.shapes.params, layout.shardings.params) == \
      _device0_bytes(state.params)


def test_gradient_accumulation_equals_the_full_batch(mixture, batch):
  """Dropout off: microbatch j draws its dropout from fold_in(rng, j) (as T5X does), so its
  masks cannot equal the full batch's."""
  config = WIDE.replace(dropout_rate=0.0)
  full = cached_step(mixture, batch, {'data': -1}, 'dp', config=config, optimizer=SGD)
  accumulated = run_step(mixture, batch, {'data': 2, 'fsdp': 1, 'tensor': 1}, 'dp',
                         microbatches=4, devices=jax.devices()[:2], config=config, optimizer=SGD)
  (_, acc_state, acc_metrics), (_, full_state, full_metrics) = accumulated, full
  assert full_metrics['grad_norm'] > 2 * CLIP
  assert acc_metrics['loss'] == pytest.approx(full_metrics['loss'], rel=1e-5)
  assert acc_metrics['grad_norm'] == pytest.approx(full_metrics['grad_norm'], rel=1e-5)
  np.testing.assert_allclose(acc_metrics['tokens'], full_metrics['tokens'])
  np.testing.assert_allclose(acc_metrics['loss_sum'], full_metrics['loss_sum'], rtol=1e-5)
  start = initial_params(config)
  assert rel_err(sgd_gradients(start, acc_state.params),
                 sgd_gradients(start, full_state.params)) <= 1e-5


def test_task_loss_weights_scale_each_task_loss(mixture, batch):
  n = len(mixture.tasks)
  _, _, plain = cached_step(mixture, batch, {'data': -1}, 'dp')
  assert np.all(mixture.loss_weights() == 1.0)
  weights = np.linspace(0.0, 2.0, n).astype(np.float32)
  # λ as the loop passes it, per step (a schedule's λ of that step), over the step's own ones
  _, _, weighted = run_step(mixture, batch, {'data': -1}, 'dp', step_weights=weights)
  # L = Σ λ_i L_i with L_i = (loss sum of task i) / (real tokens of the batch)
  per_task = plain['loss_sum'] / plain['tokens'].sum()
  assert plain['loss'] == pytest.approx(per_task.sum(), rel=1e-5)
  assert weighted['loss'] == pytest.approx(float((weights * per_task).sum()), rel=1e-5)
  np.testing.assert_array_equal(weighted['loss_weights'], weights)   # what metrics log
  np.testing.assert_array_equal(plain['loss_weights'], np.ones(n))


def test_non_finite_updates_are_skipped_and_counted(mixture, batch):
  mesh = partitioning.make_mesh({'data': -1})
  model = models.build(CONFIG)
  layout = state_lib.state_layout(model, OPTIMIZER, mesh, partitioning.rules_for('dp'))
  state = state_lib.create_state(model, OPTIMIZER, layout, jax.random.key(0))
  poisoned = jax.tree.map(lambda x: x, state.params)
  poisoned['decoder']['decoder_norm']['scale'] = jnp.full_like(
      poisoned['decoder']['decoder_norm']['scale'], jnp.nan)
  state = state.replace(params=jax.device_put(poisoned, layout.shardings.params))
  before = jax.device_get(state.params)
  _, new_state, metrics = run_step(mixture, batch, {'data': -1}, 'dp', state=state)
  assert not metrics['finite']
  assert int(new_state.skipped_steps) == 1 and int(new_state.bad_streak) == 1
  assert int(new_state.step) == 1
  np.testing.assert_array_equal(jax.device_get(new_state.params)['encoder']['encoder_norm']['scale'],
                                before['encoder']['encoder_norm']['scale'])


def test_layout_errors_are_clear_and_early():
  with pytest.raises(PartitioningError, match=r'has 4 devices but 8 are available'):
    partitioning.make_mesh({'data': 2, 'tensor': 2})
  with pytest.raises(PartitioningError, match='only one mesh axis may be -1'):
    partitioning.make_mesh({'data': -1, 'fsdp': -1})
  mesh = partitioning.make_mesh({'data': 1, 'tensor': 8})
  # 4 heads over 8 tensor shards: caught on the first parameter with a `heads` axis (the
  # [embed, joined_kv] kernels would divide, 64 = 4 x 16, but not along whole heads).
  with pytest.raises(PartitioningError, match=r"parameter decoder/relpos_bias/rel_embedding has "
                                              r"shape \(32, 4\): dimension 1 \(4\) is not "
                                              r"divisible by mesh axis tensor of size 8"):
    state_lib.state_layout(models.build(CONFIG), OPTIMIZER, mesh, partitioning.rules_for('tp'))
  with pytest.raises(PartitioningError, match='global batch size 12 is not divisible by the 8'):
    partitioning.check_batch_size(12, partitioning.make_mesh({'data': -1}))
  with pytest.raises(PartitioningError, match="unknown partitioning rules 'zero3'"):
    partitioning.rules_for('zero3')


def test_losses_summarize_matches_step_metrics(mixture, batch):
  _, _, metrics = cached_step(mixture, batch, {'data': -1}, 'dp')
  summary = losses.summarize(metrics, [t.name for t in mixture.tasks])
  assert summary['tokens'] == batch['decoder_loss_weights'].sum()
  assert 0 < summary['loss'] < 10 and set(summary) > {'builtin_qa/loss', 'builtin_qa/accuracy'}
