"""LoRA merge == peft's unmerged LoRA on the Hugging Face model; our adapter files == peft's."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import load_file

peft = pytest.importorskip('peft')
import torch  # pylint: disable=g-import-not-at-top,wrong-import-order
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-order

from t5x_lite import hf, models  # pylint: disable=g-import-not-at-top
from t5x_lite.peft import export  # pylint: disable=g-import-not-at-top
from t5x_lite.peft.spec import AdapterSpec, LoraSpec  # pylint: disable=g-import-not-at-top

TASKS = ('a', 'b', 'c')
GROUPS = (('g1', ('a', 'b')), ('g2', ('c',)))
# name -> (feed_forward_proj, tie_word_embeddings, spec, task, peft's target_modules)
CASES = {
    'qv_shared': ('relu', True, AdapterSpec(lora=LoraSpec(rank=4, alpha=8, targets=('q', 'v'))),
                  None, ['q', 'v']),
    'mlp_decoder_only': (
        'gated-gelu', False,
        AdapterSpec(lora=LoraSpec(rank=2, alpha=3, targets=('wi', 'wo'), stacks=('decoder',))),
        None, r'decoder\.block\.\d+\.layer\.\d+\.\w+\.(?:wi_0|wi_1|wo)'),
    'group_plus_task': (
        'gated-gelu', False,
        AdapterSpec(lora=LoraSpec(rank=2, alpha=4, targets=('query', 'key', 'value', 'out'),
                                  sharing='group+task'), tasks=TASKS, groups=GROUPS),
        'b', ['k', 'o', 'q', 'v']),
}


def _config(ffn, tie):
  return models.T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                         num_encoder_layers=2, num_decoder_layers=2, feed_forward_proj=ffn,
                         tie_word_embeddings=tie, dropout_rate=0.0)


@functools.lru_cache(maxsize=None)
def _base(ffn, tie):
  params = models.init_params(_config(ffn, tie), jax.random.key(0))
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep='/')


def _params(ffn, tie, spec, seed=1):
  """Random base params plus nonzero random LoRA leaves / prompt per the adapter contract."""
  flat, rng = dict(_base(ffn, tie)), np.random.default_rng(seed)
  lora = spec.lora
  for path in list(flat):
    stack, _, module, proj = path.split('/') if path.count('/') == 3 else ('',) * 4
    if lora and module in ('attention', 'self_attention', 'encoder_decoder_attention', 'mlp') \
        and lora.adapts(stack, proj):
      d_in, d_out = flat[path].shape
      for bank in lora.banks:
        size = spec.bank_size(bank)
        flat[f'{path}_lora_{bank}_a'] = rng.normal(0, d_in ** -0.5, (size, d_in, lora.rank)
                                                   ).astype(np.float32)
        flat[f'{path}_lora_{bank}_b'] = rng.normal(0, 0.2, (size, lora.rank, d_out)
                                                   ).astype(np.float32)
  if spec.prompt_length:
    flat[export.PROMPT] = rng.normal(0, 1, (spec.prompt_length, 16)).astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


def _batch():
  rng = np.random.default_rng(0)
  enc, dec = rng.integers(2, 64, (3, 9)), rng.integers(2, 64, (3, 5))
  enc[1, 4:] = 0
  dec[:, 0] = 0
  return torch.tensor(enc), torch.tensor(enc != 0), torch.tensor(dec)


def _logits(model, **inputs):
  enc, mask, dec = _batch()
  with torch.no_grad():
    return model(**({'input_ids': enc} if not inputs else inputs), attention_mask=mask,
                 decoder_input_ids=dec).logits.numpy()


def _ours(config, params, spec=None, task=None, prompt_length=0):
  """Our model's logits on `_batch()`, unmerged: adapters routed to `task`'s slots."""
  enc, _, dec = (x.numpy() for x in _batch())
  if prompt_length:   # the data pipeline's soft prompt ids -1..-n before every input
    enc = np.concatenate([np.tile(-np.arange(1, prompt_length + 1), (len(enc), 1)), enc], 1)
  kwargs = {}
  if spec is not None and spec.per_task:
    kwargs['decoder_task_ids'] = np.full(dec.shape, spec.tasks.index(task), np.int32)
  model = models.Transformer(config, adapters=spec)
  return np.asarray(jax.jit(model.apply)({'params': params}, enc, dec, **kwargs))


def _hf(path):
  return transformers.T5ForConditionalGeneration.from_pretrained(str(path)).eval()


def _assert_as_peft_saves(model, adapter_dir, tmp_path):
  """peft holds exactly our tensors (target_modules selects the adapted modules and no other)
  and writes the same tensors and config values when it saves them itself."""
  ours = load_file(str(adapter_dir / export.ADAPTER_WEIGHTS))
  held = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  assert held.keys() == ours.keys()
  model.save_pretrained(str(tmp_path / 'resaved'))
  theirs = load_file(str(tmp_path / 'resaved' / export.ADAPTER_WEIGHTS))
  assert theirs.keys() == ours.keys()
  for name, x in ours.items():
    np.testing.assert_array_equal(theirs[name], x)
  our_config = json.loads((adapter_dir / export.ADAPTER_CONFIG).read_text())
  their_config = json.loads((tmp_path / 'resaved' / export.ADAPTER_CONFIG).read_text())
  # peft fills base_model_name_or_path from the base it was loaded onto when the file has
  # none, and holds a target_modules list as a set (written back in set order).
  assert our_config['base_model_name_or_path'] is None
  def normal(config):
    return {k: sorted(v) if isinstance(v, list) else v for k, v in config.items()
            if k != 'base_model_name_or_path'}
  assert normal({k: their_config.get(k) for k in our_config}) == normal(our_config)
  return our_config


@pytest.mark.parametrize('case', sorted(CASES))
def test_merged_equals_peft_unmerged(case, tmp_path):
  ffn, tie, spec, task, target_modules = CASES[case]
  config, params = _config(ffn, tie), _params(ffn, tie, spec)
  hf.save(config, export.merge_lora(params, spec, task), str(tmp_path / 'merged'))
  hf.save(config, export.base_params(params), str(tmp_path / 'base'))
  export.save_peft_adapter(config, params, spec, str(tmp_path / 'adapter'), task=task)
  unmerged = peft.PeftModel.from_pretrained(_hf(tmp_path / 'base'), str(tmp_path / 'adapter'))
  merged, theirs = _logits(_hf(tmp_path / 'merged')), _logits(unmerged.eval())
  with unmerged.disable_adapter():
    base = _logits(unmerged)
  err = np.abs(merged - theirs).max()
  print(f'{case}: max |merged - peft| = {err:.2g}, adapter moves logits by '
        f'{np.abs(theirs - base).max():.2g}')
  assert err <= 1e-5
  assert np.abs(theirs - base).max() > 1e-2   # the adapter does something
  peft_config = _assert_as_peft_saves(unmerged, tmp_path / 'adapter', tmp_path)
  assert peft_config['target_modules'] == target_modules
  banks = 2 if spec.lora.sharing == 'group+task' else 1
  assert (peft_config['r'], peft_config['lora_alpha']) == (spec.lora.rank * banks,
                                                           spec.lora.alpha * banks)
  if case != 'group_plus_task':   # our model once: ~3 s of compiles per adapter layout
    return
  # Our model, unmerged (both banks routed by task id) == merged, and == peft.
  unmerged_ours = _ours(config, params, spec, task)
  merged_ours = _ours(config, export.merge_lora(params, spec, task))
  print(f'{case}: ours max |merged - unmerged| = {np.abs(merged_ours - unmerged_ours).max():.2g},'
        f' max |ours - peft| = {np.abs(unmerged_ours - theirs).max():.2g}')
  np.testing.assert_allclose(merged_ours, unmerged_ours, rtol=0, atol=1e-5)
  np.testing.assert_allclose(unmerged_ours, theirs, rtol=0, atol=1e-4)   # as tests/test_hf.py


def test_merge_sums_the_task_slots_of_each_bank():
  """'group+task': task 'c' gets group g2's slot 1 plus task slot 2; a bank without the task's
  slot ('group' sharing, a task in no group) adds nothing."""
  spec = CASES['group_plus_task'][2]
  params = _params('gated-gelu', False, spec)
  path = 'decoder/layers_1/encoder_decoder_attention/value'
  flat = traverse_util.flatten_dict(params, sep='/')
  def ab(bank, slot):
    return flat[f'{path}_lora_{bank}_a'][slot] @ flat[f'{path}_lora_{bank}_b'][slot]
  w = flat[path] + spec.lora.scale * (ab('group', 1) + ab('task', 2))
  merged = traverse_util.flatten_dict(export.merge_lora(params, spec, 'c'), sep='/')
  np.testing.assert_allclose(merged[path], w, rtol=1e-6, atol=1e-6)
  assert not any('_lora_' in p for p in merged)
  lone = AdapterSpec(lora=LoraSpec(rank=2, sharing='group'), tasks=('x', 'y'),
                     groups=(('g', ('x',)),))
  merged = export.merge_lora(_params('relu', True, lone), lone, 'y')
  for p, x in traverse_util.flatten_dict(merged, sep='/').items():
    np.testing.assert_array_equal(x, _base('relu', True)[p])


def test_prompt_tuning_as_peft_prepends_the_prompt(tmp_path):
  """peft PROMPT_TUNING (encoder only) computes our contract: prompt_embedding[k] as the k-th
  encoder input, attended to, before the tokens."""
  spec = AdapterSpec(prompt_length=3)
  config, params = _config('relu', True), _params('relu', True, spec)
  hf.save(config, export.base_params(params), str(tmp_path / 'base'))
  export.save_peft_adapter(config, params, spec, str(tmp_path / 'adapter'))
  model = peft.PeftModel.from_pretrained(_hf(tmp_path / 'base'), str(tmp_path / 'adapter')).eval()
  base, (enc, mask, dec) = _hf(tmp_path / 'base'), _batch()
  prompt = torch.tensor(params['encoder']['prompt_embedding'])[None].expand(enc.shape[0], -1, -1)
  with torch.no_grad():
    want = base(inputs_embeds=torch.cat([prompt, base.shared(enc)], 1),
                attention_mask=torch.cat([torch.ones(enc.shape[0], 3, dtype=mask.dtype), mask], 1),
                decoder_input_ids=dec).logits.numpy()
  theirs = _logits(model)
  np.testing.assert_allclose(theirs, want, rtol=0, atol=1e-6)
  ours = _ours(config, params, spec, prompt_length=3)
  print(f'prompt: max |ours - peft| = {np.abs(ours - theirs).max():.2g}')
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)   # as tests/test_hf.py
  peft_config = _assert_as_peft_saves(model, tmp_path / 'adapter', tmp_path)
  assert peft_config['peft_type'] == 'PROMPT_TUNING'


PER_TASK = AdapterSpec(lora=LoraSpec(rank=2, sharing='task'), tasks=TASKS)


@pytest.mark.parametrize('spec, task, call, message', [
    (PER_TASK, None, 'merge', r"per task \(sharing='task'\).*task=NAME.*\['a', 'b', 'c'\]"),
    (PER_TASK, None, 'save', r"choose the task.*\['a', 'b', 'c'\]"),
    (PER_TASK, 'zzz', 'merge', r"task 'zzz' has no adapter.*\['a', 'b', 'c'\]"),
    (CASES['group_plus_task'][2], 'nope', 'save', r"'nope'.*\['a', 'b', 'c'\]"),
    (AdapterSpec(prompt_length=3), None, 'merge', 'soft prompt.*adapters_only'),
    (AdapterSpec(lora=LoraSpec(), prompt_length=3), None, 'save', 'one method'),
    (AdapterSpec(lora=LoraSpec(), train=('layer_norm',)), None, 'save', 'merged model'),
])
def test_errors_name_the_fix(spec, task, call, message, tmp_path):
  params = _params('relu', True, spec)
  with pytest.raises(export.ExportError, match=message):
    if call == 'merge':
      export.merge_lora(params, spec, task)
    else:
      export.save_peft_adapter(_config('relu', True), params, spec, str(tmp_path), task)


def test_leaves_that_do_not_match_the_spec_are_refused():
  spec = CASES['qv_shared'][2]
  params = _params('relu', True, spec)
  with pytest.raises(export.ExportError, match=r"missing \[.*query_lora_shared"):
    export.merge_lora(export.base_params(params), spec)
  other = AdapterSpec(lora=LoraSpec(rank=2, targets=('q', 'v')))
  with pytest.raises(export.ExportError, match=r'shape \(1, 16, 4\).*\(1, 16, 2\)'):
    export.merge_lora(params, other)
  assert set(export.lora_leaves(params)) == {
      p for p in traverse_util.flatten_dict(params, sep='/') if '_lora_shared_' in p}


def test_the_models_adapter_leaves_are_the_ones_export_reads():
  """The model's adapter leaves (`abstract_params(adapters=spec)`: no compile) have the names
  and shapes of this file's `_params`, the contract export reads, and merge as such."""
  spec = dataclasses.replace(CASES['group_plus_task'][2], prompt_length=2)
  abstract = nn.unbox(models.abstract_params(_config('gated-gelu', False), adapters=spec))
  flat = traverse_util.flatten_dict(abstract, sep='/')
  ours = traverse_util.flatten_dict(_params('gated-gelu', False, spec), sep='/')
  assert {p: flat[p].shape for p in flat} == {p: ours[p].shape for p in ours}
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  assert set(export.lora_leaves(zeros)) == {p for p in flat if '_lora_' in p}
  merged = export.merge_lora(zeros, dataclasses.replace(spec, prompt_length=0), 'a')
  assert set(traverse_util.flatten_dict(merged, sep='/')) == set(_base('gated-gelu', False))
