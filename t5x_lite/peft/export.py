"""LoRA merged into the base weights, and adapters written in `peft`'s file format, for every
model family with a Hugging Face format (T5; the decoder-only Llama, Qwen2/3, Gemma).

`merge_lora` folds W + (alpha / r) A B into every adapted kernel, so `t5x_lite.hf_io.save`
writes a plain Hugging Face model that computes the adapted model (its logits equal peft's
unmerged LoRA within 1e-5 in fp32: tests/peft/test_export.py, and
tests/peft/test_decoder_only_adapters.py). `save_peft_adapter` writes what peft's
`PeftModel.save_pretrained` writes for a LoRA or prompt tuning (peft 0.21-0.22:
`adapter_config.json` + `adapter_model.safetensors`, the tensors named as in peft's
`get_peft_model_state_dict`, the modules by their Hugging Face names: T5's `q` ... `wo`, a
causal LM's `q_proj` ... `down_proj`), which `peft.PeftModel.from_pretrained(hf_base, dir)`
loads.

Our adapter leaves (the contract of t5x_lite/models/lora.py): `<module>/<P>_lora_<bank>_a`
[S, d_in, r] and `..._b` [S, r, d_out] beside kernel `<module>/<P>` [d_in, d_out]; peft's
`lora_A.weight` is A[s].T [r, in] and `lora_B.weight` B[s].T [out, r], as HF Linear weights
are our kernels transposed (t5x_lite/hf.py, hf_causal.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np
from safetensors.numpy import save_file

from t5x_lite import errors, hf_io
from t5x_lite.peft import params as peft_params
from t5x_lite.peft.spec import ATTENTION, BANKS, MLP, AdapterSpec

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
PROMPT = 'encoder/prompt_embedding'   # T5's soft prompt (FORMATS: every family's)
_LEAF = re.compile(rf'(?P<module>.+)/(?P<proj>{"|".join(ATTENTION + MLP)})'
                   rf'_lora_(?P<bank>{"|".join(BANKS)})_(?P<half>[ab])')


@dataclasses.dataclass(frozen=True)
class PeftFormat:
  """What peft's files say for one model family (a config's `family`)."""
  task_type: str                 # peft's TaskType of the family's Hugging Face model class
  prompt: str                    # our soft prompt leaf
  prompt_fields: Callable[[Any], dict]   # PROMPT_TUNING's token_dim, heads, layers
  # One stack's adapted modules as a regex ('{stack}', '{projs}' filled in), for a
  # target_modules that names alone cannot give; None: one stack, names always suffice.
  module_regex: str | None = None


FORMATS = {
    't5': PeftFormat('SEQ_2_SEQ_LM', PROMPT, lambda c: {
        'token_dim': c.d_model, 'num_attention_heads': c.num_heads,
        'num_layers': c.num_encoder_layers}, r'{stack}\.block\.\d+\.layer\.\d+\.\w+\.{projs}'),
    'decoder_only': PeftFormat('CAUSAL_LM', 'prompt_embedding', lambda c: {
        'token_dim': c.hidden_size, 'num_attention_heads': c.num_heads,
        'num_layers': c.num_layers}),
}
_PROMPTS = {f.prompt for f in FORMATS.values()}


def _format(config: Any) -> PeftFormat:
  if config.family not in FORMATS:
    raise ExportError(f'no peft format for the model family {config.family!r}; families: '
                      f'{", ".join(sorted(FORMATS))}.')
  return FORMATS[config.family]


class ExportError(errors.UserError, ValueError):
  """Adapters that cannot be merged or written as asked."""


# --- params trees ---------------------------------------------------------------------

def lora_leaves(params: Mapping) -> dict[str, Any]:
  """'/'-joined path -> leaf, for the LoRA leaves of a params tree."""
  return {p: v for p, v in peft_params.flat(params).items() if _LEAF.fullmatch(p)}


def base_params(params: Mapping) -> dict:
  """The tree without LoRA leaves nor the soft prompt: what `t5x_lite.hf_io.save` writes."""
  return peft_params.nest({p: v for p, v in peft_params.flat(params).items()
                           if p not in _PROMPTS and not _LEAF.fullmatch(p)})


# --- which adapters ---------------------------------------------------------------------

def task_choices(spec: AdapterSpec) -> tuple[str, ...]:
  """The tasks that have an adapter slot: the task bank's, then the groups' members."""
  return tuple(dict.fromkeys(spec.tasks + tuple(t for _, ts in spec.groups for t in ts)))


def _check_task(spec: AdapterSpec, task: str | None) -> None:
  """A per-task spec needs one of its tasks; a 'shared' LoRA is every task's (task ignored)."""
  if not spec.per_task:
    return
  choices = list(task_choices(spec))
  if task is None:
    raise ExportError(
        f'the LoRA adapters are per task (sharing={spec.lora.sharing!r}): choose the task whose '
        f'adapter to export with task=NAME (t5x-lite export --task=NAME), one of {choices}.')
  if task not in choices:
    raise ExportError(f'task {task!r} has no adapter in this run (sharing='
                      f'{spec.lora.sharing!r}): choose one of {choices}.')


def _lora_pairs(leaves: Mapping[str, Any], spec: AdapterSpec, task: str | None,
                kernel_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list]:
  """Adapted kernel path -> [(A [d_in, r], B [r, d_out]) of each bank where `task` has a
  slot], after checking that the leaves are exactly the spec's, with the spec's shapes."""
  found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for path, x in leaves.items():
    m = _LEAF.fullmatch(path)
    found.setdefault((f'{m["module"]}/{m["proj"]}', m['bank']), {})[m['half']] = np.asarray(x)
  lora = spec.lora
  if lora is None:
    if found:
      raise ExportError(f'the params hold LoRA leaves ({sorted(leaves)[0]}, ...) but the adapter '
                        'spec has no lora: pass the spec the run was trained with.')
    return {}
  expected = {(p, bank) for p in kernel_shapes if (sp := peft_params.projection_of(p))
              and lora.adapts(*sp) for bank in lora.banks}
  if set(found) != expected:
    missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
    absent = [p for p, _ in extra if p not in kernel_shapes]
    raise ExportError(
        f'the params do not hold the LoRA leaves of the adapter spec (targets '
        f'{list(lora.targets)}, stacks {list(lora.stacks)}, sharing {lora.sharing!r}): missing '
        f'{[f"{p}_lora_{b}" for p, b in missing[:3]]}, unexpected '
        f'{[f"{p}_lora_{b}" for p, b in extra[:3]]}'
        + (f'; base kernels absent, e.g. {absent[0]} (merging needs the base and the adapters'
           ' in one tree)' if absent else '') + '.')
  slots, out = spec.slots(task), {}
  for (path, bank), halves in sorted(found.items()):
    if set(halves) != {'a', 'b'}:
      raise ExportError(f'LoRA {path} bank {bank!r} has only its {list(halves)[0]!r} matrix.')
    d_in, d_out = kernel_shapes[path]
    size = spec.bank_size(bank)
    want = {'a': (size, d_in, lora.rank), 'b': (size, lora.rank, d_out)}
    for half, x in halves.items():
      if x.shape != want[half]:
        raise ExportError(f'{path}_lora_{bank}_{half} has shape {x.shape}; the spec (rank '
                          f'{lora.rank}, {size} {bank} slot(s)) and the kernel give {want[half]}.')
    pairs = out.setdefault(path, [])
    if slots[bank] is not None:
      pairs.append((halves['a'][slots[bank]], halves['b'][slots[bank]]))
  return out


# --- merging ----------------------------------------------------------------------------

def merge_lora(params: Mapping, spec: AdapterSpec, task: str | None = None) -> dict:
  """Base params with W + (alpha / r) * sum over banks of A[slot] @ B[slot] in every adapted
  kernel (slots: `spec.slots(task)`; a bank where the task has no slot adds nothing),
  computed in float32 and cast back to W's dtype. Base parameters the run trained too
  (`spec.train`) are already in `params`."""
  if spec.prompt_length:
    raise ExportError(
        f'the run trained a soft prompt (prompt_length={spec.prompt_length}), which a plain '
        'Hugging Face model (T5 or causal LM) cannot hold: export with adapters_only (t5x-lite export '
        '--adapters_only writes peft PROMPT_TUNING for a prompt without LoRA), or train without '
        'the prompt.')
  _check_task(spec, task)
  flat = peft_params.flat(base_params(params))
  shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
  scale = np.float32(spec.lora.scale) if spec.lora else None
  for path, pairs in _lora_pairs(lora_leaves(params), spec, task, shapes).items():
    if pairs:
      w = np.asarray(flat[path])
      delta = sum(np.asarray(a, np.float32) @ np.asarray(b, np.float32) for a, b in pairs)
      flat[path] = (w.astype(np.float32) + scale * delta).astype(w.dtype)
  return peft_params.nest(flat)


# --- peft's files -----------------------------------------------------------------------

def _target_modules(adapted: set[str], candidates: set[str], module_regex: str | None
                    ) -> list[str] | str:
  """peft's `target_modules` that selects exactly `adapted` among the model's projections.

  peft (`tuners_utils.check_target_module_exists`) matches a list entry by equality or as
  the module name's last component, and a string with `re.fullmatch`. The shortest exact
  choice: names (['q', 'v'], peft's T5 default; ['q_proj', 'v_proj'], its Llama one), else
  one regex per stack (`module_regex`), else the full names."""
  def selects(match):
    return {c for c in candidates if match(c)}

  names = sorted({m.rsplit('.', 1)[1] for m in adapted})
  if selects(lambda c: c.rsplit('.', 1)[1] in names) == adapted:
    return names
  if module_regex is None:
    return sorted(adapted)
  by_stack: dict[str, set[str]] = {}
  for m in adapted:
    by_stack.setdefault(m.split('.', 1)[0], set()).add(m.rsplit('.', 1)[1])
  def either(alternatives):
    return alternatives[0] if len(alternatives) == 1 else f'(?:{"|".join(alternatives)})'
  regex = either([module_regex.format(stack=stack, projs=either(sorted(ps)))
                  for stack, ps in sorted(by_stack.items())])
  if selects(lambda c: re.fullmatch(regex, c)) == adapted:
    return regex
  return sorted(adapted)


def _lora_files(config: Any, flat: Mapping[str, Any], spec: AdapterSpec,
                task: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  _check_task(spec, task)
  form = _format(config)
  kernels = {t.ours: t for t in hf_io.tensor_names(config)
             if t.layout == 'linear' and peft_params.projection_of(t.ours)}
  pairs = _lora_pairs({p: v for p, v in flat.items() if _LEAF.fullmatch(p)}, spec, task,
                      {p: t.shape for p, t in kernels.items()})
  if not pairs:
    raise ExportError(f'LoRA targets {list(spec.lora.targets)} in stacks {list(spec.lora.stacks)}'
                      ' adapt no projection of this model: nothing to export.')
  banks = len(next(iter(pairs.values())))   # the same banks have a slot for every kernel
  if not banks:
    raise ExportError(f'task {task!r} has no LoRA slot in any bank ({spec.slots(task)}): its '
                      'model is the base model; export that instead.')
  tensors, modules = {}, set()
  for path, ab in pairs.items():
    module = kernels[path].theirs.removesuffix('.weight')
    modules.add(module)
    # Banks side by side: [A_g A_t] [B_g; B_t] = A_g B_g + A_t B_t, one LoRA of rank r * banks.
    tensors[f'base_model.model.{module}.lora_A.weight'] = np.ascontiguousarray(
        np.concatenate([a for a, _ in ab], axis=1).T)
    tensors[f'base_model.model.{module}.lora_B.weight'] = np.ascontiguousarray(
        np.concatenate([b for _, b in ab], axis=0).T)
  alpha = spec.lora.alpha * banks   # so that lora_alpha / r stays alpha / rank exactly
  candidates = {t.theirs.removesuffix('.weight') for t in kernels.values()}
  peft_config = {
      'peft_type': 'LORA', 'task_type': form.task_type, 'r': spec.lora.rank * banks,
      'lora_alpha': int(alpha) if float(alpha).is_integer() else alpha,
      'lora_dropout': spec.lora.dropout,
      'target_modules': _target_modules(modules, candidates, form.module_regex),
      'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False,
      'lora_bias': False, 'init_lora_weights': True, 'inference_mode': True,
      'modules_to_save': None, 'exclude_modules': None, 'layers_to_transform': None,
      'layers_pattern': None, 'rank_pattern': {}, 'alpha_pattern': {},
      'revision': None, 'auto_mapping': None,
  }
  return tensors, peft_config


def _prompt_files(config: Any, flat: Mapping[str, Any], spec: AdapterSpec
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """peft's PROMPT_TUNING with one prompt (num_transformer_submodules 1): T5's on the encoder
  only. `PeftModelForSeq2SeqLM.forward` (and `PeftModelForCausalLM.forward`) prepends
  prompt_embeddings[k] as the k-th input embedding with attention mask 1, our contract's ids
  -1..-n (t5x_lite/peft/spec.py); a causal LM gives them positions 0..n-1, as our pipeline's
  ids first in the sequence do (a vocabulary with a start id, BOS, reads that before them)."""
  form = _format(config)
  prompt, fields = form.prompt, form.prompt_fields(config)
  want = (spec.prompt_length, fields['token_dim'])
  if prompt not in flat or tuple(np.shape(flat[prompt])) != want:
    raise ExportError(f'the params need {prompt} of shape {want} for prompt_length='
                      f'{spec.prompt_length}; got '
                      f'{tuple(np.shape(flat[prompt])) if prompt in flat else "none"}.')
  peft_config = {
      'peft_type': 'PROMPT_TUNING', 'task_type': form.task_type,
      'num_virtual_tokens': spec.prompt_length, 'num_transformer_submodules': 1, **fields,
      'prompt_tuning_init': 'RANDOM',
      'prompt_tuning_init_text': None, 'tokenizer_name_or_path': None,
      'tokenizer_kwargs': None, 'inference_mode': True, 'modules_to_save': None,
      'revision': None, 'auto_mapping': None,
  }
  return {'prompt_embeddings': np.ascontiguousarray(np.asarray(flat[prompt]))}, peft_config


def save_peft_adapter(config: Any, params: Mapping, spec: AdapterSpec, path: str,
                      task: str | None = None, base_model_name_or_path: str = '') -> None:
  """Write `adapter_config.json` + `adapter_model.safetensors` as peft's `save_pretrained`
  does, for `peft.PeftModel.from_pretrained(<the base as its HF model>, path)` (`config`'s
  family: T5 or a causal LM, `FORMATS`).

  `params` needs only the adapter leaves (the base is the HF model peft loads it onto).
  A LoRA adapter: the one shared LoRA, or `task`'s for per-task sharing. With
  'group+task' the task's group and task LoRAs (rank r each) are written as one LoRA of
  rank 2r, A's rows and B's columns concatenated, lora_alpha doubled: exact, since
  peft's B A is then the sum of the two. A soft prompt without LoRA: peft PROMPT_TUNING.
  """
  if spec.train:
    raise ExportError(
        f'the run also trained base parameters (train={list(spec.train)}), which a peft '
        'adapter does not hold: export the merged model (without adapters_only).')
  if spec.lora is not None and spec.prompt_length:
    raise ExportError(
        f'the run trained LoRA and a soft prompt (prompt_length={spec.prompt_length}); a peft '
        'adapter holds one method: train them as separate runs to export them for peft.')
  flat = peft_params.flat(params)
  if spec.lora is not None:
    tensors, peft_config = _lora_files(config, flat, spec, task)
  else:
    tensors, peft_config = _prompt_files(config, flat, spec)
  peft_config['base_model_name_or_path'] = base_model_name_or_path or None
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, ADAPTER_CONFIG), 'w') as f:
    json.dump(peft_config, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={'format': 'pt'})
