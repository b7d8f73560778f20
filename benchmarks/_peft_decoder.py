"""The decoder-only row of benchmarks/peft.py: LoRA against a full fine-tune of a Llama model at
SmolLM-135M's width (benchmarks/_decoder_only_case.py: hidden 576, 9 heads x 64, 3 kv heads,
MLP 1536, vocab 49152, tied embeddings; `layers` of its 30), fp32, batch 8 x 256 tokens of the
decoder-only batch contract (random ids, one segment per row, full-sequence loss), Adafactor
with T5's defaults as the T5 row.

  full  every parameter trained (`state.create_state`, from the case's random weights, drawn in
        numpy: no init compile).
  lora  rank 8 on q_proj and v_proj of every layer (peft's default for Llama, as the T5 row's
        query+value), the base frozen (`state.create_adapter_state` with the same weights).
Also reported, not timed: the bytes of the state with LoRA on all seven projections
(gin_configs/peft/causal_lm_lora.gin), from the state's abstract shapes.

Each variant is a worker process (`python benchmarks/_peft_decoder.py --variant full ...`)
serving steps as peft.py's T5 workers do; `measure` starts them one at a time and interleaves.
"""

import dataclasses
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _path in (REPO, HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import _decoder_only_case as case  # noqa: E402
from _train_step_workers import serve_steps  # noqa: E402

VARIANTS = ('full', 'lora')
TARGETS = {'lora': ('q_proj', 'v_proj'),
           'lora_seven': ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                          'down_proj')}


def _config(size, layers):
  return dataclasses.replace(case.config(size), num_layers=layers)


def _spec(variant, rank):
  from t5x_lite.peft import spec  # pylint: disable=import-outside-toplevel
  if variant == 'full':
    return None
  return spec.AdapterSpec(lora=spec.LoraSpec(rank=rank, targets=TARGETS[variant],
                                             stacks=('decoder',)))


def _setup(variant, size, layers, rank):
  import jax  # pylint: disable=import-outside-toplevel
  from t5x_lite import kernels, models, partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import optimizers, state as state_lib  # pylint: disable=import-outside-toplevel
  config = _config(size, layers)
  optimizer = optimizers.OptimizerConfig().build()
  mesh = partitioning.make_mesh({'data': 1}, jax.devices()[:1])
  rules = partitioning.rules_for('dp')
  adapters = _spec(variant, rank)
  model = models.build(config, kernels.for_mesh(mesh), adapters=adapters)
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  return config, optimizer, mesh, rules, model, layout


def state_bytes(size, layers, rank, variant):
  """(trainable params, optimizer bytes, trainable param bytes) from the abstract state."""
  import jax  # pylint: disable=import-outside-toplevel
  from t5x_lite.peft import params as peft_params  # pylint: disable=import-outside-toplevel
  layout = _setup(variant, size, layers, rank)[-1]
  nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))  # noqa: E731
  return (peft_params.count(layout.shapes.params), nbytes(layout.shapes.opt_state),
          nbytes(layout.shapes.params))


def worker(out, variant, size, layers, rank, discard):
  """One variant's train step, served by `serve_steps` (its info: sizes, FLOPs, compile)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from t5x_lite import partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.peft import params as peft_params  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  config, optimizer, mesh, rules, model, layout = _setup(variant, size, layers, rank)
  base = case.random_params(config)
  start = time.perf_counter()
  if variant == 'full':
    state, frozen = state_lib.create_state(model, optimizer, layout, jax.random.key(0), base), {}
  else:
    state, frozen = state_lib.create_adapter_state(model, optimizer, layout, jax.random.key(0),
                                                   base)
  del base
  init_s = time.perf_counter() - start
  run = step_lib.jit_train_step(step_lib.make_train_step(model, optimizer, np.ones(1)),
                                layout, mesh, rules)
  batch = partitioning.global_batch(case.train_batch(config.vocab_size), mesh)
  rng = jax.random.key(1)
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))  # noqa: E731
  info = {'trainable_params': peft_params.count(state.params),
          'frozen_params': peft_params.count(frozen),
          'trainable_param_bytes': nbytes(state.params),
          'optimizer_bytes': nbytes(state.opt_state), 'init_s': init_s}
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


def measure(size, layers, rank, steps, discard, log):
  """The decoder-only row (a dict for peft.py's JSON under 'decoder_only')."""
  from train_step import PAUSE_S, Worker  # pylint: disable=import-outside-toplevel
  argv = ['--size', size, '--layers', str(layers), '--rank', str(rank), '--discard', str(discard)]
  workers, times = {}, {name: [] for name in VARIANTS}
  start = time.perf_counter()
  try:
    for name in VARIANTS:   # one at a time: a compile never overlaps a step
      log(f'decoder-only: starting {name}')
      workers[name] = Worker(f'decoder/{name}', ['--variant', name] + argv,
                             script=os.path.abspath(__file__))
    for i in range(steps):
      for name in VARIANTS[i % 2:] + VARIANTS[:i % 2]:
        time.sleep(PAUSE_S)
        times[name].append(workers[name].step())
      log(f'decoder-only: round {i + 1}/{steps} ' + ' '.join(
          f'{n} {t[-1]:.3f}s' for n, t in times.items()))
  finally:
    for w in workers.values():
      w.close()
  info = {name: w.info for name, w in workers.items()}
  med = {name: statistics.median(t) for name, t in times.items()}
  opt_grad = {name: i['optimizer_bytes'] + i['trainable_param_bytes'] for name, i in info.items()}
  seven_params, seven_opt, seven_param_bytes = state_bytes(size, layers, rank, 'lora_seven')
  full_layers = case.SIZES[size]['num_layers']
  row = {
      'model': case.describe(size) + (f'; {layers} of its {full_layers} layers'
                                      if layers != full_layers else ''),
      'layers': layers, 'dtype': 'float32', 'batch': case.BATCH, 'length': case.LENGTH,
      'lora': f'rank {rank}, q_proj+v_proj (peft\'s Llama default), every layer',
      'optimizer': 'adafactor', 'timed_steps': steps, 'discarded_steps': discard,
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
      'seven_projections': {
          'lora': f'rank {rank}, q/k/v/o_proj + gate/up/down_proj (causal_lm_lora.gin), '
                  'not timed: bytes of the abstract state',
          'trainable_params': seven_params,
          'optimizer_plus_gradient_bytes': seven_opt + seven_param_bytes,
          'optimizer_plus_gradient_ratio': round(
              (seven_opt + seven_param_bytes) / opt_grad['full'], 5)},
      'compile_s': {n: round(i['compile_s'], 1) for n, i in info.items()},
      'init_s': {n: round(i['init_s'], 1) for n, i in info.items()},
      'wall_s': round(time.perf_counter() - start, 1),
  }
  if layers != full_layers:
    row['layers_note'] = (f'the width of {size} kept, {layers} of its {full_layers} layers: the '
                          "full depth does not fit the script's 10-minute budget on a 2-core "
                          'CPU (peft.py docstring)')
  row['targets_met'] = {'step_time_ratio <= 0.8': row['step_time_ratio'] <= 0.8,
                        'optimizer_plus_gradient_ratio <= 0.02':
                            row['optimizer_plus_gradient_ratio'] <= 0.02}
  return row


def main():
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description='a worker of peft.py\'s decoder-only row')
  parser.add_argument('--variant', choices=VARIANTS, required=True)
  parser.add_argument('--size', default='135m', choices=sorted(case.SIZES))
  parser.add_argument('--layers', type=int, required=True)
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--discard', type=int, default=0)
  args = parser.parse_args()
  worker(sys.stdout, args.variant, args.size, args.layers, args.rank, args.discard)


if __name__ == '__main__':
  main()
