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

Useful (non-pad) tokens/s, measured on the builtin mixture (`useful_tokens` in the JSON; one
case, small_fp32 by default): the first `--token_batches` batches of our pipeline (T5's
SentencePiece ids; bytes for tiny), the same examples in the same order on both sides, each
side training as its users would, timed in the same interleaved rounds:
  ours_packed                    our step on the pipeline's packed batches ([8, 256/64], ~100
                                 examples each), the mixture's loss weights, one batch a call.
  hf_longest_eager               HF on the same examples, 8 a batch, collated by
  hf_longest_compile_dynamic     `DataCollatorForSeq2Seq(padding='longest')` (each batch padded
  hf_longest_compile_per_bucket  to its longest input and its longest target, labels -100,
                                 decoder_input_ids from the model), as Seq2SeqTrainer does;
                                 eager, torch.compile(dynamic=True), or pad_to_multiple_of=
                                 `--bucket` with one static graph per shape (dynamic=False).
                                 Every batch runs once before timing (each shape compiled); a
                                 call trains on the next `--longest_per_call` batches.
Figure = median over the timed calls of a call's non-pad input + target tokens / its seconds
(robust to one stalled call; `tokens_per_s_all_calls`: their sums' ratio). Headline
`ours_over_hf_padded_to_longest`: ours over the best of the three HF settings (named in
`hf_best_padded_to_longest`). Second row (`padded_to_full_length`, when the case's step table
ran): HF with one example per row padded to 256/64, as the figure was before: the step table's
steps/s at those shapes (HF's faster setting) x the non-pad tokens such batches hold, against
ours' steps/s x the tokens of a packed batch.

Decoder-only row (`decoder_only` in the JSON; `--decoder_only 135m`, the default): our
decoder-only model against transformers' LlamaForCausalLM at SmolLM-135M's shape (hidden 576,
30 layers, 9 heads, 3 kv heads, MLP 1536, vocab 49152, tied embeddings; benchmarks/
_decoder_only_case.py), fp32, batch 8 x 256, both sides from the same random weights (a HF
directory written by hf_causal.save, read by hf_causal.load and from_pretrained):
  ours         the same make_train_step + jit_train_step (AdamW) on the decoder-only batch
               contract (synthetic ids, one segment per row, full-sequence loss).
  hf_eager     forward(input_ids, labels=input_ids) (sdpa attention, use_cache off), backward,
               fused AdamW, zero_grad; flush_denormal, as above.
  hf_compiled  the same with torch.compile(model).
`ours_over_hf_best` divides by the faster HF setting (`hf_best`). A step is ~1.8 TFLOP
(~7-16 s here), so this row times `--decoder_steps` 3 interleaved rounds with no discarded
steps beyond the first (compile) one (`--decoder_discard 0`) instead of 5 + 3: three timed
steps and a median robust to one slow call, for ~4-5 minutes of a quiet host (torch.compile's
first compile of 30 layers alone ~1-3 min). The whole default run then takes longer than the
10 minutes the T5 rows alone take (~9.5): `--decoder_only none` is the run as it was, and
`--cases none --useful_case none` the decoder-only row alone. Memory: the step peaks at
~8-9 GB RSS in our worker (XLA's temporaries 6.5 GB + params and AdamW 1.6 GB), ~7 GB in HF's
eager one and ~6 GB compiled; so that the three fit beside each other, these workers hand
their freed heap back to the kernel after each call, outside the timing (`trim_s`,
`peak_rss_gb`, `idle_rss_gb` per variant; ~2 GB each when idle): ~13 GB at the peak, where
the other rows' workers keep theirs. The next step's first touch of that memory is timed, on
both sides alike.

Each measurement runs in its own worker process (one framework per process: thread pools
must not compete), all with launch/local.sh's GLIBC_TUNABLES unless the caller sets its own
(both frameworks step faster with it: memory freed between steps is not handed back). A
worker compiles and warms up while the others sit idle; then the parent interleaves single
calls, A B C / B C A / ..., and reports medians. Also reported: a 2048^3 fp32 matmul's
GFLOP/s in each worker and achieved FLOP/s as a fraction of the framework's best of these
(FLOPs from XLA's cost_analysis of our compiled step; HF does the same math, so the same
count).

  python benchmarks/train_step.py [--steps 5] [--cases small_fp32,small_bf16,tiny_fp32]
                                  [--torch_threads N] [--token_batches 16]
                                  [--longest_per_call 3] [--bucket 16] [--useful_case C|none]
  (default cases: small_bf16 only on a CPU with native bf16 -- avx512_bf16 / amx_bf16)
  python benchmarks/train_step.py --cases none --decoder_only none   # the useful-tokens
                                  # figures alone (no 2nd row)
  python benchmarks/train_step.py --quick    # tiny models, 2 timed steps: checks it all runs
  python benchmarks/train_step.py [--decoder_only 135m|tiny|none] [--decoder_steps 3]
                                  [--decoder_discard 0]
  (also a case tiny_bf16; a busy machine is flagged in the JSON under 'warning')
  python benchmarks/train_step.py --worker jax|torch --case tiny_fp32 [--compile]  # internal
  (a decoder-only case's workers: --case llama_135m_fp32 --hf_dir DIR)
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

import _decoder_only_case as decoder_only  # noqa: E402
from _train_step_workers import (BATCH, CASES, LENGTHS, jax_worker, torch_worker,  # noqa: E402
                                 worker_env)

from t5x_lite import cpu_features  # noqa: E402

DECODER_STEPS, DECODER_DISCARD = 3, 0  # the decoder-only row's (docstring: the time budget)
PAUSE_S = 0.2  # between steps of different workers: lets idle OpenMP/Eigen threads go to sleep
VARIANTS = {'ours': ['--worker', 'jax'], 'hf_eager': ['--worker', 'torch'],
            'hf_compiled': ['--worker', 'torch', '--compile']}
LONGEST = ('hf_longest_eager', 'hf_longest_compile_dynamic', 'hf_longest_compile_per_bucket')


def useful_variants(bucket, per_call):
  longest = ['--worker', 'torch', '--data', 'longest', '--per_call', str(per_call)]
  return {'ours_packed': ['--worker', 'jax', '--data', 'packed'], LONGEST[0]: longest,
          LONGEST[1]: longest + ['--compile', '--dynamic'],
          LONGEST[2]: longest + ['--compile', '--bucket', str(bucket)]}


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

  def call(self, command='step'):
    """The reply to one command: {'step_s': seconds, ...whatever the call returned}."""
    self.proc.stdin.write(command + '\n')
    self.proc.stdin.flush()
    return self._read()

  def step(self, command='step'):
    return self.call(command)['step_s']

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    self.log.close()


def interleave(label, variants, rounds, argv):
  """Start one worker per variant (one at a time: a compile never overlaps a step), then
  `rounds` rounds of one call each, rotating the order; returns (infos, replies) by name."""
  workers = {}
  try:
    for name, variant_argv in variants.items():
      _log(f'{label}: starting {name}')
      workers[name] = Worker(f'{label}/{name}', variant_argv + argv)
    names, replies = list(workers), {name: [] for name in workers}
    for i in range(rounds):
      for name in names[i % len(names):] + names[:i % len(names)]:
        time.sleep(PAUSE_S)
        replies[name].append(workers[name].call())
      _log(f'{label}: round {i + 1}/{rounds} ' + ' '.join(
          f'{n} {r[-1]["step_s"]:.3f}s' for n, r in replies.items()))
  finally:
    for w in workers.values():
      w.close()
  return {name: w.info for name, w in workers.items()}, replies


def measure_case(case, steps, discard, torch_threads, more_argv=(),
                 tokens_per_step=BATCH * sum(LENGTHS.values())):
  infos, replies = interleave(case, VARIANTS, steps, [
      '--case', case, '--discard', str(discard), '--torch_threads', str(torch_threads),
      *more_argv])
  flops = infos['ours']['flops']
  result = {'flops_per_step': flops}
  for name, info in infos.items():
    times = [r['step_s'] for r in replies[name]]
    step_s = statistics.median(times)
    result[name] = dict(
        steps_per_s=1 / step_s, tokens_per_s=tokens_per_step / step_s,
        step_s_median=step_s, step_s_range=[min(times), max(times)],
        **{k: v for k, v in info.items() if k not in ('versions', 'flops')})
  for hf in ('hf_compiled', 'hf_eager'):
    result[f'ours_over_{hf}'] = result['ours']['steps_per_s'] / result[hf]['steps_per_s']
  versions = {k: v for info in infos.values() for k, v in info['versions'].items()}
  return result, versions


def measure_decoder_only(size, steps, discard, torch_threads):
  """The decoder-only row: our decoder-only model against HF's LlamaForCausalLM (eager and
  torch.compile) at `size`, both from the same weights (a HF directory written here), batch
  8 x 256, the step table's workers and interleaving; `ours_over_hf_best` divides by the faster
  HF setting, named in `hf_best`."""
  case = decoder_only.TRAIN_CASE_OF_SIZE[size]
  with tempfile.TemporaryDirectory() as hf_dir:
    _log(f'{case}: writing the weights both sides load')
    decoder_only.write_hf_dir(size, hf_dir)
    result, versions = measure_case(
        case, steps, discard, torch_threads, ['--hf_dir', hf_dir],
        tokens_per_step=decoder_only.BATCH * decoder_only.LENGTH)
  best = max(('hf_compiled', 'hf_eager'), key=lambda n: result[n]['steps_per_s'])
  ratio = result['ours']['steps_per_s'] / result[best]['steps_per_s']
  return {'case': case, 'name': decoder_only.NAMES[size], 'model': decoder_only.describe(size),
          'batch': decoder_only.BATCH,
          'length': decoder_only.LENGTH,
          'timing': f'own process per variant, single calls interleaved, median of {steps} '
                    f'rounds, {discard} steps discarded after compiling',
          'loss': 'ours: full-sequence loss on 256 targets (z-loss 1e-4, as every step here); '
                  'HF: labels=input_ids (its shift: 255 targets)',
          **result, 'hf_best': best, 'ours_over_hf_best': ratio}, versions


def measure_useful(case, rounds, discard, torch_threads, batches, per_call, bucket, steps=None):
  """Useful (non-pad) tokens/s on builtin-mixture batches: ours packed against HF padded per
  batch to its longest row (three settings, the best one the headline); with the case's step
  table `steps`, also against HF padded to full length (the second row)."""
  infos, replies = interleave(f'useful/{case}', useful_variants(bucket, per_call), rounds, [
      '--case', case, '--discard', str(discard), '--torch_threads', str(torch_threads),
      '--batches', str(batches)])
  result = {'case': case, 'vocab': infos['ours_packed']['data']['vocab'], 'batches': batches,
            'timed_calls': rounds,
            'method': 'non-pad input + target tokens per second, median over the timed calls; '
                      'ours: packed pipeline batches; HF: the same examples, 8 a batch, padded '
                      'per batch to the longest row (DataCollatorForSeq2Seq)',
            'variants': {}}
  for name, info in infos.items():
    times, tokens = [r['step_s'] for r in replies[name]], [r['tokens'] for r in replies[name]]
    result['variants'][name] = dict(
        tokens_per_s=statistics.median(n / t for n, t in zip(tokens, times)),
        tokens_per_s_all_calls=sum(tokens) / sum(times), call_s=times, tokens_per_call=tokens,
        batches_per_call=1 if name == 'ours_packed' else per_call,
        efficiency=info['efficiency'], examples_per_batch=info['data']['examples_per_batch'],
        truncated_examples=info['data']['truncated_examples'],
        distinct_shapes=info['distinct_shapes'], compile=info.get('compile', 'XLA, ahead of time'),
        **{k: info[k] for k in ('compile_s', 'first_step_s', 'warmup_s', 'dynamo_unique_graphs',
                                'loss') if k in info})
    if 'collator' in info['data']:
      result['variants'][name]['collator'] = info['data']['collator']
  figure = {name: v['tokens_per_s'] for name, v in result['variants'].items()}
  best = max(LONGEST, key=figure.get)
  result.update(
      ours_tokens_per_s=figure['ours_packed'], hf_best_padded_to_longest=best,
      hf_padded_to_longest_tokens_per_s=figure[best],
      ours_over_hf_padded_to_longest=figure['ours_packed'] / figure[best],
      versions={k: v for info in infos.values() for k, v in info['versions'].items()})
  if steps is not None:  # the case's step table: both steps at [8, 256/64]
    packed = statistics.mean(infos['ours_packed']['tokens_per_batch'])
    rows = statistics.mean(infos[LONGEST[0]]['tokens_per_batch'])  # same rows, any padding
    hf = max(('hf_compiled', 'hf_eager'), key=lambda n: steps[n]['steps_per_s'])
    ours, theirs = packed * steps['ours']['steps_per_s'], rows * steps[hf]['steps_per_s']
    result['padded_to_full_length'] = {
        'method': 'steps/s of the step table at [8, 256/64] (timed on synthetic ids: the time '
                  'depends on the shapes only) x the mean non-pad tokens of the same batches '
                  'packed (ours) or one example per row padded to 256/64 (HF)',
        'ours_tokens_per_s': ours, 'hf_tokens_per_s': theirs, 'hf': hf,
        'ours_over_hf': ours / theirs, 'hf_efficiency': rows / (BATCH * sum(LENGTHS.values()))}
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
                           '(avx512_bf16 / amx_bf16), else small_fp32,tiny_fp32; none: no step '
                           'table')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per variant')
  parser.add_argument('--discard', type=int, default=3, help='steps discarded after compiling')
  parser.add_argument('--token_batches', type=int, default=16,
                      help='builtin-mixture batches each useful-tokens worker cycles through')
  parser.add_argument('--longest_per_call', type=int, default=3,
                      help='HF padded-to-longest batches per timed call (they are small)')
  parser.add_argument('--bucket', type=int, default=None,
                      help='pad_to_multiple_of of hf_longest_compile_per_bucket (default 16; '
                           'a worker without it pads to the longest row exactly)')
  parser.add_argument('--useful_case', default=None,
                      help='case of the useful-tokens figures (default: small_fp32 when run, '
                           'else the first case; none: skip them)')
  parser.add_argument('--decoder_only', default='135m',
                      choices=sorted(decoder_only.SIZES) + ['none'],
                      help='size of the decoder-only row (135m: SmolLM-135M\'s shape)')
  parser.add_argument('--decoder_steps', type=int, default=DECODER_STEPS,
                      help='timed steps per variant of the decoder-only row')
  parser.add_argument('--decoder_discard', type=int, default=DECODER_DISCARD,
                      help='steps discarded after compiling, decoder-only row')
  parser.add_argument('--quick', action='store_true', help='tiny case, 2 timed steps')
  parser.add_argument('--worker', choices=('jax', 'torch'))
  parser.add_argument('--case', choices=sorted(CASES) + sorted(decoder_only.TRAIN_CASES))
  parser.add_argument('--hf_dir', help='worker of a decoder-only case: the weights')
  parser.add_argument('--compile', action='store_true')
  parser.add_argument('--dynamic', action='store_true', help='torch.compile(dynamic=True)')
  parser.add_argument('--data', default='synthetic',
                      choices=('synthetic', 'packed', 'longest'))
  parser.add_argument('--batches', type=int, default=1)
  parser.add_argument('--per_call', type=int, default=1)
  parser.add_argument('--torch_threads', type=int, default=0, help='0: torch\'s default')
  args = parser.parse_args()
  if args.worker:
    out = os.fdopen(os.dup(1), 'w')  # replies; whatever libraries print goes to stderr
    os.dup2(2, 1)
    if args.worker == 'jax':
      jax_worker(out, args.case, args.discard, args.data, args.batches, args.hf_dir)
    else:
      torch_worker(out, args.case, args.compile, args.discard, args.torch_threads, args.data,
                   args.batches, args.per_call, args.dynamic, args.bucket or 0, args.hf_dir)
    return
  if args.quick:
    args.cases, args.steps, args.token_batches, args.longest_per_call = 'tiny_fp32', 2, 4, 2
    if args.decoder_only != 'none':
      args.decoder_only, args.decoder_steps, args.decoder_discard = 'tiny', 2, 1
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
  cases = [] if args.cases == 'none' else args.cases.split(',')
  result = {'benchmark': 'train_step', 'batch': BATCH, 'feature_lengths': LENGTHS,
            'optimizer': 'AdamW on both sides (ours: optax via OptimizerConfig(name="adamw"); '
                         'HF: torch.optim.AdamW, fused when available)',
            'flops': "XLA cost_analysis()['flops'] of our compiled step (forward, backward, "
                     'AdamW); HF figures use the same count (same model math)',
            'bf16': 'ours: activations bfloat16, params fp32; HF: torch.autocast(cpu, '
                    'bfloat16) around forward + loss, params and AdamW fp32',
            'tokens_per_s': 'batch x (inputs + targets) positions per second, all real tokens '
                            'in the synthetic batch',
            'timing': f'own process per variant, single calls interleaved, median of '
                      f'{args.steps} rounds, {args.discard} steps discarded '
                      f'after compiling (padded-to-longest: every batch once)',
            'machine': info, 'cases': {}, 'skipped_cases': skipped}
  if (result['machine']['cpu_busy_at_start'] or 0) > 0.1:
    result['warning'] = ('CPUs busy at start: torch\'s OpenMP threads slow down sharply when '
                         'another process takes a core, jax much less; figures are not a result')
  versions = {}
  for case in cases:
    result['cases'][case], case_versions = measure_case(case, args.steps, args.discard,
                                                        args.torch_threads)
    versions.update(case_versions)
  if args.decoder_only != 'none':
    result['decoder_only'], case_versions = measure_decoder_only(
        args.decoder_only, args.decoder_steps, args.decoder_discard, args.torch_threads)
    versions.update(case_versions)
  # Each worker times the matmul once, and one slow moment of this shared host can halve it
  # (a fraction above 1 then): the fractions divide by the best rate of the whole run.
  frameworks = (('jax', ['ours']), ('torch', ['hf_eager', 'hf_compiled']))
  step_tables = list(result['cases'].values()) + (
      [result['decoder_only']] if 'decoder_only' in result else [])
  result['matmul_gflops'] = {
      fw: max((c[n]['matmul_gflops'] for c in step_tables for n in ns), default=None)
      for fw, ns in frameworks}
  for c in step_tables:
    for fw, ns in frameworks:
      for n in ns:
        c[n]['flop_fraction_of_matmul'] = (c['flops_per_step'] * c[n]['steps_per_s']
                                           / (result['matmul_gflops'][fw] * 1e9))
  result['targets'] = {'ours_over_hf_compiled_steps_per_s': 1.1,
                       'useful_tokens_ours_over_hf_padded_to_longest': 2.0}
  if 'small_fp32' in cases:
    small = result['cases']['small_fp32']['ours_over_hf_compiled']
    result['targets']['small_fp32_met'] = small >= 1.1
  useful_case = args.useful_case or ('small_fp32' if 'small_fp32' in cases or not cases
                                     else cases[0])
  if useful_case != 'none':
    useful = measure_useful(useful_case, args.steps, args.discard, args.torch_threads,
                            args.token_batches, args.longest_per_call, args.bucket or 16,
                            result['cases'].get(useful_case))
    result['useful_tokens'] = useful
    result['targets']['useful_tokens_met'] = useful['ours_over_hf_padded_to_longest'] >= 2.0
    versions.update(useful.pop('versions'))
  result['versions'] = versions
  result['machine'].update(cpu_busy_at_end=cpu_busy(), load_average_at_end=os.getloadavg()[0])
  result['wall_s'] = time.perf_counter() - start
  print(json.dumps(_rounded(result)))


if __name__ == '__main__':
  main()
