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
must not compete), all with launch/local.sh's GLIBC_TUNABLES unless the caller sets its own
(both frameworks step faster with it: memory freed between steps is not handed back). A
worker compiles and runs 3 discarded steps while the others sit idle; then the parent
interleaves single steps, A B C / B C A / ..., and reports medians. Also reported: a 2048^3
fp32 matmul's GFLOP/s in each worker, achieved FLOP/s as a fraction of the framework's best
of these (FLOPs from XLA's cost_analysis of our compiled step; HF does the same math, so the
same count), and useful (non-pad) tokens/s of packed batches of the builtin mixture (ours)
vs the same mixture padded one example per row (HF).

  python benchmarks/train_step.py [--steps 5] [--cases small_fp32,small_bf16,tiny_fp32]
                                  [--torch_threads N] [--token_batches 20]
  (default cases: small_bf16 only on a CPU with native bf16 -- avx512_bf16 / amx_bf16)
  python benchmarks/train_step.py --quick    # tiny model, 2 timed steps: checks it all runs
  (also a case tiny_bf16; a busy machine is flagged in the JSON under 'warning')
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, REPO)

from _train_step_workers import (BATCH, CASES, LENGTHS, jax_worker, torch_worker,  # noqa: E402
                                 worker_env)

from t5x_lite import cpu_features  # noqa: E402

PAUSE_S = 0.2  # between steps of different workers: lets idle OpenMP/Eigen threads go to sleep
SPIECE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
                      't5_spiece', 'spiece.model')
VARIANTS = {'ours': ['--worker', 'jax'], 'hf_eager': ['--worker', 'torch'],
            'hf_compiled': ['--worker', 'torch', '--compile']}


class Worker:
  """A benchmark process that sets itself up, prints one JSON line of info, then times one
  call per command line read from stdin (`serve`)."""

  def __init__(self, name, argv, script=None):
    self.name, self.log = name, tempfile.TemporaryFile('w+')
    self.proc = subprocess.Popen([sys.executable, script or os.path.abspath(__file__)] + argv,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                 text=True, bufsize=1, env=worker_env())
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.seek(0)
      raise RuntimeError(f'worker {self.name} exited ({self.proc.returncode}):\n'
                         + self.log.read()[-4000:])
    return json.loads(line)

  def step(self, command='step'):
    self.proc.stdin.write(command + '\n')
    self.proc.stdin.flush()
    return self._read()['step_s']

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    self.log.close()


def measure_case(case, steps, discard, torch_threads):
  workers = {}
  try:
    for name, argv in VARIANTS.items():  # one at a time: a compile never overlaps a step
      _log(f'{case}: starting {name}')
      workers[name] = Worker(f'{case}/{name}', argv + [
          '--case', case, '--discard', str(discard), '--torch_threads', str(torch_threads)])
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
  # An estimate, not a measurement: HF padding each batch to its longest row instead, with the
  # step time shrinking in proportion to the tokens (optimistic for HF).
  result['ours_over_hf_compiled_if_padded_to_longest_estimate'] = (
      result['ours_over_hf_compiled'] * padded['efficiency']
      / padded['efficiency_if_padded_to_longest'])
  return result


def cpu_busy(seconds=1.0):
  """Fraction of all CPUs busy over `seconds` (from /proc/stat), whoever uses them."""
  def sample():
    with open('/proc/stat') as f:
      ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # minus idle and iowait
  try:
    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
  except OSError:
    return None
  return (busy1 - busy0) / max(total1 - total0, 1)


def machine():
  info = {'machine': platform.machine(), 'cpus': os.cpu_count(),
          'worker_glibc_tunables': worker_env()['GLIBC_TUNABLES'],
          'cpu_busy_at_start': cpu_busy(), 'load_average_at_start': os.getloadavg()[0]}
  with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
    lines = f.read().splitlines()
    info['cpu'] = next((l.split(':', 1)[1].strip() for l in lines if l.startswith('model name')),
                       '')
  info['simd'] = sorted({'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'} & cpu_features.flags())
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
  parser.add_argument('--cases', default=None,
                      help='default: small_fp32,small_bf16,tiny_fp32 on a CPU with native bf16 '
                           '(avx512_bf16 / amx_bf16), else small_fp32,tiny_fp32')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per variant')
  parser.add_argument('--discard', type=int, default=3, help='steps discarded after compiling')
  parser.add_argument('--token_batches', type=int, default=20)
  parser.add_argument('--quick', action='store_true', help='tiny case, 2 timed steps')
  parser.add_argument('--worker', choices=('jax', 'torch'))
  parser.add_argument('--case', choices=sorted(CASES))
  parser.add_argument('--compile', action='store_true')
  parser.add_argument('--torch_threads', type=int, default=0, help='0: torch\'s default')
  args = parser.parse_args()
  if args.worker:
    out = os.fdopen(os.dup(1), 'w')  # replies; whatever libraries print goes to stderr
    os.dup2(2, 1)
    if args.worker == 'jax':
      jax_worker(out, args.case, args.discard)
    else:
      torch_worker(out, args.case, args.compile, args.discard, args.torch_threads)
    return
  if args.quick:
    args.cases, args.steps, args.token_batches = 'tiny_fp32', 2, 3
  start = time.perf_counter()
  info = machine()
  native_bf16 = cpu_features.has_native_bf16()
  skipped = {}
  if args.cases is None:
    # Without native bf16 both sides emulate it: HF's autocast step then takes minutes and the
    # run overshoots the 10-minute budget, for a figure no user would choose on such a CPU.
    args.cases = 'small_fp32,small_bf16,tiny_fp32' if native_bf16 else 'small_fp32,tiny_fp32'
    if not native_bf16:
      skipped['small_bf16'] = 'no native bf16 on this CPU (pass --cases to run it anyway)'
  cases = args.cases.split(',')
  result = {'benchmark': 'train_step', 'batch': BATCH, 'feature_lengths': LENGTHS,
            'optimizer': 'AdamW on both sides (ours: optax via OptimizerConfig(name="adamw"); '
                         'HF: torch.optim.AdamW, fused when available)',
            'flops': "XLA cost_analysis()['flops'] of our compiled step (forward, backward, "
                     'AdamW); HF figures use the same count (same model math)',
            'bf16': 'ours: activations bfloat16, params fp32; HF: torch.autocast(cpu, '
                    'bfloat16) around forward + loss, params and AdamW fp32',
            'tokens_per_s': 'batch x (inputs + targets) positions per second, all real tokens '
                            'in the synthetic batch',
            'timing': f'own process per variant, single steps interleaved, median of '
                      f'{args.steps}, {args.discard} steps discarded after compiling',
            'machine': info, 'cases': {}, 'skipped_cases': skipped}
  if (result['machine']['cpu_busy_at_start'] or 0) > 0.1:
    result['warning'] = ('CPUs busy at start: torch\'s OpenMP threads slow down sharply when '
                         'another process takes a core, jax much less; figures are not a result')
  versions = {}
  for case in cases:
    result['cases'][case], case_versions = measure_case(case, args.steps, args.discard,
                                                        args.torch_threads)
    versions.update(case_versions)
  result['versions'] = versions
  # Each worker times the matmul once, and one slow moment of this shared host can halve it
  # (a fraction above 1 then): the fractions divide by the best rate of the whole run.
  frameworks = (('jax', ['ours']), ('torch', ['hf_eager', 'hf_compiled']))
  result['matmul_gflops'] = {
      fw: max(c[n]['matmul_gflops'] for c in result['cases'].values() for n in ns)
      for fw, ns in frameworks}
  for c in result['cases'].values():
    for fw, ns in frameworks:
      for n in ns:
        c[n]['flop_fraction_of_matmul'] = (c['flops_per_step'] * c[n]['steps_per_s']
                                           / (result['matmul_gflops'][fw] * 1e9))
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
  result['machine'].update(cpu_busy_at_end=cpu_busy(), load_average_at_end=os.getloadavg()[0])
  result['wall_s'] = time.perf_counter() - start
  print(json.dumps(_rounded(result)))


if __name__ == '__main__':
  main()
