"""Train-step MFU, peak memory against `plan`, and decode speed on whatever `jax.devices()` is.

Prints one JSON line. Meant for the first GPU/TPU a session gets: one call, under 8 minutes on
an H100-class device. Cases (each in its own process, so that each peak memory is its own):
  t5_base, t5_large  flan-t5-base / -large shapes (`models.preset('flan_t5', size)`),
                     bf16 activations, fp32 parameters, T5X's default optimizer (Adafactor)
  llama_1b           Llama-3.2-1B's shape (`decoder_presets.preset('llama3', '1b')`), the same
Random weights. Each case, on one device (mesh {'data': 1}, kernels.for_mesh: cuDNN's fused
attention for T5 on a GPU, see t5x_lite/kernels.py):
  batch              the largest global batch `plan` says fits (memory_plan.state_bytes +
                     memory_plan.activation_bytes(...).peak(remat), what `t5x-lite plan` adds
                     up) in `--plan_fraction` of the device's `bytes_limit`; on a backend
                     without memory_stats (CPU) in `--cpu_budget_gib`; capped by `--max_batch`.
                     A step that runs out of memory halves it (`oom_batches` lists the misses).
  train              packed 512/128 batches of the builtin mixture (pipeline.train_iterator with
                     the model's feature converter; T5's SentencePiece ids, bytes for tiny);
                     step.make_train_step + jit_train_step compiled ahead of time, one warm-up
                     step, then `--steps` timed steps: step_s, tokens_per_s (all positions),
                     useful_tokens_per_s (non-pad), flops_per_step (XLA's cost_analysis of the
                     compiled step), flop_per_s and mfu = flop_per_s / the device's bf16 dense
                     peak (PEAK_TFLOPS by device_kind; unknown kinds: mfu null)
  memory             peak_bytes (memory_stats()['peak_bytes_in_use'] after the steps; null
                     where the backend has no memory_stats), plan_bytes for the same config,
                     peak_over_plan; XLA's memory_analysis of the step beside them
  decode             greedy and beam-4 (`decoding.predict`, DecodingConfig) at batch 1 and 32:
                     random 512-token inputs (a decoder-only model: 512-token prompts), exactly
                     128 new tokens (an EOS id no token has); tokens_per_s = batch x 128 / s
                     (beam: output tokens), best of `--decode_reps` calls after one warm-up;
                     a run that fails (e.g. out of memory) gives its `error` and the rest go on.
MFU with cuDNN's attention: XLA's cost analysis counts no FLOPs inside a custom call, so the
step is also lowered (not compiled) with the plain attention (`flops_per_step_plain_attention`)
and flop_per_s / mfu take the larger count.
Each worker watches its share of `--time_budget_s` (390 s) and skips the decode runs that
would not fit (`skipped`); it prints its train figures before decoding, so a worker killed at
its share + 30 s still reports them (with `error`).
`--smoke` runs its two workers side by side (CPU only: on a device each needs it whole).

  python benchmarks/device.py                   # the three cases (an accelerator)
  python benchmarks/device.py --quick           # 2 steps, batch <= 8, 16 new tokens, batch 1/8
  python benchmarks/device.py --smoke           # tiny presets, 64/16 lengths, decode batch 2:
                                                # the code paths on CPU (tests/test_device_benchmark.py)
  python benchmarks/device.py --cases t5_base --steps 5 --attention plain   # A/B the kernel
  python benchmarks/device.py --worker CASE --settings JSON                 # internal
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, REPO)

SPIECE = os.path.join(REPO, '..', 'shared', 'data', 't5_spiece', 'spiece.model')
# case -> (family module, preset family, size)
CASES = {'t5_base': ('t5', 'flan_t5', 'base'), 't5_large': ('t5', 'flan_t5', 'large'),
         'llama_1b': ('decoder_only', 'llama3', '1b'),
         't5_tiny': ('t5', 'flan_t5', 'tiny'), 'llama_tiny': ('decoder_only', 'llama3', 'tiny')}
FULL, SMOKE = ('t5_base', 't5_large', 'llama_1b'), ('t5_tiny', 'llama_tiny')
# Dense bf16 peaks (no sparsity), TFLOP/s per device, by a substring of `device_kind`: the
# first match wins (more specific names first).
PEAK_TFLOPS = (('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('GH200', 989.0),
               ('A100', 312.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0), ('TPU v5p', 459.0),
               ('TPU v5', 459.0), ('TPU v4', 275.0))


def peak_tflops(device_kind):
  return next((tf for name, tf in PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def _settings(args):
  smoke, quick = args.smoke, args.quick
  return {
      'lengths': {'inputs': 64, 'targets': 16} if smoke else {'inputs': 512, 'targets': 128},
      'steps': args.steps or (2 if smoke or quick else 10),
      'max_batch': args.max_batch or (4 if smoke else 8 if quick else 1024),
      'plan_fraction': args.plan_fraction, 'cpu_budget_gib': args.cpu_budget_gib,
      'decode_length': args.decode_length or (8 if smoke else 16 if quick else 128),
      'decode_batches': [int(b) for b in (args.decode_batches or (
          '2' if smoke else '1,8' if quick else '1,32')).split(',')],
      'decode_reps': args.decode_reps or (1 if smoke or quick else 2),
      'attention': args.attention, 'optimizer': 'adafactor (OptimizerConfig())',
      'activations': 'bfloat16', 'params': 'float32', 'mode': (
          'smoke' if smoke else 'quick' if quick else 'full')}


# --- the worker: one case --------------------------------------------------------------------

def _config(case):
  kind, family, size = CASES[case]
  if kind == 't5':
    from t5x_lite import models
    return models.preset(family, size, dtype='bfloat16')
  from t5x_lite.models import decoder_presets
  return decoder_presets.preset(family, size, dtype='bfloat16')


def _is_oom(error):
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def _plan_batch(config, optimizer, lengths, axis_sizes, rules, budget, max_batch):
  """The largest batch <= max_batch whose plan total fits `budget` (1 if none does)."""
  from t5x_lite.training import memory_plan
  state = memory_plan.state_bytes(config, optimizer, axis_sizes, rules)

  def total(b):
    return state.total + memory_plan.activation_bytes(config, b, lengths, axis_sizes,
                                                      rules).peak(config.remat)
  lo, hi = 1, max_batch
  if total(hi) <= budget:
    return hi
  while lo < hi:  # total grows with the batch: the largest b with total(b) <= budget
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
  return lo


def _batches(case, model, batch_size, lengths, n):
  """The first `n` packed batches of the builtin mixture, the model's feature converter."""
  from t5x_lite.data import feature_converters, pipeline
  from t5x_lite.data import vocab as vocab_lib
  use_spiece = CASES[case][2] != 'tiny' and os.path.exists(SPIECE)
  vocab = vocab_lib.SentencePieceVocabulary(SPIECE) if use_spiece else vocab_lib.ByteVocabulary()
  config = pipeline.PipelineConfig(lengths, batch_size=batch_size, pack=True, prefetch=0,
                                   feature_converter=feature_converters.for_kind(
                                       model.feature_kind))
  it = pipeline.train_iterator('builtin', vocab, config, 0, 1)
  try:
    return [next(it) for _ in range(n)], 't5_spiece' if use_spiece else 'byte'
  finally:
    it.close()


def _train(case, config, model, mesh, rules, optimizer, batch_size, s, out):
  import flax.linen as nn
  import jax
  import numpy as np
  from t5x_lite import kernels, models, partitioning
  from t5x_lite.data import mixtures
  from t5x_lite.training import state as state_lib, step as step_lib
  start = time.perf_counter()
  host, out['vocab'] = _batches(case, model, batch_size, s['lengths'], min(s['steps'] + 1, 4))
  out['data_s'] = time.perf_counter() - start
  positions = [sum(v.size for k, v in b.items() if k.endswith('_target_tokens')
                   or k == 'encoder_input_tokens') for b in host]
  useful = [int(sum((v > 0).sum() for k, v in b.items() if k.endswith('segment_ids')))
            for b in host]
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  state = state_lib.create_state(model, optimizer, layout, jax.random.key(0))
  run = step_lib.jit_train_step(step_lib.make_train_step(
      model, optimizer, mixtures.get_mixture('builtin').loss_weights()), layout, mesh, rules)
  batches = [partitioning.global_batch(b, mesh) for b in host]
  rng = jax.random.key(1)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = run.jitted.lower(state, batches[0], rng, {}, run.task_loss_weights).compile()
  out['compile_s'] = time.perf_counter() - start
  cost = compiled.cost_analysis()
  out['flops_per_step'] = float((cost[0] if isinstance(cost, list) else cost)['flops'])
  analysis = compiled.memory_analysis()
  if analysis is not None:
    out['xla_memory_analysis'] = {k: int(getattr(analysis, f'{k}_size_in_bytes')) for k in (
        'argument', 'output', 'temp', 'alias')}
  if model.ops.attention != 'plain' and CASES[case][0] == 't5':  # XLA counts no FLOPs inside
    # cuDNN's custom call: count them on the plain attention's program
    plain = models.build(model.config, kernels.Kernels(model.ops.platform))
    plain_run = step_lib.jit_train_step(step_lib.make_train_step(
        plain, optimizer, mixtures.get_mixture('builtin').loss_weights()), layout, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      cost = plain_run.jitted.lower(state, batches[0], rng, {},
                                    run.task_loss_weights).cost_analysis()
    out['flops_per_step_plain_attention'] = float(
        (cost[0] if isinstance(cost, list) else cost)['flops'])
  start = time.perf_counter()
  state, metrics = compiled(state, batches[0], rng, {}, run.task_loss_weights)
  jax.block_until_ready(metrics)
  out['first_step_s'] = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(s['steps']):
    state, metrics = compiled(state, batches[(i + 1) % len(batches)], rng, {},
                              run.task_loss_weights)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / s['steps']
  order = [(i + 1) % len(batches) for i in range(s['steps'])]
  out['step_s'] = seconds
  out['loss'] = float(metrics['loss'])
  out['tokens_per_step'] = float(np.mean([positions[i] for i in order]))
  out['tokens_per_s'] = out['tokens_per_step'] / seconds
  out['useful_tokens_per_s'] = float(np.mean([useful[i] for i in order])) / seconds
  out['flop_per_s'] = max(out['flops_per_step'],
                         out.get('flops_per_step_plain_attention', 0)) / seconds
  return state.params


def _decode(config, model, params, kern, s, out, deadline):
  import jax
  import numpy as np
  from t5x_lite import decoding
  length, results = s['decode_length'], {}
  no_eos = -1  # no token has this id: every row decodes exactly `length` tokens
  for method, decoding_config in (('greedy', decoding.DecodingConfig()),
                                  ('beam4', decoding.DecodingConfig('beam', num_beams=4))):
    fn = decoding.jit(lambda p, x, c=decoding_config: decoding.predict(
        model, p, x, length, c, eos_id=no_eos)[0], kern)
    for batch in s['decode_batches']:
      name = f'{method}_batch{batch}'
      if time.time() > deadline:
        out.setdefault('skipped', []).append(f'decode {name}: time budget')
        continue
      inputs = jax.numpy.asarray(np.random.default_rng(batch).integers(
          3, config.vocab_size, (batch, s['lengths']['inputs']), np.int32))
      try:
        start = time.perf_counter()
        call = fn.lower(params, inputs).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(call(params, inputs))  # warm-up
        times = []
        for _ in range(s['decode_reps']):
          start = time.perf_counter()
          jax.block_until_ready(call(params, inputs))
          times.append(time.perf_counter() - start)
      except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: say so, go on
        results[name] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
        continue
      results[name] = {'compile_s': compile_s, 'call_s': min(times),
                       'tokens_per_s': batch * length / min(times)}
  out['decode'] = results


def worker(case, s, deadline):
  import flax
  import jax
  import optax
  from t5x_lite import kernels, models, partitioning
  from t5x_lite.training import memory_plan, optimizers
  started = time.perf_counter()
  device = jax.devices()[0]
  out = {'device_kind': device.device_kind, 'platform': device.platform,
         'devices': jax.device_count(),
         'versions': {'jax': jax.__version__, 'jaxlib': importlib.metadata.version('jaxlib'),
                      'flax': flax.__version__, 'optax': optax.__version__}}
  config = _config(case)
  mesh = partitioning.make_mesh({'data': 1}, [device])
  kern = kernels.for_mesh(mesh)
  if s['attention'] != 'auto':   # 'plain', or 'xla': the fused path's call on any backend
    kern = kernels.Kernels(kern.platform, attention=s['attention'])
  rules = partitioning.rules_for('dp')
  optimizer = optimizers.OptimizerConfig().build()
  axis_sizes = partitioning.resolve_mesh_shape({'data': -1}, 1)
  stats = device.memory_stats() or {}
  limit = stats.get('bytes_limit')
  budget = int(limit * s['plan_fraction']) if limit else int(s['cpu_budget_gib'] * 2**30)
  out.update(params=memory_plan.param_count(config), bytes_limit=limit, plan_budget=budget)
  batch = _plan_batch(config, optimizer, s['lengths'], axis_sizes, rules, budget,
                      s['max_batch'])
  while True:
    model = models.build(config, kern)
    kind = CASES[case][0]
    out['attention'] = kern.attention if kind == 't5' else 'plain (decoder_only.py)'
    out['batch'] = batch
    try:
      params = _train(case, config, model, mesh, rules, optimizer, batch, s, out)
      break
    except Exception as e:  # pylint: disable=broad-except
      if _is_oom(e) and batch > 1:
        out.setdefault('oom_batches', []).append(batch)
        batch //= 2
      elif kern.attention != 'plain' and not _is_oom(e):
        out['attention_error'] = f'{type(e).__name__}: {str(e)[:500]}'
        kern = kernels.Kernels(kern.platform)   # the plain path
      else:
        raise
  jax.clear_caches()
  plan_state, plan_act = memory_plan.plan(config, _train_config(batch, s), axis_sizes)
  out['plan_bytes'] = plan_state.total + plan_act.peak(config.remat)
  peak = (device.memory_stats() or {}).get('peak_bytes_in_use')
  out['peak_bytes'] = peak
  out['peak_over_plan'] = peak / out['plan_bytes'] if peak is not None else None
  tflops = peak_tflops(device.device_kind)
  out['peak_tflops'] = tflops
  out['mfu'] = out['flop_per_s'] / (tflops * 1e12) if tflops else None
  print(json.dumps({**out, 'decode': 'not finished'}), flush=True)  # if the parent must kill it
  _decode(config, model, params, kern, s, out, deadline)
  out['worker_s'] = time.perf_counter() - started
  return out


def _train_config(batch, s):
  from t5x_lite.training import loop, optimizers
  return loop.TrainConfig(model_dir='/tmp/t5x_lite_device_benchmark', batch_size=batch,
                          feature_lengths=s['lengths'], optimizer=optimizers.OptimizerConfig())


# --- the parent ------------------------------------------------------------------------------

def _rounded(x):
  if isinstance(x, float):
    return float(f'{x:.4g}')
  if isinstance(x, dict):
    return {k: _rounded(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_rounded(v) for v in x]
  return x


def _version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def start_case(case, settings, seconds):
  """One worker process (the parent never starts a jax backend: the device stays whole);
  `finish_case` collects it."""
  deadline = time.time() + seconds
  argv = [sys.executable, os.path.abspath(__file__), '--worker', case, '--settings',
          json.dumps(settings), '--deadline', str(deadline)]
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      p for p in (REPO, os.environ.get('PYTHONPATH')) if p)}
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.9')  # GPU: the pool plan is set against
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
  return proc, time.perf_counter(), seconds + 30


def finish_case(proc, start, timeout):
  try:
    stdout, stderr = proc.communicate(timeout=max(timeout - (time.perf_counter() - start), 1))
  except subprocess.TimeoutExpired:
    proc.kill()
    stdout, stderr = proc.communicate()
    lines = stdout.strip().splitlines()   # the train figures, printed before decoding
    return {**(json.loads(lines[-1]) if lines else {}),
            'error': f'killed after {timeout:.0f} s', 'stderr_tail': stderr[-2000:]}
  lines = stdout.strip().splitlines()
  if proc.returncode or not lines:
    return {'error': f'exit status {proc.returncode}', 'stderr_tail': stderr[-3000:]}
  return json.loads(lines[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='tiny presets on CPU, in seconds')
  parser.add_argument('--quick', action='store_true', help='2 steps, batch <= 8, 16 new tokens')
  parser.add_argument('--cases', default=None, help=f'comma-separated, of {sorted(CASES)}')
  parser.add_argument('--steps', type=int, default=None, help='timed train steps (default 10)')
  parser.add_argument('--max_batch', type=int, default=None)
  parser.add_argument('--plan_fraction', type=float, default=0.9,
                      help='of the device bytes_limit that plan may fill')
  parser.add_argument('--cpu_budget_gib', type=float, default=4.0,
                      help='plan budget where memory_stats is missing (CPU)')
  parser.add_argument('--decode_length', type=int, default=None)
  parser.add_argument('--decode_batches', default=None, help='default 1,32 (quick: 1,8)')
  parser.add_argument('--decode_reps', type=int, default=None)
  parser.add_argument('--attention', choices=('auto', 'plain', 'xla'), default='auto',
                      help="plain: the model's own attention even where cuDNN's is chosen; "
                           "xla: jax.nn.dot_product_attention(implementation='xla')")
  parser.add_argument('--time_budget_s', type=float, default=390.0,
                      help='all cases together; each worker skips what would not fit')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--settings', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--deadline', type=float, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, json.loads(args.settings), args.deadline)))
    return
  settings = _settings(args)
  cases = args.cases.split(',') if args.cases else list(SMOKE if args.smoke else FULL)
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    raise SystemExit(f'unknown cases {unknown}; known: {sorted(CASES)}')
  start, results = time.perf_counter(), {}
  if args.smoke:  # CPU: the workers side by side (XLA compiles on one core each)
    running = {case: start_case(case, settings, args.time_budget_s) for case in cases}
    results = {case: finish_case(*running[case]) for case in cases}
  for i, case in enumerate(c for c in cases if c not in results):
    left = args.time_budget_s - (time.perf_counter() - start)
    print(f'[device] {case}...', file=sys.stderr, flush=True)
    results[case] = finish_case(*start_case(case, settings,
                                            max(left / (len(cases) - i), 30.0)))
  first = next((r for r in results.values() if 'device_kind' in r), {})
  line = {'benchmark': 'device', 'date': str(datetime.date.today()),
          'device_kind': first.get('device_kind'), 'platform': first.get('platform'),
          'devices': first.get('devices'), 'peak_tflops': first.get('peak_tflops'),
          'versions': {**first.get('versions', {}), 'python': platform.python_version(),
                       'jax_cuda12_plugin': _version('jax-cuda12-plugin')},
          'host': {'machine': platform.machine(), 'cpus': os.cpu_count()},
          'settings': settings, 'wall_s': time.perf_counter() - start,
          'cases': {case: {k: v for k, v in r.items()
                           if k not in ('device_kind', 'platform', 'devices', 'versions',
                                        'peak_tflops')} for case, r in results.items()}}
  print(json.dumps(_rounded(line)))


if __name__ == '__main__':
  main()
