"""`t5x-lite convert` (Hugging Face dir -> model_dir) and `t5x-lite export` (back), for every
family hf_io.py reads (T5, Flan-T5, mT5, ByT5; Llama, Qwen2/2.5, Qwen3, Gemma).

Dtypes, as T5X's fine-tuning does them (t5x/configs/runs/finetune.gin:
`RestoreCheckpointConfig.dtype = 'float32'`, `SaveCheckpointConfig.dtype = 'float32'`):
`convert` stores the Hugging Face tensors as they are (a bf16 model stays bf16 on disk) and
writes `param_dtype = 'float32'` into model.gin and the checkpoint's model config, so a warm
start restores them cast to fp32 master weights (`--param_dtype=bfloat16` trains bf16
weights). `export` writes the dtype asked with `--dtype`; by default the dtype the checkpoint
stores: a converted checkpoint goes back as its source was, bit for bit, and a trained one
as its fp32 master weights, with nothing rounded unless asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil

from t5x_lite import errors
from t5x_lite.commands import common

MODEL_GIN = 'model.gin'
DTYPES = ('float32', 'bfloat16', 'float16')  # t5x_lite.models.t5.DTYPES (not imported: no jax)


def write_model_gin(path: str, config, vocabulary: str, source: str) -> None:
  """A gin file that rebuilds this model: its config's fields and its vocabulary."""
  package, _, module = type(config).__module__.rpartition('.')
  name = f'{module}.{type(config).__name__}'   # module.Class, as gin names it
  lines = [f'# Converted from {source} by `t5x-lite convert`.',
           '# Use after a run config (its VOCABULARY is then this one), e.g.',
           f'# --gin_file=gin_configs/runs/finetune.gin --gin_file={path}',
           f'# --gin.INITIAL_CHECKPOINT_PATH={os.path.dirname(path)}',
           'from __gin__ import dynamic_registration', f'from {package} import {module}', '',
           f'VOCABULARY = {vocabulary!r}', f'MODEL_CONFIG = @{name}()', f'{name}:']
  for field in dataclasses.fields(config):
    if field.name in ('dropout_rate', 'dtype'):
      continue
    if field.name == 'param_dtype':
      lines.append('  # master weights; the checkpoint is cast to them on restore (T5X restores '
                   "with dtype='float32')")
    lines.append(f'  {field.name} = {getattr(config, field.name)!r}')
  lines += ['  dropout_rate = %DROPOUT_RATE', '  dtype = %ACTIVATION_DTYPE', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


TOKENIZER_DIR = 'tokenizer'


def copy_vocabulary(hf_dir: str, model_dir: str, vocab_size: int) -> str:
  """The vocabulary spec of a converted model, its files copied into `model_dir`: T5's
  spiece.model, a Hugging Face tokenizer (tokenizer.json or tokenizer.model, with its configs
  and the model's config.json) in model_dir/tokenizer, ByT5's bytes, or '' (none found)."""
  from t5x_lite import hf_io  # pylint: disable=import-outside-toplevel
  spiece = os.path.join(hf_dir, 'spiece.model')
  if os.path.exists(spiece):
    shutil.copyfile(spiece, os.path.join(model_dir, 'spiece.model'))
    return os.path.join(model_dir, 'spiece.model')
  tokenizer = os.path.join(model_dir, TOKENIZER_DIR)
  if hf_io.copy_tokenizer(hf_dir, tokenizer):
    shutil.copyfile(os.path.join(hf_dir, 'config.json'), os.path.join(tokenizer, 'config.json'))
    return tokenizer
  return 'byte' if vocab_size == 384 else ''


def cmd_convert(args: argparse.Namespace) -> int:
  """Convert a Hugging Face directory (T5, Llama, Qwen2/3, Gemma) into a model_dir.

  The model_dir gets a checkpoint, model.gin and the vocabulary.

  The checkpoint holds the parameters only."""
  from t5x_lite import hf_io  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import checkpoints  # pylint: disable=import-outside-toplevel
  config, params = hf_io.load(args.hf_dir)
  source_dtype = config.param_dtype  # the dtype of the tensors (float32, bfloat16, float16)
  config = config.replace(param_dtype=args.param_dtype)
  model_dir = os.path.abspath(args.model_dir)
  os.makedirs(model_dir, exist_ok=True)
  vocabulary = copy_vocabulary(args.hf_dir, model_dir, config.vocab_size)
  if not vocabulary:
    print(f'warning: {args.hf_dir} has no spiece.model, tokenizer.json or tokenizer.model; '
          'set VOCABULARY yourself')
  ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
  ckpt.save(0, {'params': params}, None, checkpoints.meta_for(
      config, vocabulary, None, {'params_only': True, 'source': os.path.abspath(args.hf_dir)}))
  ckpt.close()
  write_model_gin(os.path.join(model_dir, MODEL_GIN), config, vocabulary, args.hf_dir)
  print(f'{args.hf_dir} -> {model_dir} (checkpoint 0 stored as {source_dtype}, {MODEL_GIN} with '
        f'param_dtype {args.param_dtype!r}, vocabulary {vocabulary!r})')
  return 0


def stored_dtypes(checkpoints_dir: str, step: int) -> set[str]:
  """The dtypes a checkpoint (`Checkpointer.directory`, step) stores its parameters in,
  from orbax's metadata: nothing is read."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from t5x_lite.rundir import paths  # pylint: disable=import-outside-toplevel
  path = paths.under(checkpoints_dir, str(int(step)), 'state')
  tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata['params']
  return {str(m.dtype) for m in jax.tree.leaves(tree)}


def load_params(model_dir: str, step: int | None = None, dtype: str | None = None):
  """(model config, host numpy params, meta) of a checkpoint, on one device; params in `dtype`
  (None: the model config's param_dtype, 'stored': as the checkpoint stores them)."""
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from t5x_lite import models  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import checkpoints, compatibility  # pylint: disable=import-outside-toplevel
  ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
  meta = ckpt.meta(step)
  if meta.get('peft'):   # adapters + the base they record: see load_adapter_run
    ckpt.close()
    raise errors.UserError(f'{model_dir} is an adapter run: use load_adapter_run')
  config = models.config_from_json(meta['model_config'])
  if dtype == 'stored':
    dtypes = stored_dtypes(ckpt.directory, meta['step'])
    dtype = dtypes.pop() if len(dtypes) == 1 else 'float32'  # mixed: nothing rounded
  if dtype is not None:
    config = config.replace(param_dtype=dtype)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nn.unbox(models.abstract_params(config)))
  compatibility.check(ckpt, meta['step'], meta, config, target, 'load',
                      'Its recorded model config does not describe its tensors.')
  params = jax.device_get(ckpt.restore_params(target, step))
  ckpt.close()
  return config, params, meta


def load_any(model_dir: str, step: int | None = None, dtype: str | None = None,
             base: str | None = None):
  """(model config, host params, meta, AdapterSpec or None) of a full or an adapter run: an
  adapter run's params are its adapters plus the base it recorded (or `base`), checked."""
  from t5x_lite.training import checkpoints  # pylint: disable=import-outside-toplevel
  ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
  try:
    adapters = bool(ckpt.meta(step).get('peft'))
  finally:
    ckpt.close()
  if not adapters:
    return (*load_params(model_dir, step, dtype), None)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from t5x_lite.peft import runs  # pylint: disable=import-outside-toplevel
  config, spec, params, meta = runs.restore_for_inference(model_dir, step, base_dir=base)
  params = jax.device_get(params)
  if dtype not in (None, 'stored'):
    config = config.replace(param_dtype=dtype)
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
  return config, params, meta, spec


def cmd_export(args: argparse.Namespace) -> int:
  """Export a checkpoint as a Hugging Face directory that transformers loads.

  An adapter run exports its LoRA merged into its base, or with --adapters_only peft's adapter
  files."""
  from t5x_lite import hf_io  # pylint: disable=import-outside-toplevel
  config, params, meta, spec = load_any(args.model_dir, common.checkpoint_step(args),
                                        args.dtype, args.base)
  vocabulary = meta.get('vocabulary') or ''
  what = f'{args.model_dir} (step {meta["step"]})'
  if spec is None and (args.adapters_only or args.task):
    raise errors.UserError(f'{what} has no adapters: --adapters_only and --task apply to '
                           'runs trained with loop.TrainConfig.adapters')
  if spec is not None:
    from t5x_lite.peft import export  # pylint: disable=import-outside-toplevel
    source = (meta.get('peft_base') or {}).get('source', '')
    if args.adapters_only:
      export.save_peft_adapter(config, params, spec, args.hf_dir, task=args.task,
                               base_model_name_or_path=source)
      print(f'{what} adapters{f" of task {args.task}" if args.task else ""} -> {args.hf_dir} '
            '(peft: adapter_config.json + adapter_model.safetensors)')
      return 0
    params = export.merge_lora(params, spec, task=args.task)
    what += f', LoRA merged into its base {source}' + (f' for task {args.task}'
                                                       if args.task else '')
  hf_io.save(config, params, args.hf_dir, vocabulary)
  print(f'{what} -> {args.hf_dir} ({config.param_dtype})')
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser('convert', help=cmd_convert.__doc__.splitlines()[0])
  p.add_argument('--hf_dir', required=True, help='config.json + safetensors (or .bin)')
  p.add_argument('--model_dir', required=True)
  p.add_argument('--param_dtype', default='float32', choices=DTYPES,
                 help="master weights a warm start trains (model.gin's param_dtype); the "
                      'checkpoint keeps the source dtype and is cast on restore')
  p.set_defaults(func=cmd_convert)
  p = sub.add_parser('export', help=cmd_export.__doc__.splitlines()[0])
  p.add_argument('--model_dir', required=True)
  p.add_argument('--hf_dir', required=True, help='output directory')
  common.checkpoint_args(p)
  p.add_argument('--dtype', default='stored', choices=DTYPES + ('stored',),
                 help='dtype of the written tensors; default: as the checkpoint stores them')
  adapter_args(p)
  p.add_argument('--adapters_only', action='store_true',
                 help="adapter run: write peft's adapter_config.json + "
                      'adapter_model.safetensors instead of the merged model')
  p.set_defaults(func=cmd_export)


def adapter_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('--task', default=None,
                 help='per-task/group adapters: the task whose adapters to use')
  p.add_argument('--base', default=None,
                 help="adapter run: the base model_dir (default: the one the run recorded)")
