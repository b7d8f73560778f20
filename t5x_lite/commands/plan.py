"""`t5x-lite plan`: bytes per device of a configured run, without allocating anything.

Parameters and optimizer state come from abstract shapes and the partitioning rules (exact,
for any device count). Activations and temporaries come from XLA's memory analysis of the
compiled train step: compiled here on the local devices when there are enough, otherwise in
a subprocess on `--num_devices` fake CPU devices (CPU fusion decisions differ from TPU/GPU:
treat that figure as an estimate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from t5x_lite.commands import common

GIB = 2**30


def _size(n: int) -> str:
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= scale:
      return f'{n / scale:9.2f} {unit} ({n:,} bytes)'
  return f'{n:9d} B'


def _shard_bytes(shapes, specs, axis_sizes) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  total = 0
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for shape, spec in zip(jax.tree.leaves(shapes), flat_specs):
    dims = []
    for i, size in enumerate(shape.shape):
      entry = spec[i] if i < len(spec) else None
      names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
      dims.append(-(-size // math.prod(axis_sizes[n] for n in names)))
    total += math.prod(dims) * np.dtype(shape.dtype).itemsize
  return total


def _compile_memory(model_config, train_config, axis_sizes) -> dict:
  """XLA's memory analysis of the train step on a mesh of the local devices."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from t5x_lite import partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import mixtures  # pylint: disable=import-outside-toplevel
  from t5x_lite.models import t5  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  mesh = partitioning.make_mesh(axis_sizes)
  rules = partitioning.rules_for(train_config.partitioning)
  optimizer = train_config.optimizer.build()
  layout = state_lib.state_layout(model_config, optimizer, mesh, rules)
  num_tasks = len(mixtures.get_mixture(train_config.mixture).tasks)
  fn = step_lib.jit_train_step(step_lib.make_train_step(
      t5.Transformer(model_config), optimizer, np.ones(num_tasks), train_config.loss,
      train_config.microbatches), layout, mesh, rules)
  lengths = train_config.feature_lengths
  sharding = partitioning.batch_sharding(mesh)
  batch = {name: jax.ShapeDtypeStruct(
      (train_config.batch_size, lengths['inputs' if name.startswith('encoder') else 'targets']),
      np.int32, sharding=sharding) for name in (
          'encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions',
          'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
          'decoder_segment_ids', 'decoder_positions', 'decoder_task_ids')}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  with jax.set_mesh(mesh):
    analysis = fn.jitted.lower(layout.abstract(), batch, rng).compile().memory_analysis()
  return {'temp_bytes': int(analysis.temp_size_in_bytes),
          'argument_bytes': int(analysis.argument_size_in_bytes),
          'output_bytes': int(analysis.output_size_in_bytes),
          'alias_bytes': int(analysis.alias_size_in_bytes), 'devices': jax.device_count(),
          'platform': jax.devices()[0].platform}


def cmd_plan(args: argparse.Namespace) -> int:
  """Params / optimizer / activation bytes per device for the configured model and mesh."""
  if args.worker:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # pylint: disable=import-outside-toplevel

  from t5x_lite import config, partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.models import presets, t5  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import state as state_lib  # pylint: disable=import-outside-toplevel
  common.parse_gin(args, ['MODEL_DIR=/tmp/t5x_lite_plan'])
  model_config, train_config = config.model_config(), config.macro('TRAIN')
  num_devices = args.num_devices or jax.device_count()
  axis_sizes = partitioning.resolve_mesh_shape(train_config.mesh_shape, num_devices)
  if args.worker:
    print(json.dumps(_compile_memory(model_config, train_config, axis_sizes)))
    return 0
  rules = partitioning.rules_for(train_config.partitioning)
  optimizer = train_config.optimizer.build()
  shapes = jax.eval_shape(lambda: state_lib._init(model_config, optimizer,  # pylint: disable=protected-access
                                                  jax.random.key(0)))
  params_specs = partitioning.param_specs(t5.logical_axes(model_config), rules)
  opt_specs = partitioning.derived_specs(shapes.opt_state, shapes.params, params_specs)
  params_bytes = _shard_bytes(shapes.params, params_specs, axis_sizes)
  opt_bytes = _shard_bytes(shapes.opt_state, opt_specs, axis_sizes)

  if num_devices <= jax.device_count():
    memory = _compile_memory(model_config, train_config, axis_sizes)
  else:
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}'}
    argv = [sys.executable, '-m', 't5x_lite.cli', 'plan', '--worker',
            f'--num_devices={num_devices}'] + [f'--gin_file={f}' for f in args.gin_file] + [
                f'--gin.{b}' for b in args.gin_bindings]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
      raise SystemExit(f'compiling on {num_devices} CPU devices failed:\n{out.stderr[-2000:]}')
    memory = json.loads(out.stdout.strip().splitlines()[-1])

  temp = memory['temp_bytes']
  total = params_bytes + opt_bytes + temp
  print(f'model: {presets.num_params(model_config):,} parameters ({model_config.param_dtype}), '
        f'activations {model_config.dtype}')
  print(f'mesh: {axis_sizes} = {num_devices} devices, rules {train_config.partitioning!r}; '
        f'global batch {train_config.batch_size} x {dict(train_config.feature_lengths)}, '
        f'{train_config.microbatches} microbatch(es)')
  print('per device:')
  print(f'  parameters        {_size(params_bytes)}')
  print(f'  optimizer state   {_size(opt_bytes)} ({train_config.optimizer.name})')
  print(f'  activations+temp  {_size(temp)} (XLA memory analysis, {memory["platform"]} compile)')
  print(f'  total             {_size(total)}')
  if args.device_memory_gib:
    fits = total <= args.device_memory_gib * GIB
    print(f'{"fits" if fits else "does NOT fit"} in {args.device_memory_gib:g} GiB per device'
          + ('' if fits else ': use fsdp (gin_configs/meshes/fsdp.gin), more microbatches, '
             'remat, bf16 activations or more devices'))
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser('plan', help=cmd_plan.__doc__.splitlines()[0])
  common.gin_args(p)
  p.add_argument('--num_devices', type=int, default=None,
                 help='devices of the target slice (default: the local ones)')
  p.add_argument('--device_memory_gib', type=float, default=None,
                 help='memory per device, e.g. 16 (TPU v5e), 32 (v4), 80 (H100)')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  p.set_defaults(func=cmd_plan)
