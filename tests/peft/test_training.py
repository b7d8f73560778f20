"""Adapter runs: the base frozen bit for bit, optimizer state for trainable leaves only,
per-task routing in packed rows, sharded == replicated, exact resume, base identity."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from t5x_lite import models, partitioning
from t5x_lite.rundir import writers
from t5x_lite.data import mixtures, pipeline, vocab
from t5x_lite.models import t5
from t5x_lite.peft import params as peft_params, runs
from t5x_lite.peft.spec import AdapterSpec, LoraSpec
from t5x_lite.training import loop, optimizers, state as state_lib, step as step_lib

# flan-t5 tiny's widths with one layer a stack: every adapter path, half the compile time.
TINY = models.preset('flan_t5', 'tiny', num_encoder_layers=1, num_decoder_layers=1)
SMALL = t5.T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                    num_encoder_layers=1, num_decoder_layers=1, feed_forward_proj='gated-gelu',
                    tie_word_embeddings=False)
TASKS = ['builtin_sentiment', 'builtin_arithmetic', 'builtin_sort']
GROUP_TASK = AdapterSpec(lora=LoraSpec(rank=4, targets=('q', 'v', 'wo'), sharing='group+task'),
                         train=('layer_norm',),
                         groups={'g': ['builtin_sentiment', 'builtin_arithmetic']})
ABC = AdapterSpec(lora=LoraSpec(rank=4, targets=('q', 'k', 'v', 'o', 'wi', 'wo'),
                                sharing='group+task'), tasks=('a', 'b', 'c'),
                  groups={'g': ['a', 'b']})


def flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


@pytest.fixture(scope='module')
def small_params():
  return (models.init_params(SMALL, jax.random.key(0)),
          models.init_params(SMALL, jax.random.key(0), adapters=ABC))


def test_zero_initialised_lora_and_no_prompt_give_the_base_logits_exactly(small_params):
  base, full = small_params
  assert all(np.array_equal(v, flat(full)[k]) for k, v in flat(base).items())
  rng = np.random.default_rng(0)
  enc, dec = rng.integers(3, 64, (2, 10)), rng.integers(3, 64, (2, 6))
  want = jax.jit(t5.Transformer(SMALL).apply)({'params': base}, enc, dec)
  got = jax.jit(t5.Transformer(SMALL, adapters=ABC).apply)(
      {'params': full}, enc, dec, decoder_task_ids=np.array([[0] * 6, [2] * 6]))
  np.testing.assert_array_equal(got, want)


def test_a_packed_row_mixing_tasks_gives_each_segment_its_own_adapter(small_params):
  rng = np.random.default_rng(0)
  params = traverse_util.unflatten_dict(
      {k: (rng.normal(size=v.shape).astype(np.float32) if k.endswith('_b') else v)
       for k, v in flat(small_params[1]).items()}, sep='/')
  apply = jax.jit(t5.Transformer(SMALL, adapters=ABC).apply)
  e0, e1 = rng.integers(3, 64, 4), rng.integers(3, 64, 5)
  d0, d1 = rng.integers(3, 64, 3), rng.integers(3, 64, 4)

  def row(parts, segments, tasks, length):   # one row, padded: every call has one shape
    out = np.zeros((1, length), np.int64)
    flat_parts = np.concatenate(parts)
    out[0, :len(flat_parts)] = flat_parts
    seg = np.zeros((1, length), np.int64)
    seg[0, :len(flat_parts)] = np.repeat(segments, [len(p) for p in parts])
    ids = np.full((1, length), -1)
    ids[0, :len(flat_parts)] = np.repeat(tasks, [len(p) for p in parts])
    return out, seg, ids

  def logits(encs, decs, tasks):
    (enc, enc_seg, _), (dec, dec_seg, ids) = (row(encs, range(1, len(encs) + 1), tasks, 9),
                                              row(decs, range(1, len(decs) + 1), tasks, 7))
    return apply({'params': params}, enc, dec, enc_seg, dec_seg, decoder_task_ids=ids)[0]

  packed = logits([e0, e1], [d0, d1], [0, 2])
  alone0, alone1 = logits([e0], [d0], [0]), logits([e1], [d1], [2])
  np.testing.assert_allclose(packed[:3], alone0[:3], atol=1e-5)
  np.testing.assert_allclose(packed[3:], alone1[:4], atol=1e-5)
  assert np.abs(logits([e0], [d0], [1])[:3] - alone0[:3]).max() > 0.1   # b's adapter differs
  # Routing the params to one task (eval, infer) == the per-token ids of that task.
  routed = t5.Transformer(SMALL, adapters=peft_params.routed_spec(ABC)).apply(
      {'params': peft_params.route(params, 'c', ABC)}, e1[None], d1[None])
  np.testing.assert_allclose(routed[0], alone1[:4], atol=1e-5)


def _config(model_dir, **kw):
  return loop.TrainConfig(**{**dict(
      model_dir=model_dir, mixture=mixtures.Mixture('peft_m', TASKS),
      feature_lengths={'inputs': 64, 'targets': 16}, batch_size=8, train_steps=4,
      log_period=1, checkpoint_period=2, max_to_keep=3, eval_at_end=False, eval_batch_size=8,
      eval_max_examples=2,
      progress_bar=False, async_checkpointing=False, adapters=GROUP_TASK,
      mesh_shape={'data': 2, 'fsdp': 2, 'tensor': 2}, partitioning='fsdp_tp'), **kw})


def _losses(model_dir):
  return {r['step']: r['train/loss'] for r in writers.read_metrics(model_dir)
          if 'train/loss' in r}


@pytest.fixture(scope='module')
def adapter_run(tmp_path_factory):
  """4 steps of group+task LoRA + layer norms, fsdp x tensor on 8 devices, eval at the end."""
  model_dir = str(tmp_path_factory.mktemp('adapters'))
  return model_dir, loop.train(_config(model_dir, eval_at_end=True), TINY)


def test_only_adapters_change_and_the_optimizer_holds_no_frozen_leaf(adapter_run):
  _, result = adapter_run
  # Eval routed each task to its adapters (seen: group+task; every task scored).
  assert set(result['eval']) >= set(TASKS)
  state, frozen = result['state'], result['frozen']
  trainable = flat(state.params)
  assert all(peft_params.is_adapter(k) or 'layer_norm' in k for k in trainable)
  assert not set(trainable) & set(flat(frozen))
  spec = runs.spec_for_mixture(GROUP_TASK, mixtures.Mixture('peft_m', TASKS))
  # The base the run trained against is the seed's, unchanged bit for bit.
  start, start_frozen = state_lib.create_adapter_state(
      models.build(TINY, adapters=spec), _config('/x').optimizer.build(), _layout(spec),
      jax.random.key(0))
  for k, v in flat(start_frozen).items():
    np.testing.assert_array_equal(np.asarray(flat(frozen)[k]), np.asarray(v), err_msg=k)
  changed = [k for k, v in flat(start.params).items()
             if not np.array_equal(np.asarray(trainable[k]), np.asarray(v))]
  assert any(k.endswith('_lora_task_b') for k in changed) and any('layer_norm' in k for k in changed)
  # Adafactor's state: one entry per trainable leaf, none for the frozen base.
  def state_paths(tree):
    return {'/'.join(str(getattr(p, 'key', p)) for p in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  opt_paths = state_paths(state.opt_state)
  assert not [p for p in opt_paths if any(p.endswith('/' + f) for f in flat(frozen))]
  assert any(p.endswith('/encoder/layers_0/attention/query_lora_task_a') for p in opt_paths)
  assert len(jax.tree.leaves(state.opt_state)) < 4 * len(trainable) + 4


def _layout(spec):
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  from t5x_lite import partitioning  # pylint: disable=import-outside-toplevel
  return state_lib.state_layout(models.build(TINY, adapters=spec),
                                _config('/x').optimizer.build(), mesh,
                                partitioning.rules_for('fsdp_tp'))


def test_resume_is_exact(adapter_run, tmp_path):
  model_dir, _ = adapter_run
  expected = _losses(model_dir)
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(model_dir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  loop.train(_config(resumed), TINY)             # resumes from step 2
  assert _losses(resumed) == expected            # bitwise: same data, dropout, updates


def test_a_sharded_adapter_step_equals_one_device():
  """Two steps of LoRA (task bank) + a soft prompt + layer norms: fsdp x tensor on 8
  devices == 1 device, and the frozen base is an input the step never writes."""
  mixture = mixtures.Mixture('peft_m', TASKS)
  spec = runs.spec_for_mixture(AdapterSpec(
      lora=LoraSpec(rank=4, targets=('q', 'v', 'wi'), sharing='task'), prompt_length=2,
      train=('layer_norm',)), mixture)
  it = pipeline.train_iterator(mixture, vocab.ByteVocabulary(), pipeline.PipelineConfig(
      {'inputs': 64, 'targets': 16}, batch_size=8, prefetch=0, prompt_length=2), 0, 1)
  batch = next(it)
  it.close()
  assert (batch['encoder_input_tokens'] < 0).any()
  optimizer = optimizers.OptimizerConfig(learning_rate=1e-2).build()
  out = {}
  for name, shape, rules, devices in (('one', {'data': 1}, 'dp', jax.devices()[:1]),
                                      ('fsdp_tp', {'fsdp': 4, 'tensor': 2}, 'fsdp_tp', None)):
    mesh = partitioning.make_mesh(shape, devices)
    rules = partitioning.rules_for(rules)
    model = models.build(TINY, adapters=spec)
    layout = state_lib.state_layout(model, optimizer, mesh, rules)
    state, frozen = state_lib.create_adapter_state(model, optimizer, layout, jax.random.key(0))
    start = jax.device_get(state.params)
    fn = step_lib.jit_train_step(step_lib.make_train_step(
        model, optimizer, mixture.loss_weights()), layout, mesh,
        rules)
    losses = []
    for _ in range(2):
      state, metrics = fn(state, partitioning.global_batch(batch, mesh), jax.random.key(1),
                          frozen)
      losses.append(float(metrics['loss']))
    out[name] = losses, jax.device_get(state.params), jax.device_get(frozen), start
  (losses, params, frozen, start), (s_losses, s_params, s_frozen, _) = out['one'], out['fsdp_tp']
  np.testing.assert_allclose(s_losses, losses, rtol=1e-5)
  for k, v in flat(params).items():
    np.testing.assert_allclose(flat(s_params)[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    assert not np.array_equal(v, flat(start)[k]) or k.endswith('_a'), k   # all trained
  for k, v in flat(frozen).items():
    np.testing.assert_array_equal(flat(s_frozen)[k], v)


def test_a_resume_on_another_base_or_other_adapters_fails_clearly(adapter_run, tmp_path):
  model_dir, _ = adapter_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(model_dir, copy)
  with pytest.raises(runs.AdapterError, match='digest'):
    loop.train(_config(copy, train_steps=6, seed=1), TINY)   # the seed draws another base
  with pytest.raises(runs.AdapterError, match='resume with the same peft settings'):
    loop.train(_config(copy, train_steps=6, adapters=AdapterSpec(lora=LoraSpec(rank=2))), TINY)


def _cli(*args):
  from t5x_lite import cli  # pylint: disable=import-outside-toplevel
  return cli.main([str(a) for a in args])


def test_infer_routes_free_form_prompts_to_a_task_adapter(adapter_run, tmp_path, capsys):
  model_dir, _ = adapter_run
  (tmp_path / 'in.txt').write_text('sort: c a b\nWhat is 2 plus 3?\n')
  common = [f'--model_dir={model_dir}', f'--input_file={tmp_path / "in.txt"}',
            f'--output_file={tmp_path / "out.jsonl"}', '--max_input_length=64',
            '--max_decode_length=4', '--batch_size=8']
  assert _cli('infer', *common) == 2
  assert 'name the task with --task=NAME' in capsys.readouterr().err
  assert _cli('infer', *common, '--task=builtin_sort') == 0
  assert len((tmp_path / 'out.jsonl').read_text().splitlines()) == 2


def test_export_merges_the_task_adapters_into_the_base(adapter_run, tmp_path):
  """group+task LoRA + trained layer norms, exported for one task: the merged HF checkpoint
  computes what the routed adapters did."""
  from t5x_lite import hf  # pylint: disable=import-outside-toplevel
  model_dir, result = adapter_run
  assert _cli('export', f'--model_dir={model_dir}', f'--hf_dir={tmp_path / "merged"}',
              '--task=builtin_arithmetic') == 0
  config, merged = hf.load(str(tmp_path / 'merged'))
  spec = runs.spec_for_mixture(GROUP_TASK, mixtures.Mixture('peft_m', TASKS))
  trained = jax.device_get(peft_params.combine(result['state'].params, result['frozen']))
  assert np.abs(flat(trained)['encoder/layers_0/attention/query_lora_task_b']).max() > 0
  rng = np.random.default_rng(0)
  enc, dec = rng.integers(3, 300, (2, 12)), rng.integers(3, 300, (2, 5))
  want = jax.jit(t5.Transformer(TINY, adapters=peft_params.routed_spec(spec)).apply)(
      {'params': peft_params.route(trained, 'builtin_arithmetic', spec)}, enc, dec)
  got = jax.jit(t5.Transformer(config).apply)({'params': merged}, enc, dec)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_lora_target_the_model_lacks_is_an_error():
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from t5x_lite import validation  # pylint: disable=import-outside-toplevel
  relu = nn.unbox(models.abstract_params(models.preset('t5_1_0', 'tiny')))
  peft_params.check_against_base(AdapterSpec(lora=LoraSpec(targets=('q', 'wi'))), relu)
  with pytest.raises(validation.ConfigError, match="'wi_0' is no projection.*wi, wo"):
    peft_params.check_against_base(AdapterSpec(lora=LoraSpec(targets=('q', 'wi_0'))), relu)
