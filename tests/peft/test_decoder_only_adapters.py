"""Adapters on the decoder-only family (#33 part 2): LoRA on the seven projections (B = 0:
the base exactly), a train step that updates adapters only (the frozen base has no gradient
or optimizer state), per-task banks routed per token in packed rows, the soft prompt
embedded at ids -1..-n (through the pipeline, with and without a start id), and peft's
files with Hugging Face module names: `PeftModel.from_pretrained(AutoModelForCausalLM...)`
gives our logits, and the merged export loads in plain transformers."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from t5x_lite import hf_causal, hf_io, models, partitioning
from t5x_lite.data import feature_converters, mixtures, pipeline, vocab as vocab_lib
from t5x_lite.peft import export, params as peft_params, runs
from t5x_lite.peft.spec import AdapterSpec, LoraSpec
from t5x_lite.training import optimizers, state as state_lib, step as step_lib

SEVEN = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
# GQA (2 query heads per kv head), untied output, Gemma's embedding scaling: the prompt is
# scaled with the tokens, as peft's prompt concatenated to inputs_embeds is.
SMALL = models.DecoderOnlyConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                 tie_word_embeddings=False, scale_embeddings=True)
ABC = AdapterSpec(lora=LoraSpec(rank=2, targets=SEVEN, sharing='group+task'),
                  tasks=('a', 'b', 'c'), groups={'g': ['a', 'b']})
TASKS = ['builtin_arithmetic', 'builtin_sort', 'builtin_uppercase']   # short: packed rows
LENGTHS = {'inputs': 48, 'targets': 16}


def nn_unbox(model):
  """The model's params tree as ShapeDtypeStructs (no memory, no compile)."""
  return nn.unbox(model.abstract_params())


def flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def nest(leaves):
  return traverse_util.unflatten_dict(leaves, sep='/')


def _random_adapters(params, seed=1):
  """Every LoRA B (and the prompt) nonzero: adapters that matter."""
  rng = np.random.default_rng(seed)
  return nest({k: (rng.normal(0, 0.3, v.shape).astype(np.float32)
                   if k.endswith('_b') or k == 'prompt_embedding' else np.asarray(v))
               for k, v in flat(params).items()})


@pytest.fixture(scope='module')
def small_params():
  return (models.init_params(SMALL, jax.random.key(0)),
          models.init_params(SMALL, jax.random.key(0), adapters=ABC))


def _row(parts, tasks, length=10):
  """One row of the decoder-only contract holding `parts` as packed segments of `tasks`,
  padded to `length` (every call has one shape: one compile)."""
  batch = {k: np.zeros((1, length), np.int32) for k in (
      'decoder_input_tokens', 'decoder_segment_ids', 'decoder_positions')}
  batch['decoder_task_ids'] = np.full((1, length), -1, np.int32)
  at = 0
  for segment, (part, task) in enumerate(zip(parts, tasks), 1):
    span = slice(at, at + len(part))
    batch['decoder_input_tokens'][0, span] = part
    batch['decoder_segment_ids'][0, span] = segment
    batch['decoder_positions'][0, span] = np.arange(len(part))
    batch['decoder_task_ids'][0, span] = task
    at += len(part)
  return batch


BASE_LOGITS = jax.jit(models.build(SMALL).logits)
ABC_LOGITS = jax.jit(models.build(SMALL, adapters=ABC).logits)
X0, X1 = np.random.default_rng(0).integers(0, 64, 4), np.random.default_rng(1).integers(0, 64, 5)


def test_seven_projections_with_zero_b_give_the_base_logits_exactly(small_params):
  base, full = small_params
  assert all(np.array_equal(v, flat(full)[k]) for k, v in flat(base).items())
  adapted = {k.rsplit('_lora_', 1)[0] for k in flat(full) if '_lora_' in k}
  assert adapted == {f'layers_0/attention/{p}' for p in ('query', 'key', 'value', 'out')} | {
      f'layers_0/mlp/{p}' for p in ('wi_0', 'wi_1', 'wo')}
  peft_params.check_against_base(ABC, base)
  batch = _row([X0, X1], [0, 2])
  np.testing.assert_array_equal(ABC_LOGITS(full, batch), BASE_LOGITS(base, batch))


def test_a_packed_row_mixing_tasks_gives_each_segment_its_own_adapter(small_params):
  params = _random_adapters(small_params[1])

  def run(parts, tasks):
    return np.asarray(ABC_LOGITS(params, _row(parts, tasks)))[0]

  packed = run([X0, X1], [0, 2])
  alone0, alone1 = run([X0], [0]), run([X1], [2])
  np.testing.assert_allclose(packed[:4], alone0[:4], atol=1e-5)
  np.testing.assert_allclose(packed[4:9], alone1[:5], atol=1e-5)
  assert np.abs(run([X0], [1])[:4] - alone0[:4]).max() > 0.1   # b's adapter differs
  assert np.abs(run([X0], [-1])[:4] - alone0[:4]).max() > 0.1   # no adapter: the base
  # Routing the params to one task (eval, infer) == the per-token ids of that task.
  routed = jax.jit(models.build(SMALL, adapters=peft_params.routed_spec(ABC)).logits)(
      peft_params.route(params, 'c', ABC), {'decoder_input_tokens': X1[None]})
  np.testing.assert_allclose(routed[0], alone1[:5], atol=1e-5)


class _NoStartVocabulary(vocab_lib.ByteVocabulary):
  """Bytes without a start id (as Qwen's tokenizer): a sequence's first token is read first."""
  pad_starts_sequences = False


def _batch(vocab, prompt_length, batch_size=4):
  mixture = mixtures.Mixture('decoder_peft', TASKS)
  it = pipeline.train_iterator(mixture, vocab, pipeline.PipelineConfig(
      LENGTHS, batch_size=batch_size, prefetch=0, prompt_length=prompt_length,
      feature_converter=feature_converters.DecoderOnlyFeatureConverter()), 0, 1)
  batch = next(it)
  it.close()
  return mixture, batch


@pytest.mark.parametrize('vocab, start', [(_NoStartVocabulary(), []), (vocab_lib.ByteVocabulary(), [0])])
def test_the_pipeline_puts_the_soft_prompt_first_in_every_segment(vocab, start):
  """Without a start id the first prompt id, -1, is what each sequence reads first; with one
  (T5's PAD, a tokenizer's BOS) the start id comes before the prompt."""
  _, batch = _batch(vocab, prompt_length=3)
  tokens, segments = batch['decoder_input_tokens'], batch['decoder_segment_ids']
  weights = batch['decoder_loss_weights']
  firsts = 0
  for row in range(len(tokens)):
    for segment in set(segments[row][segments[row] > 0].tolist()):
      where = np.flatnonzero(segments[row] == segment)
      assert tokens[row, where[:len(start) + 3]].tolist() == start + [-1, -2, -3]
      assert not weights[row, where[:3]].any()   # no loss where a prompt id is read or predicted
      firsts += 1
  assert firsts > len(tokens)   # packed rows: the prompt once per segment
  assert (tokens >= 0).sum() > 0 and (tokens < 0).sum() == 3 * firsts


def test_soft_prompt_positions_embed_the_prompt_params(small_params):
  """Prompt rows set to the embeddings of tokens t: the ids -1..-n read as t (scaled as
  tokens are), so the logits equal the base's on t; and no position past the prompt
  changes when a prompt id does not occur."""
  spec = AdapterSpec(prompt_length=3)
  base = small_params[0]
  t = np.array([5, 9, 17])
  params = {**base, 'prompt_embedding': np.asarray(base['embedding'])[t]}
  ours = jax.jit(models.build(SMALL, adapters=spec).logits)(
      params, _row([np.concatenate([[-1, -2, -3], X0]), X1[:3]], [0, 1]))
  want = BASE_LOGITS(base, _row([np.concatenate([t, X0]), X1[:3]], [0, 1]))
  np.testing.assert_allclose(ours, want, atol=1e-5)
  # init_prompt: each row is a vocabulary embedding (Lester et al.'s sampled init).
  started = peft_params.init_prompt({**params}, spec, jax.random.key(3), SMALL.vocab_size)
  rows = np.asarray(started['prompt_embedding'])
  assert all((np.asarray(base['embedding']) == r).all(-1).any() for r in rows)


def test_a_train_step_updates_only_the_adapters():
  """LoRA (task bank) on the seven projections + a soft prompt, two steps on a pipeline
  batch: the state holds the adapters only, the optimizer state has no frozen leaf, the
  frozen base is an input the step never writes, and every adapter leaf trains."""
  mixture, batch = _batch(_NoStartVocabulary(), prompt_length=2, batch_size=2)
  spec = runs.spec_for_mixture(AdapterSpec(
      lora=LoraSpec(rank=2, targets=SEVEN, sharing='task'), prompt_length=2), mixture)
  config = dataclasses.replace(SMALL, vocab_size=384)
  model = models.build(config, adapters=spec)
  peft_params.check_against_base(spec, nn_unbox(models.build(config)))
  optimizer = optimizers.OptimizerConfig(name='adamw', learning_rate=1e-2).build()
  mesh = partitioning.make_mesh({'data': 1}, jax.devices()[:1])
  rules = partitioning.rules_for('dp')
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  state, frozen = state_lib.create_adapter_state(model, optimizer, layout, jax.random.key(0))
  start, start_frozen = jax.device_get(state.params), jax.device_get(frozen)
  trainable = flat(start)
  assert all(peft_params.is_adapter(k) for k in trainable) and 'prompt_embedding' in trainable
  assert not set(trainable) & set(flat(start_frozen))
  assert set(trainable) | set(flat(start_frozen)) == set(flat(nn_unbox(model)))
  fn = step_lib.jit_train_step(step_lib.make_train_step(model, optimizer,
                                                        mixture.loss_weights()),
                               layout, mesh, rules)
  for _ in range(2):
    state, metrics = fn(state, partitioning.global_batch(batch, mesh), jax.random.key(1),
                        frozen)
    assert np.isfinite(float(metrics['loss']))
  for k, v in flat(jax.device_get(state.params)).items():
    assert not np.array_equal(v, trainable[k]), k            # every adapter leaf trained
  for k, v in flat(jax.device_get(frozen)).items():
    np.testing.assert_array_equal(v, flat(start_frozen)[k], err_msg=k)
  def state_paths(tree):
    return {'/'.join(str(getattr(p, 'key', p)) for p in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  opt_paths = state_paths(state.opt_state)
  assert not [p for p in opt_paths if any(p.endswith('/' + f) for f in flat(start_frozen))]
  assert any(p.endswith('layers_0/mlp/wo_lora_task_b') for p in opt_paths)


# --- peft's files and the merged export, against transformers ---------------------------------

@pytest.fixture(scope='module')
def hf_base(tmp_path_factory):
  """A random-weight Qwen2 (GQA, q/k/v biases, untied) written with save_pretrained."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from tests.models.test_hf_causal import _randomize  # pylint: disable=import-outside-toplevel
  config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=False,
                                    max_position_embeddings=64)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).eval()
  _randomize(model, seed=3, gemma=False)
  path = str(tmp_path_factory.mktemp('qwen2') / 'base')
  model.save_pretrained(path)
  return path


def _theirs(model, tokens):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def test_peft_loads_our_lora_with_hf_module_names_and_the_merged_export_loads_plain(
    hf_base, tmp_path):
  peft = pytest.importorskip('peft')
  import transformers  # pylint: disable=import-outside-toplevel
  from tests.peft.test_export import _assert_as_peft_saves  # pylint: disable=import-outside-toplevel
  config, base = hf_causal.load(hf_base)
  spec = AdapterSpec(lora=LoraSpec(rank=2, alpha=3, targets=SEVEN, sharing='group+task'),
                     tasks=('a', 'b', 'c'), groups=(('g1', ('a', 'b')), ('g2', ('c',))))
  rng = np.random.default_rng(1)
  leaves = dict(flat(base))
  for path in list(leaves):
    if peft_params.projection_of(path):
      d_in, d_out = leaves[path].shape
      for bank in spec.lora.banks:
        size = spec.bank_size(bank)
        leaves[f'{path}_lora_{bank}_a'] = rng.normal(0, d_in ** -0.5, (size, d_in, 2)
                                                     ).astype(np.float32)
        leaves[f'{path}_lora_{bank}_b'] = rng.normal(0, 0.2, (size, 2, d_out)).astype(np.float32)
  params = nest(leaves)
  assert set(flat(params)) == set(flat(nn_unbox(models.build(config, adapters=spec))))
  export.save_peft_adapter(config, params, spec, str(tmp_path / 'adapter'), task='b')
  hf_io.save(config, export.merge_lora(params, spec, task='b'), str(tmp_path / 'merged'))
  auto = transformers.AutoModelForCausalLM.from_pretrained
  unmerged = peft.PeftModel.from_pretrained(auto(hf_base), str(tmp_path / 'adapter')).eval()
  tokens = np.random.default_rng(0).integers(0, 96, (2, 11))
  theirs = _theirs(unmerged, tokens)
  with unmerged.disable_adapter():
    assert np.abs(theirs - _theirs(unmerged, tokens)).max() > 1e-2   # the adapter matters
  ours = np.asarray(jax.jit(models.build(config, adapters=spec).logits)(
      params, {'decoder_input_tokens': tokens,
               'decoder_task_ids': np.full(tokens.shape, spec.tasks.index('b'))}))
  merged = _theirs(auto(str(tmp_path / 'merged')).eval(), tokens)
  print(f'decoder-only LoRA: max |ours - peft| = {np.abs(ours - theirs).max():.2g}, '
        f'max |merged (transformers) - peft| = {np.abs(merged - theirs).max():.2g}')
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  np.testing.assert_allclose(merged, theirs, rtol=0, atol=1e-5)
  peft_config = _assert_as_peft_saves(unmerged, tmp_path / 'adapter', tmp_path)
  assert peft_config['task_type'] == 'CAUSAL_LM'
  assert peft_config['target_modules'] == sorted(SEVEN)
  assert (peft_config['r'], peft_config['lora_alpha']) == (4, 6)   # group + task slots


def test_peft_prompt_tuning_of_a_causal_lm_reads_our_soft_prompt(hf_base, tmp_path):
  """peft's PROMPT_TUNING (CAUSAL_LM) prepends the prompt at positions 0..n-1 and returns
  logits for them too: our model on -1..-n followed by the tokens."""
  peft = pytest.importorskip('peft')
  import transformers  # pylint: disable=import-outside-toplevel
  from tests.peft.test_export import _assert_as_peft_saves  # pylint: disable=import-outside-toplevel
  config, base = hf_causal.load(hf_base)
  spec = AdapterSpec(prompt_length=3)
  params = {**base, 'prompt_embedding': np.random.default_rng(2).normal(
      0, 1, (3, config.hidden_size)).astype(np.float32)}
  export.save_peft_adapter(config, params, spec, str(tmp_path / 'adapter'))
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(hf_base),
      str(tmp_path / 'adapter')).eval()
  tokens = np.random.default_rng(0).integers(0, 96, (2, 8))
  theirs = _theirs(model, tokens)
  ours = np.asarray(jax.jit(models.build(config, adapters=spec).logits)(params, {
      'decoder_input_tokens': np.concatenate([np.tile([-1, -2, -3], (2, 1)), tokens], 1)}))
  print(f'decoder-only prompt: max |ours - peft| = {np.abs(ours - theirs).max():.2g}')
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  peft_config = _assert_as_peft_saves(model, tmp_path / 'adapter', tmp_path)
  assert (peft_config['peft_type'], peft_config['task_type']) == ('PROMPT_TUNING', 'CAUSAL_LM')
  with pytest.raises(export.ExportError, match='soft prompt.*adapters_only'):
    export.merge_lora(params, spec)


def test_spec_names_the_decoder_only_projections():
  assert LoraSpec(targets=SEVEN).targets == ('query', 'key', 'value', 'out', 'wi_0', 'wi_1', 'wo')
  assert LoraSpec(targets=('gate', 'up', 'down')).targets == ('wi_0', 'wi_1', 'wo')
  from t5x_lite import validation  # pylint: disable=import-outside-toplevel
  with pytest.raises(validation.ConfigError, match='unknown.*q_proj, k_proj'):
    LoraSpec(targets=('qproj',))
  with pytest.raises(validation.ConfigError, match="'query' is no projection of this model in "
                                                   'encoder; its projections: key, out'):
    peft_params.check_against_base(AdapterSpec(lora=LoraSpec(stacks=('encoder',))),
                                   nn_unbox(models.build(SMALL)))
