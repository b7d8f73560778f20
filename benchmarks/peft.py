"""LoRA against a full fine-tune: train-step time, trainable parameters, optimizer + gradient
bytes (flan-t5-small shapes, CPU), and `t5x-lite plan`'s figures for flan-t5-xxl LoRA on 8
devices of 16 GiB. Prints one JSON line.

Step time: flan-t5-small (fp32), batch 8, 256 inputs / 64 targets, random batches of the
batch contract (one segment per row, every token real), Adafactor with T5's defaults (the
project's fine-tune optimizer). `full`: every parameter trained (`state.create_state`);
`lora`: rank 8 on query and value of every attention, encoder and decoder (peft's T5
default), the base frozen (`state.create_adapter_state`: the state holds the LoRA leaves,
the frozen base goes to the step beside it). Both are `step.make_train_step` +
`jit_train_step` on a one-device mesh, compiled ahead of time, each in its own worker process
(benchmarks/train_step.py's `Worker`); the worker runs `--discard` steps after the first,
then the parent interleaves single steps A B / B A / ... and reports medians. Also reported:
XLA's FLOPs per step of each compiled step (cost_analysis: what the frozen base saves,
noise-free), and the bytes of the created states: optimizer = the opt_state leaves, gradients
= the trainable parameters' bytes (one gradient per trainable leaf, none for the base).

Plan: `memory_plan` (what `t5x-lite plan` prints) for flan-t5-xxl with bf16 activations and
remat, global batch --xxl_batch x 512/128, FSDP on 8 devices, the same LoRA, against the full
fine-tune; the command that prints the same table is in the JSON (`xxl_plan.command`).

Decoder-only row (`decoder_only` in the JSON; benchmarks/_peft_decoder.py): the same
comparison for a Llama model at SmolLM-135M's width (hidden 576, 9 heads x 64, 3 kv heads, MLP
1536, vocab 49152, tied embeddings; the ~135M shape of the decoder-only issue), fp32, batch 8
x 256 (full-sequence loss, random ids), Adafactor: `full` against LoRA rank 8 on q_proj and
v_proj of every layer (peft's Llama default, as query+value for T5), the base frozen; both from
the same random weights. `--decoder_layers` 12 of the 30 layers by default: a 30-layer step
is ~1.8 TFLOP (2 timed rounds on this 2-core CPU, loaded, 2026-12-08: 13.4 s full, 10.0 s
LoRA, 0.75x; XLA's FLOPs 0.69x), and its compiles took 36 s and 465 s (the LoRA one beside the
full worker's 8 GB, under memory pressure): that row alone ran 12 minutes, past the script's
10-minute budget. 12 layers keep the width and every per-layer shape; the embedding and LM
head weigh more in the step (`--decoder_layers 30` runs the whole depth; the JSON's `model`
and `layers` say which). `--decoder_steps` 5 interleaved rounds, `--decoder_discard` 0 (the
first, compiling, step untimed).
Also in the row, untimed: the bytes of LoRA on all seven projections (causal_lm_lora.gin).

  python benchmarks/peft.py [--steps 6] [--discard 3] [--rank 8] [--preset small]
                            [--decoder_only 135m|tiny|none] [--decoder_layers 12]
                            [--decoder_steps 5] [--decoder_discard 0]
  python benchmarks/peft.py --quick       # tiny models, 2 timed steps: checks it all runs
  python benchmarks/peft.py --worker full|lora --preset small --rank 8 --discard 3  # internal
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
# Running this file puts benchmarks/ first on sys.path, where this file would shadow the
# `peft` library; nothing here imports it, and t5x_lite.peft is imported by its full name.
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from _train_step_workers import BATCH, LENGTHS, serve_steps, synthetic_batch  # noqa: E402
from train_step import PAUSE_S, Worker, cpu_busy  # noqa: E402

VARIANTS = ('full', 'lora')
XXL_DEVICES, XXL_GIB = 8, 16
DECODER_LAYERS = 12   # of SmolLM-135M's 30 (the module docstring says why)


def _spec(variant, rank):
  from t5x_lite.peft import spec  # pylint: disable=import-outside-toplevel
  return spec.AdapterSpec(lora=spec.LoraSpec(rank=rank)) if variant == 'lora' else None


def worker(out, variant, preset, rank, discard):
  """One variant's train step, served by `serve_steps` (its info: sizes, FLOPs, compile)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from t5x_lite import kernels, models, partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.peft import params as peft_params  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import optimizers, state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  config = models.preset('flan_t5', preset)
  optimizer = optimizers.OptimizerConfig().build()
  mesh = partitioning.make_mesh({'data': 1}, jax.devices()[:1])
  rules = partitioning.rules_for('dp')
  adapters = _spec(variant, rank)
  model = models.build(config, kernels.for_mesh(mesh), adapters=adapters)
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  if adapters is None:
    state, frozen = state_lib.create_state(model, optimizer, layout, jax.random.key(0)), {}
  else:
    state, frozen = state_lib.create_adapter_state(model, optimizer, layout, jax.random.key(0))
  run = step_lib.jit_train_step(step_lib.make_train_step(model, optimizer, np.ones(1)),
                                layout, mesh, rules)
  batch = partitioning.global_batch(synthetic_batch(config.vocab_size), mesh)
  rng = jax.random.key(1)
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))  # noqa: E731
  info = {'trainable_params': peft_params.count(state.params),
          'frozen_params': peft_params.count(frozen),
          'trainable_param_bytes': nbytes(state.params),
          'optimizer_bytes': nbytes(state.opt_state)}
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):   # as jit_train_step's run
    compiled = run.jitted.lower(state, batch, rng, frozen, run.task_loss_weights).compile()
  info['compile_s'] = time.perf_counter() - start
  cost = compiled.cost_analysis()
  info['flops'] = float((cost[0] if isinstance(cost, list) else cost)['flops'])
  holder = [state]

  def run_batch(_):
    holder[0], metrics = compiled(holder[0], batch, rng, frozen, run.task_loss_weights)
    return float(jax.block_until_ready((holder[0], metrics))[1]['loss']), 0
  serve_steps(out, info, run_batch, 1, discard, 'first_step_s')


def xxl_plan(rank, batch_size):
  """`t5x-lite plan`'s per-device figures for flan-t5-xxl: LoRA and the full fine-tune."""
  from t5x_lite import models  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import memory_plan  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import loop  # pylint: disable=import-outside-toplevel
  config = models.preset('flan_t5', 'xxl', dtype='bfloat16', remat=True, dropout_rate=0.1)
  train = loop.TrainConfig(model_dir='/tmp/unused', mixture='builtin', batch_size=batch_size,
                           feature_lengths={'inputs': 512, 'targets': 128},
                           partitioning='fsdp', mesh_shape={'data': 1, 'fsdp': -1, 'tensor': 1},
                           adapters=_spec('lora', rank))
  axes = {'data': 1, 'fsdp': XXL_DEVICES, 'tensor': 1}
  adapters = memory_plan.run_adapters(config, train)
  out = {}
  for name, spec in (('full', None), ('lora', adapters)):
    state, act = memory_plan.plan(config, train, axes, spec)
    total = state.total + act.peak(True)
    out[name] = {'bytes_per_device': total, 'gib_per_device': round(total / 2**30, 2),
                 'fits': total <= XXL_GIB * 2**30, 'frozen_base': state.frozen,
                 'trainable_params': state.params, 'optimizer': state.optimizer,
                 'gradients': state.gradients, 'fsdp_gathers': state.gathered,
                 'activations': act.peak(True), 'trainable_count': state.trainable_count}
  out.update(devices=XXL_DEVICES, device_gib=XXL_GIB, batch=batch_size, lengths='512/128',
             activations='bfloat16, remat', command=(
                 't5x-lite plan --gin_file=gin_configs/models/flan_t5/xxl.gin '
                 '--gin_file=gin_configs/runs/finetune.gin --gin_file=gin_configs/meshes/fsdp.gin '
                 '--gin_file=gin_configs/peft/lora.gin --gin.MIXTURE_OR_TASK_NAME=builtin '
                 f'--gin.ACTIVATION_DTYPE=bfloat16 --gin.t5.T5Config.remat=True '
                 f'--gin.BATCH_SIZE={batch_size} --num_devices={XXL_DEVICES} '
                 f'--device_memory_gib={XXL_GIB}'))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=6, help='timed steps per variant')
  parser.add_argument('--discard', type=int, default=3, help='steps after the first, untimed')
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--preset', default='small')
  parser.add_argument('--xxl_batch', type=int, default=64)
  parser.add_argument('--decoder_only', default='135m', choices=('135m', 'tiny', 'none'),
                      help="the decoder-only row's model (135m: SmolLM-135M's width)")
  parser.add_argument('--decoder_layers', type=int, default=0,
                      help='layers of the decoder-only model (default: 12 at 135m, all at tiny)')
  parser.add_argument('--decoder_steps', type=int, default=5)
  parser.add_argument('--decoder_discard', type=int, default=0)
  parser.add_argument('--quick', action='store_true', help='tiny models, 2 timed steps')
  parser.add_argument('--worker', choices=VARIANTS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.preset, args.steps, args.discard = 'tiny', 2, 1
    args.decoder_only, args.decoder_steps, args.decoder_discard = 'tiny', 2, 1
  if args.worker:
    worker(sys.stdout, args.worker, args.preset, args.rank, args.discard)
    return
  start = time.perf_counter()
  busy = cpu_busy()
  argv = ['--preset', args.preset, '--rank', str(args.rank), '--discard', str(args.discard)]
  workers, times = {}, {name: [] for name in VARIANTS}
  try:
    for name in VARIANTS:   # one at a time: a compile never overlaps a step
      _log(f'starting {name}')
      workers[name] = Worker(name, ['--worker', name] + argv, script=os.path.abspath(__file__))
    for i in range(args.steps):
      for name in VARIANTS[i % 2:] + VARIANTS[:i % 2]:
        time.sleep(PAUSE_S)
        times[name].append(workers[name].step())
      _log(f'round {i + 1}/{args.steps} ' + ' '.join(f'{n} {t[-1]:.3f}s'
                                                     for n, t in times.items()))
  finally:
    for w in workers.values():
      w.close()
  info = {name: w.info for name, w in workers.items()}
  med = {name: statistics.median(t) for name, t in times.items()}
  opt_grad = {name: i['optimizer_bytes'] + i['trainable_param_bytes'] for name, i in info.items()}
  result = {
      'benchmark': 'peft', 'preset': f'flan_t5/{args.preset}', 'dtype': 'float32',
      'batch': BATCH, 'lengths': f"{LENGTHS['inputs']}/{LENGTHS['targets']}",
      'lora': f'rank {args.rank}, query+value, encoder+decoder', 'optimizer': 'adafactor',
      'timed_steps': args.steps, 'discarded_steps': args.discard,
      'step_time_full_s': round(med['full'], 3), 'step_time_lora_s': round(med['lora'], 3),
      'step_time_ratio': round(med['lora'] / med['full'], 3),
      'step_times_full_s': [round(t, 3) for t in times['full']],
      'step_times_lora_s': [round(t, 3) for t in times['lora']],
      'flops_full': info['full']['flops'], 'flops_lora': info['lora']['flops'],
      'flops_ratio': round(info['lora']['flops'] / info['full']['flops'], 3),
      'trainable_params_full': info['full']['trainable_params'],
      'trainable_params_lora': info['lora']['trainable_params'],
      'optimizer_bytes_full': info['full']['optimizer_bytes'],
      'optimizer_bytes_lora': info['lora']['optimizer_bytes'],
      'optimizer_plus_gradient_bytes_full': opt_grad['full'],
      'optimizer_plus_gradient_bytes_lora': opt_grad['lora'],
      'optimizer_plus_gradient_ratio': round(opt_grad['lora'] / opt_grad['full'], 5),
      'compile_s': {n: round(i['compile_s'], 1) for n, i in info.items()},
      'cpu_busy_before': busy, 'load_average': round(os.getloadavg()[0], 2),
  }
  if args.decoder_only != 'none':
    import _peft_decoder  # pylint: disable=import-outside-toplevel
    layers = args.decoder_layers or (DECODER_LAYERS if args.decoder_only == '135m' else
                                     _peft_decoder.case.SIZES[args.decoder_only]['num_layers'])
    result['decoder_only'] = _peft_decoder.measure(args.decoder_only, layers, args.rank,
                                                   args.decoder_steps, args.decoder_discard,
                                                   _log)
  _log('planning flan-t5-xxl')
  result['xxl_plan'] = xxl_plan(args.rank, args.xxl_batch)
  result['wall_s'] = round(time.perf_counter() - start, 1)
  print(json.dumps(result))


def _log(message):
  print(f'[peft] {message}', file=sys.stderr, flush=True)


if __name__ == '__main__':
  main()
