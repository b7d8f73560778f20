"""`t5x-lite plan`: bytes per device of a configured run, in seconds, without allocating.

Every figure comes from shapes and shardings (`t5x_lite.training.memory_plan`), through the
model interface, so it answers for any family from its gin file alone: flan-t5-xxl or
Llama-3.1-8B on 64 devices as fast as for small. The activation formula is the family's
(`models/t5_memory.py`, `models/decoder_only_memory.py`); the batch is the run's feature
converter's (an encoder-decoder's inputs and targets, a decoder-only model's one sequence of
inputs + targets). A decode section gives what `init_decode` holds for the eval batch (the
encoded inputs and key/value caches).
An adapter run (`loop.TrainConfig.adapters`, e.g. gin_configs/peft/lora.gin) is shown side
by side with a full fine-tune and the other method (prompt tuning, 20 tokens, beside LoRA;
LoRA rank 8 on q/v beside prompt tuning): the frozen base counts its parameters only.
`--compile` also compiles the train step and prints XLA's memory analysis: on the local
devices when there are enough, else in a subprocess on `--num_devices` fake CPU devices. That
costs minutes and host memory that grow with the model and the device count (xl on 16 did
not finish in 15 minutes on a 2-core, 24 GiB host; xxl on 64 was OOM-killed), and XLA:CPU's
schedule differs from TPU/GPU's: a cross-check for small models, not the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from t5x_lite.commands import common

GIB = 2**30

def _size(n: int) -> str:
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= scale:
      return f'{n / scale:9.2f} {unit} ({n:,} bytes)'
  return f'{n:9d} B'


def _short(n: int) -> str:
  return _size(n).split(' (')[0].strip()


def label(spec) -> str:
  """A column's name: 'full fine-tune', 'LoRA r=8', 'prompt 20', 'LoRA r=8 task + prompt 20'."""
  if spec is None:
    return 'full fine-tune'
  parts = []
  if spec.lora is not None:
    sharing = '' if spec.lora.sharing == 'shared' else f' {spec.lora.sharing}'
    parts.append(f'LoRA r={spec.lora.rank}{sharing}')
  if spec.prompt_length:
    parts.append(f'prompt {spec.prompt_length}')
  if spec.train:
    parts.append('unfrozen')
  return ' + '.join(parts)


def side_by_side(columns, run_spec, activations: int, optimizer: str,
                 device_memory_gib: float | None) -> None:
  """Per-device bytes of a full fine-tune, the adapter run and the other method, one column
  each: a frozen base counts its parameters only; trainable leaves count parameters,
  optimizer state and gradients. Activations: the same figure in every column (see
  `memory_plan.plan`)."""
  names = [label(spec) + (' *' if spec is run_spec else '') for spec, _ in columns]
  rows = [('trainable', [f'{s.trainable_count:,}' for _, s in columns]),
          ('frozen base', [_short(s.frozen) for _, s in columns]),
          ('trainable params', [_short(s.params) for _, s in columns]),
          ('optimizer state', [_short(s.optimizer) for _, s in columns]),
          ('gradients', [_short(s.gradients) for _, s in columns])]
  if any(s.gathered for _, s in columns):
    rows.append(('fsdp gathers', [_short(s.gathered) for _, s in columns]))
  rows += [('activations', [_short(activations)] * len(columns)),
           ('total', [_short(s.total + activations) for _, s in columns]),
           ('total bytes', [f'{s.total + activations:,}' for _, s in columns])]
  if device_memory_gib:
    rows.append((f'fits in {device_memory_gib:g} GiB', [
        'yes' if s.total + activations <= device_memory_gib * GIB else 'NO'
        for _, s in columns]))
  width = max(len(c) + 2 for c in names + [c for _, cells in rows for c in cells])
  print('per device, side by side (from shapes and shardings; nothing compiled):')
  print(' ' * 20 + ''.join(n.rjust(width) for n in names))
  for name, cells in rows:
    print(f'  {name:<18}' + ''.join(c.rjust(width) for c in cells))
  print(f'  * this run. Optimizer state ({optimizer}) and gradients: trainable leaves only.')
  if any(s.gathered for _, s in columns):
    print('  fsdp gathers: the largest layer\'s weights (+ their gradient where trainable), '
          'unsharded.')
  print('  Activations: the full fine-tune\'s in every column, an upper bound for adapters '
        '(frozen\n  projections\' inputs need not be kept); the soft prompt takes part of the '
        'inputs length.')


def compiled_memory(model_config, train_config, axis_sizes) -> dict:
  """XLA's memory analysis of the train step compiled for a mesh of the local devices.

  `input_bytes`: the per-device bytes of the other arguments the program keeps (the batch
  features of the run's feature converter that the step reads, the rng, the task weights),
  so that `argument_bytes - input_bytes` is the TrainState (parameters, optimizer state and
  its three int32 counters), plus an adapter run's frozen base (the step's fourth argument).
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from t5x_lite import kernels, partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import memory_plan  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import mixtures  # pylint: disable=import-outside-toplevel
  from t5x_lite import models  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  mesh = partitioning.make_mesh(axis_sizes)
  rules = partitioning.rules_for(train_config.partitioning)
  optimizer = train_config.optimizer.build()
  adapters = memory_plan.run_adapters(model_config, train_config)
  model = models.build(model_config, kernels.for_mesh(mesh), adapters)
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  num_tasks = len(mixtures.get_mixture(train_config.mixture).tasks)
  fn = step_lib.jit_train_step(step_lib.make_train_step(
      model, optimizer,
      np.ones(num_tasks), train_config.loss, train_config.microbatches), layout, mesh, rules)
  lengths = memory_plan.feature_converter(model_config, train_config).model_lengths(
      train_config.feature_lengths)
  sharding = partitioning.batch_sharding(mesh)
  batch = {name: jax.ShapeDtypeStruct((train_config.batch_size, length), np.int32,
                                      sharding=sharding) for name, length in lengths.items()}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # as step.jit_train_step's run
    lowered = fn.jitted.lower(layout.abstract(), batch, rng, layout.frozen or {},
                              fn.task_loss_weights)
  # The program is analysed, never run: XLA:CPU's LLVM optimisations (after buffer
  # assignment, so the figures are the same) are skipped, ~40% of the compile time.
  compiled = lowered.compile(compiler_options=(
      {'xla_backend_optimization_level': 0} if mesh.devices.flat[0].platform == 'cpu' else None))
  analysis = compiled.memory_analysis()
  # What the program takes besides the state: the batch features it reads (jit drops the
  # ones it does not, e.g. T5's positions), the rng's key data and the task weights (λ).
  (_, kept_batch, kept_rng, _, kept_weights), _ = compiled.input_shardings
  input_bytes = sum(int(np.prod(kept_batch[k].shard_shape(x.shape))) * 4
                    for k, x in batch.items() if kept_batch[k] is not None)
  input_bytes += jax.random.key_data(jax.random.key(0)).nbytes if kept_rng is not None else 0
  input_bytes += np.asarray(fn.task_loss_weights).nbytes if kept_weights is not None else 0
  return {'temp_bytes': int(analysis.temp_size_in_bytes),
          'argument_bytes': int(analysis.argument_size_in_bytes),
          'output_bytes': int(analysis.output_size_in_bytes),
          'alias_bytes': int(analysis.alias_size_in_bytes), 'input_bytes': int(input_bytes),
          'devices': jax.device_count(), 'platform': jax.devices()[0].platform}


def describe_failure(returncode: int, stderr: str, what: str, seconds: float | None = None
                     ) -> str:
  """A dead worker's exit, its signal by name, the likely cause and its stderr's tail."""
  if seconds is not None:
    what = f'{what}, after {seconds:.0f} s,'
  number = -returncode if returncode < 0 else (returncode - 128 if returncode > 128 else 0)
  try:
    sig = signal.Signals(number) if number else None
  except ValueError:
    sig = None
  if sig is None:
    head = f'{what} failed with exit status {returncode}'
  else:
    how = 'was killed by' if returncode < 0 else f'exited with status {returncode} ='
    head = f'{what} {how} signal {sig.value} ({sig.name})'
    if sig == signal.SIGKILL:
      head += (": likely the kernel's OOM killer (the host ran out of memory; `dmesg` says). "
               'The figures above need no compile; compile on fewer devices or a smaller model')
    elif sig == signal.SIGABRT:
      head += ': XLA aborted (often an allocation that failed)'
  tail = stderr.strip()[-3000:] or '(nothing on stderr)'
  return f'{head}\nworker stderr (tail):\n{tail}'


def run_worker(argv: list[str], env: dict, what: str) -> dict:
  """Runs a compile worker; its last stdout line is JSON. Dies -> SystemExit naming why."""
  start = time.perf_counter()
  out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(describe_failure(out.returncode, out.stderr, what,
                                      time.perf_counter() - start))
  return json.loads(out.stdout.strip().splitlines()[-1])


def _compile(args, model_config, train_config, axis_sizes, num_devices, num_params) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  local = num_devices <= jax.device_count()
  where = (f'{num_devices} local {jax.devices()[0].platform} devices' if local
           else f'{num_devices} fake CPU devices in a subprocess')
  print(f'--compile: compiling the train step on {where}...', flush=True)
  if not local and (num_params > 1e9 or num_devices > 16):
    print(f'  warning: {num_params / 1e9:.1f}B parameters on {num_devices} CPU devices: expect '
          'many minutes and tens of GiB of host memory (flan-t5-xl on 16 devices did not finish '
          'in 15 minutes on a 2-core, 24 GiB host; xxl on 64 was killed out of memory)',
          flush=True)
  start = time.perf_counter()
  if local:
    memory = compiled_memory(model_config, train_config, axis_sizes)
  else:
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}'}
    argv = [sys.executable, '-m', 't5x_lite.cli', 'plan', '--worker',
            f'--num_devices={num_devices}'] + [f'--gin_file={f}' for f in args.gin_file] + [
                f'--gin.{b}' for b in args.gin_bindings]
    memory = run_worker(argv, env, f'the compile worker on {num_devices} CPU devices')
  memory['seconds'] = time.perf_counter() - start
  return memory


def cmd_plan(args: argparse.Namespace) -> int:
  """Estimate the bytes per device (params, optimizer, gradients, activations) of a run."""
  if args.worker:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # pylint: disable=import-outside-toplevel

  from t5x_lite import config, partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import memory_plan  # pylint: disable=import-outside-toplevel
  from t5x_lite import models  # pylint: disable=import-outside-toplevel
  common.parse_gin(args, ['MODEL_DIR=/tmp/t5x_lite_plan'], reads=('MODEL_CONFIG', 'TRAIN'))
  model_config, train_config = config.model_config(), config.macro('TRAIN')
  num_devices = args.num_devices or jax.device_count()
  axis_sizes = partitioning.resolve_mesh_shape(train_config.mesh_shape, num_devices)
  if args.worker:
    print(json.dumps(compiled_memory(model_config, train_config, axis_sizes)))
    return 0
  adapters = memory_plan.run_adapters(model_config, train_config)
  state, act = memory_plan.plan(model_config, train_config, axis_sizes, adapters)
  remat = model_config.remat
  peak = act.peak(remat)
  total = state.total + peak
  num_params = memory_plan.param_count(model_config)
  lengths = memory_plan.model_lengths(model_config, train_config)
  row = ' + '.join(str(n) for n in dict.fromkeys(lengths.values()))
  print(f'model: {num_params:,} parameters ({model_config.param_dtype}), activations '
        f'{model_config.dtype}, dropout {model_config.dropout_rate:g}, remat '
        f'{"on" if remat else "off"}')
  if adapters is not None:
    print(f'adapters: {label(adapters)}, {state.trainable_count:,} trainable parameters '
          f'({state.trainable_count / num_params:.3%} of the base), the base frozen')
  print(f'mesh: {axis_sizes} = {num_devices} devices, rules {train_config.partitioning!r}; '
        f'global batch {train_config.batch_size} x {dict(train_config.feature_lengths)} '
        f'({models.build(model_config).feature_kind} rows of {row} tokens), '
        f'{train_config.microbatches} microbatch(es): {act.rows_per_device} row(s) per device '
        'per microbatch')
  if adapters is None:
    print('per device (from shapes and shardings; nothing compiled):')
    print(f'  parameters        {_size(state.params)}')
    print(f'  optimizer state   {_size(state.optimizer)} ({train_config.optimizer.name})')
    print(f'  gradients         {_size(state.gradients)}')
    if state.gathered:
      print(f'  fsdp gathers      {_size(state.gathered)} (largest layer: weights + weight '
            'gradient, unsharded)')
    print(f'  activations       {_size(peak)} (peak, remat {"on" if remat else "off"})')
    print(f'  total             {_size(total)}')
  else:
    rules = partitioning.rules_for(train_config.partitioning)
    columns = [(spec, state if spec is adapters else memory_plan.state_bytes(
        model_config, train_config.optimizer.build(), axis_sizes, rules,
        train_config.microbatches, spec)) for spec in memory_plan.compared_specs(adapters)]
    side_by_side(columns, adapters, peak, train_config.optimizer.name, args.device_memory_gib)
  print('activations per device, kept for the backward pass:')
  for stack in act.stacks:
    print(f'  {stack.name + " layer":<17} {_size(stack.layer)} x {stack.count} '
          f'(with remat: its input, {_short(stack.layer_input)})')
  print(f'  kept once         {_size(act.shared)} (read by every layer: masks, position '
        'biases or RoPE tables, encoder output)')
  print(f'  logits + softmax  {_size(act.output)}')
  print(f'  backward working  {_size(act.working)}')
  print(f'  peak              {_short(act.peak(False))} without remat, '
        f'{_short(act.peak(True))} with remat (the model config\'s remat)')
  decode = memory_plan.decode_bytes(model_config, train_config, axis_sizes)
  method = train_config.eval_decoding.method
  print(f'decoding (eval: {train_config.eval_batch_size} inputs, {method}, '
        f'{decode.rows} rows of a {decode.prompt_length}-token prompt + '
        f'{decode.decode_length} decoded), per device:')
  print(f'  decode cache      {_size(decode.cache)} (init_decode\'s context and cache; beside '
        'the parameters)')
  if args.compile:
    memory = _compile(args, model_config, train_config, axis_sizes, num_devices, num_params)
    state_args = memory['argument_bytes'] - memory['input_bytes']
    print(f'compiled in {memory["seconds"]:.1f} s ({memory["platform"]}, XLA memory analysis; '
          'its schedule is not TPU/GPU\'s):')
    print(f'  state arguments   {_size(state_args)}'
          + (' (with the frozen base)' if adapters is not None else ''))
    print(f'  temporaries       {_size(memory["temp_bytes"])} (activations, gradients, '
          'update)')
  if args.device_memory_gib:
    fits = total <= args.device_memory_gib * GIB
    config_name = (f'{type(model_config).__module__.rpartition(".")[2]}.'
                   f'{type(model_config).__name__}')   # as gin binds it
    ways = (['fsdp (gin_configs/meshes/fsdp.gin)'] if 'fsdp' not in str(
        train_config.partitioning) else []) + ['more microbatches (loop.TrainConfig.microbatches)']
    ways += [] if remat else [f'remat ({config_name}.remat = True)']
    ways += ([] if model_config.dtype == 'bfloat16' else ['bf16 activations']) + ['more devices']
    hint = '' if fits else ': use ' + ', '.join(ways[:-1]) + ' or ' + ways[-1]
    print(f'{"fits" if fits else "does NOT fit"} in {args.device_memory_gib:g} GiB per device '
          f'(analytic total{", " + label(adapters) if adapters else ""}){hint}')
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser('plan', help=cmd_plan.__doc__.splitlines()[0])
  common.gin_args(p)
  p.add_argument('--num_devices', type=int, default=None,
                 help='devices of the target slice (default: the local ones)')
  p.add_argument('--device_memory_gib', type=float, default=None,
                 help='memory per device, e.g. 16 (TPU v5e), 32 (v4), 80 (H100)')
  p.add_argument('--compile', action='store_true',
                 help='also compile the train step (on --num_devices fake CPU devices when '
                      'the local ones are fewer) and print XLA\'s memory analysis; minutes and '
                      'GiB of host memory for xl and above')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  p.set_defaults(func=cmd_plan)
