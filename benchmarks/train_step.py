"""Train-step speed of t5x_lite against Hugging Face `transformers` (torch) on CPU.

Prints one JSON line. Cases (batch 8, 256 inputs / 64 targets): flan-t5-small fp32,
flan-t5-small with bfloat16 activations, and the tiny preset. For each case:
  ours         step.make_train_step + jit_train_step (AdamW, like HF), one-device mesh,
               synthetic batch in the batch contract; compiled once ahead of time.
  hf_eager     transformers.T5ForConditionalGeneration: forward with labels, backward, fused
               AdamW step, zero_grad; torch.set_flush_denormal(True); fan-in init (lm_head
               std d_model**-0.5, as ours: HF's std 1.0 makes denormals).
  hf_compiled  the same with torch.compile(model) (default mode).
bf16: ours = preset(dtype='bfloat16') (bf16 activations, fp32 params); HF =
torch.autocast('cpu', bfloat16) around forward + loss (fp32 params, fp32 AdamW).

Each measurement runs in its own worker process (one framework per process: thread pools
must not compete). A worker compiles and runs 3 discarded steps while the others sit idle;
then the parent interleaves single steps, A B C / B C A / ..., and reports medians. Also
reported: a 2048^3 fp32 matmul's GFLOP/s in each worker, achieved FLOP/s as a fraction of it
(FLOPs from XLA's cost_analysis of our compiled step; HF does the same math, so the same
count), and useful (non-pad) tokens/s of packed batches of the builtin mixture (ours) vs the
same mixture padded one example per row (HF).

  python benchmarks/train_step.py [--steps 5] [--cases small_fp32,small_bf16,tiny_fp32]
  python benchmarks/train_step.py --quick    # tiny model, 2 timed steps: checks it all runs
  python benchmarks/train_step.py --worker jax|torch --case tiny_fp32 [--compile]  # internal
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, REPO)

BATCH = 8
LENGTHS = {'inputs': 256, 'targets': 64}
CASES = {'small_fp32': ('small', 'float32'), 'small_bf16': ('small', 'bfloat16'),
         'tiny_fp32': ('tiny', 'float32')}
LEARNING_RATE = 1e-4  # AdamW on both sides: b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01
MATMUL_N = 2048
PAUSE_S = 0.2  # between steps of different workers: lets idle OpenMP/Eigen threads go to sleep
SPIECE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
                      't5_spiece', 'spiece.model')
VARIANTS = {'ours': ['--worker', 'jax'], 'hf_eager': ['--worker', 'torch'],
            'hf_compiled': ['--worker', 'torch', '--compile']}


def synthetic_batch(vocab_size, seed=0):
  """The batch contract with random token ids: one segment per row, every token real."""
  rng = np.random.default_rng(seed)
  out = {}
  for prefix, length in (('encoder', LENGTHS['inputs']), ('decoder', LENGTHS['targets'])):
    out[f'{prefix}_segment_ids'] = np.ones((BATCH, length), np.int32)
    out[f'{prefix}_positions'] = np.tile(np.arange(length, dtype=np.int32), (BATCH, 1))
  out['encoder_input_tokens'] = rng.integers(3, vocab_size, (BATCH, LENGTHS['inputs']), np.int32)
  targets = rng.integers(3, vocab_size, (BATCH, LENGTHS['targets']), np.int32)
  out['decoder_target_tokens'] = targets
  out['decoder_input_tokens'] = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]],
                                               axis=1)
  out['decoder_loss_weights'] = np.ones_like(targets)
  out['decoder_task_ids'] = np.zeros_like(targets)
  return out


def best_gflops(matmul, reps=5):
  matmul()  # warm up
  best = min(_timed(matmul) for _ in range(reps))
  return 2 * MATMUL_N ** 3 / best / 1e9


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# --- workers: print one JSON line when ready, then one per 'step' read on stdin -------------

def serve(out, info, step, discard):
  for _ in range(discard):
    info['loss'] = float(step())
  out.write(json.dumps(info) + '\n')
  out.flush()
  for line in sys.stdin:
    if line.strip() != 'step':
      break
    out.write(json.dumps({'step_s': _timed(step)}) + '\n')
    out.flush()


def jax_worker(out, case, discard):
  import flax
  import flax.linen as nn
  import jax
  import optax
  from t5x_lite import models, partitioning
  from t5x_lite.training import optimizers
  from t5x_lite.training import state as state_lib
  from t5x_lite.training import step as step_lib
  size, dtype = CASES[case]
  config = models.preset('flan_t5', size, dtype=dtype)
  optimizer = optimizers.OptimizerConfig(name='adamw', learning_rate=LEARNING_RATE).build()
  mesh = partitioning.make_mesh({'data': 1}, jax.devices()[:1])
  rules = partitioning.rules_for('dp')
  layout = state_lib.state_layout(config, optimizer, mesh, rules)
  state = state_lib.create_state(config, optimizer, layout, jax.random.key(0))
  train_step = step_lib.make_train_step(models.Transformer(config), optimizer, np.ones(1))
  run = step_lib.jit_train_step(train_step, layout, mesh, rules)
  batch = partitioning.global_batch(synthetic_batch(config.vocab_size), mesh)
  rng = jax.random.key(1)
  a = jax.random.normal(jax.random.key(2), (MATMUL_N, MATMUL_N), jax.numpy.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  info = {'matmul_gflops': best_gflops(lambda: jax.block_until_ready(matmul(a, a)))}
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = run.jitted.lower(state, batch, rng).compile()
  info['compile_s'] = time.perf_counter() - start
  cost = compiled.cost_analysis()
  info['flops'] = float((cost[0] if isinstance(cost, list) else cost)['flops'])
  info['versions'] = {'jax': jax.__version__, 'flax': flax.__version__,
                      'optax': optax.__version__}
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch, rng)
    return jax.block_until_ready(metrics['loss'])
  start = time.perf_counter()
  step()  # the first run (allocations), then `discard` more in serve()
  info['first_step_s'] = time.perf_counter() - start
  serve(out, info, step, discard)


def hf_model(size):
  """A random T5ForConditionalGeneration matching preset('flan_t5', size), fan-in init."""
  import torch
  import transformers
  from t5x_lite.models import presets  # imports jax too, but never starts its backend
  c = presets.preset('flan_t5', size)
  config = transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
      num_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers,
      num_heads=c.num_heads, feed_forward_proj=c.feed_forward_proj, dropout_rate=0.0,
      relative_attention_num_buckets=c.relative_attention_num_buckets,
      relative_attention_max_distance=c.relative_attention_max_distance,
      layer_norm_epsilon=c.layer_norm_epsilon, use_cache=False, pad_token_id=0,
      eos_token_id=1, decoder_start_token_id=0)
  config.tie_word_embeddings = False  # transformers 5 forces True at construction
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config)
  model.encoder.embed_tokens = model.shared
  model.decoder.embed_tokens = model.shared
  with torch.no_grad():
    model.lm_head.weight.normal_(0.0, c.d_model ** -0.5)
  return model.train(), c


def torch_worker(out, case, compile_model, discard):
  import torch
  import transformers
  info = {'flush_denormal': torch.set_flush_denormal(True), 'threads': torch.get_num_threads()}
  a = torch.randn(MATMUL_N, MATMUL_N)
  info['matmul_gflops'] = best_gflops(lambda: torch.mm(a, a))
  size, dtype = CASES[case]
  model, c = hf_model(size)
  try:
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01, fused=True)
    info['adamw'] = 'fused'
  except (RuntimeError, ValueError):
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    info['adamw'] = 'default'
  b = {k: torch.from_numpy(v).long() for k, v in synthetic_batch(c.vocab_size).items()}
  inputs = dict(input_ids=b['encoder_input_tokens'], attention_mask=b['encoder_segment_ids'],
                decoder_input_ids=b['decoder_input_tokens'], labels=b['decoder_target_tokens'])
  forward = torch.compile(model) if compile_model else model
  autocast = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if dtype == 'bfloat16' else (
      contextlib.nullcontext)
  info['versions'] = {'torch': torch.__version__, 'transformers': transformers.__version__}

  def step():
    with autocast():
      loss = forward(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
  start = time.perf_counter()
  step()  # compiles forward and backward when compile_model
  info['compile_s' if compile_model else 'first_step_s'] = time.perf_counter() - start
  serve(out, info, step, discard)


# --- parent ---------------------------------------------------------------------------------

class Worker:
  def __init__(self, name, argv):
    self.name, self.log = name, tempfile.TemporaryFile('w+')
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                 text=True, bufsize=1)
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.seek(0)
      raise RuntimeError(f'worker {self.name} exited ({self.proc.returncode}):\n'
                         + self.log.read()[-4000:])
    return json.loads(line)

  def step(self):
    self.proc.stdin.write('step\n')
    self.proc.stdin.flush()
    return self._read()['step_s']

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    self.log.close()


def measure_case(case, steps, discard):
  workers = {}
  try:
    for name, argv in VARIANTS.items():  # one at a time: a compile never overlaps a step
      _log(f'{case}: starting {name}')
      workers[name] = Worker(f'{case}/{name}', argv + ['--case', case, '--discard', str(discard)])
    names, times = list(workers), {name: [] for name in workers}
    for i in range(steps):
      for name in names[i % len(names):] + names[:i % len(names)]:
        time.sleep(PAUSE_S)
        times[name].append(workers[name].step())
      _log(f'{case}: round {i + 1}/{steps} ' + ' '.join(f'{n} {t[-1]:.3f}s' for n, t in
                                                         times.items()))
  finally:
    for w in workers.values():
      w.close()
  flops = workers['ours'].info['flops']
  result = {'flops_per_step': flops}
  for name, w in workers.items():
    step_s = statistics.median(times[name])
    result[name] = dict(
        steps_per_s=1 / step_s, tokens_per_s=BATCH * sum(LENGTHS.values()) / step_s,
        step_s_median=step_s, step_s_range=[min(times[name]), max(times[name])],
        flop_fraction_of_matmul=flops / step_s / (w.info['matmul_gflops'] * 1e9),
        **{k: v for k, v in w.info.items() if k not in ('versions', 'flops')})
  for hf in ('hf_compiled', 'hf_eager'):
    result[f'ours_over_{hf}'] = result['ours']['steps_per_s'] / result[hf]['steps_per_s']
  versions = {k: v for w in workers.values() for k, v in w.info['versions'].items()}
  return result, versions


def count_tokens(vocab, pack, batches):
  """Non-pad tokens per batch of the builtin mixture, packed or one example per row."""
  from t5x_lite.data import pipeline
  config = pipeline.PipelineConfig(LENGTHS, batch_size=BATCH, pack=pack, prefetch=0)
  it = pipeline.train_iterator('builtin', vocab, config, 0, 1)
  real, longest = [], []
  for _ in range(batches):
    b = next(it)
    enc, dec = b['encoder_segment_ids'] > 0, b['decoder_segment_ids'] > 0
    real.append(int(enc.sum() + dec.sum()))
    longest.append(BATCH * int(enc.sum(1).max() + dec.sum(1).max()))
  stats = dict(it.stats)
  it.close()
  out = {'nonpad_tokens_per_batch': statistics.mean(real),
         'efficiency': sum(real) / (batches * BATCH * sum(LENGTHS.values())),
         'examples_per_batch': stats['examples'] / batches,
         'truncated_examples': stats['truncated_examples']}
  if not pack:  # what HF's dynamic padding (to the longest row of each batch) would keep
    out['efficiency_if_padded_to_longest'] = sum(real) / sum(longest)
  return out


def useful_tokens(case, figures, batches):
  from t5x_lite.data import vocab as vocab_lib
  use_spiece = CASES[case][0] != 'tiny' and os.path.exists(SPIECE)
  vocab = vocab_lib.SentencePieceVocabulary(SPIECE) if use_spiece else vocab_lib.ByteVocabulary()
  packed, padded = count_tokens(vocab, True, batches), count_tokens(vocab, False, batches)
  result = {'case': case, 'vocab': 't5_spiece' if use_spiece else 'byte',
            'method': f'non-pad tokens per batch (mean of {batches} pipeline batches) x the '
                      f'steps/s of {case} (step time depends on the shapes only)',
            'ours_packed': packed, 'hf_padded': padded}
  ours = packed['nonpad_tokens_per_batch'] * figures['ours']['steps_per_s']
  result['ours_tokens_per_s'] = ours
  for hf in ('hf_compiled', 'hf_eager'):
    result[f'{hf}_tokens_per_s'] = padded['nonpad_tokens_per_batch'] * figures[hf]['steps_per_s']
    result[f'ours_over_{hf}'] = ours / result[f'{hf}_tokens_per_s']
  return result


def machine():
  info = {'machine': platform.machine(), 'cpus': os.cpu_count(),
          'load_average_at_start': os.getloadavg()[0]}
  with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
    lines = f.read().splitlines()
    info['cpu'] = next((l.split(':', 1)[1].strip() for l in lines if l.startswith('model name')),
                       '')
    flags = next((l.split(':', 1)[1].split() for l in lines if l.startswith('flags')), [])
    info['simd'] = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
  return info


def _log(message):
  print(f'[train_step] {message}', file=sys.stderr, flush=True)


def _rounded(x):
  if isinstance(x, float):
    return float(f'{x:.4g}')
  if isinstance(x, dict):
    return {k: _rounded(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_rounded(v) for v in x]
  return x


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default='small_fp32,small_bf16,tiny_fp32')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per variant')
  parser.add_argument('--discard', type=int, default=3, help='steps discarded after compiling')
  parser.add_argument('--token_batches', type=int, default=20)
  parser.add_argument('--quick', action='store_true', help='tiny case, 2 timed steps')
  parser.add_argument('--worker', choices=('jax', 'torch'))
  parser.add_argument('--case', choices=sorted(CASES))
  parser.add_argument('--compile', action='store_true')
  args = parser.parse_args()
  if args.worker:
    out = os.fdopen(os.dup(1), 'w')  # replies; whatever libraries print goes to stderr
    os.dup2(2, 1)
    if args.worker == 'jax':
      jax_worker(out, args.case, args.discard)
    else:
      torch_worker(out, args.case, args.compile, args.discard)
    return
  if args.quick:
    args.cases, args.steps, args.token_batches = 'tiny_fp32', 2, 3
  cases = args.cases.split(',')
  result = {'benchmark': 'train_step', 'batch': BATCH, 'feature_lengths': LENGTHS,
            'optimizer': 'AdamW on both sides (ours: optax via OptimizerConfig(name="adamw"); '
                         'HF: torch.optim.AdamW, fused when available)',
            'flops': "XLA cost_analysis()['flops'] of our compiled step (forward, backward, "
                     'AdamW); HF figures use the same count (same model math)',
            'bf16': 'ours: activations bfloat16, params fp32; HF: torch.autocast(cpu, '
                    'bfloat16) around forward + loss, params and AdamW fp32',
            'timing': f'own process per variant, single steps interleaved, median of '
                      f'{args.steps}, {args.discard} steps discarded after compiling',
            'machine': machine(), 'cases': {}}
  versions = {}
  for case in cases:
    result['cases'][case], case_versions = measure_case(case, args.steps, args.discard)
    versions.update(case_versions)
  result['versions'] = versions
  result['matmul_gflops'] = {
      fw: statistics.median(c[name]['matmul_gflops'] for c in result['cases'].values())
      for fw, name in (('jax', 'ours'), ('torch', 'hf_eager'))}
  token_case = 'small_fp32' if 'small_fp32' in cases else cases[0]
  _log(f'counting non-pad tokens of the builtin mixture ({token_case})')
  result['useful_tokens'] = useful_tokens(token_case, result['cases'][token_case],
                                          args.token_batches)
  result['targets'] = {'ours_over_hf_compiled_steps_per_s': 1.1,
                       'useful_tokens_ours_over_hf_compiled': 2.0}
  if 'small_fp32' in cases:
    small = result['cases']['small_fp32']['ours_over_hf_compiled']
    result['targets']['small_fp32_met'] = small >= 1.1
  result['targets']['useful_tokens_met'] = (
      result['useful_tokens']['ours_over_hf_compiled'] >= 2.0)
  result['machine']['load_average_at_end'] = os.getloadavg()[0]
  print(json.dumps(_rounded(result)))


if __name__ == '__main__':
  main()
