"""Decoding speed of t5x_lite against Hugging Face `transformers` `generate` on CPU.

Prints one JSON line. Shapes: flan-t5-small, batch 8, 256 input tokens (no padding),
exactly 64 new tokens per input (EOS can never end a row early: our decoders get an EOS id
no token has, HF gets `min_new_tokens=64`). Both sides decode the same random-weight model:
the parent builds it in torch (fan-in init, as benchmarks/train_step.py), saves it with
`save_pretrained`, and our worker reads it through `t5x_lite.hf.load`.

  ours  `decoding.jit`-compiled `decoding.decode` (greedy) and `beam_search.beam_search` (4 beams,
        alpha 0), KV cache, encoder run once; compiled before timing.
  hf    `model.generate(num_beams=1 | 4, length_penalty=0, use_cache=True)` in eval mode
        under `torch.inference_mode()`, `torch.set_flush_denormal(True)`.

Generated tokens/s = batch * 64 / seconds per call (beam: output tokens, not beams * tokens),
median of `--reps` calls after one warm-up call. Each framework runs in its own process, set
up (and compiled) one after the other; then the calls alternate between the two, A B B A ...,
so that both sides see the same machine (this host's speed drifts by 20-30% over minutes).
Also reported: how many of the 8 greedy rows are token-identical between the two (random
weights make near-ties, so a few may differ by fp rounding).

  python benchmarks/decode.py [--reps 3] [--size small]
  python benchmarks/decode.py --quick     # tiny model, 1 rep: checks it all runs
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):
  if path not in sys.path:
    sys.path.insert(0, path)

from _train_step_workers import hf_model, serve  # noqa: E402
from train_step import PAUSE_S, Worker, _rounded, cpu_busy, machine  # noqa: E402

BATCH, INPUT_LENGTH, NEW_TOKENS, BEAMS = 8, 256, 64, 4
MODES = ('greedy', 'beam4')


def _inputs(vocab_size):
  return np.random.default_rng(0).integers(3, vocab_size, (BATCH, INPUT_LENGTH), np.int32)


def jax_worker(hf_dir):
  import jax
  from t5x_lite import beam_search, decoding, hf
  from t5x_lite.models import t5
  config, params = hf.load(hf_dir)
  params = jax.device_put(params)  # once, as `t5x-lite infer` does
  model = t5.Transformer(config)
  tokens = jax.numpy.asarray(_inputs(config.vocab_size))
  no_eos = -1  # no token has this id: every row decodes exactly NEW_TOKENS
  greedy = decoding.jit(lambda p, x: decoding.decode(model, p, x, NEW_TOKENS, eos_id=no_eos)[0])
  beam = decoding.jit(lambda p, x: beam_search.beam_search(model, p, x, NEW_TOKENS, BEAMS, 0.0,
                                                            no_eos)[0][:, 0])
  info, calls = {'versions': {'jax': jax.__version__}}, {}
  for name, fn in (('greedy', greedy), ('beam4', beam)):
    start = time.perf_counter()
    jax.block_until_ready(fn.lower(params, tokens).compile())
    info[f'{name}_compile_s'] = time.perf_counter() - start
    calls[name] = lambda f=fn: jax.block_until_ready(f(params, tokens))
    info[f'{name}_ids'] = np.asarray(calls[name]()).tolist()  # also the warm-up call
  serve(sys.stdout, info, calls)


def torch_worker(hf_dir):
  import torch
  import transformers
  flush = torch.set_flush_denormal(True)
  model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
  tokens = torch.from_numpy(_inputs(model.config.vocab_size)).long()
  info = {'flush_denormal': flush, 'threads': torch.get_num_threads(),
          'versions': {'torch': torch.__version__, 'transformers': transformers.__version__}}
  calls = {}
  for name, beams in (('greedy', 1), ('beam4', BEAMS)):
    def generate(beams=beams):
      with torch.inference_mode():
        return model.generate(
            input_ids=tokens, attention_mask=torch.ones_like(tokens), num_beams=beams,
            do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            length_penalty=0.0, use_cache=True)
    calls[name] = generate
    info[f'{name}_ids'] = generate()[:, 1:].tolist()  # drop the start token; the warm-up call
  serve(sys.stdout, info, calls)


def measure(hf_dir, reps):
  """Seconds per call {framework: {mode: [reps]}}, calls interleaved between frameworks."""
  workers = {}
  try:
    for name in ('ours', 'hf'):  # one at a time: a compile never overlaps a timed call
      print(f'[decode] starting {name}', file=sys.stderr, flush=True)
      workers[name] = Worker(f'decode/{name}', ['--worker', 'jax' if name == 'ours' else 'torch',
                                                 '--hf_dir', hf_dir], script=__file__)
    times = {name: {mode: [] for mode in MODES} for name in workers}
    order = list(workers)
    for i in range(reps):
      for mode in MODES:
        for name in (order if i % 2 == 0 else order[::-1]):
          time.sleep(PAUSE_S)
          times[name][mode].append(workers[name].step(mode))
      print(f'[decode] rep {i + 1}/{reps} ' + ' '.join(
          f'{mode} ours {times["ours"][mode][-1]:.2f}s hf {times["hf"][mode][-1]:.2f}s'
          for mode in MODES), file=sys.stderr, flush=True)
  finally:
    for w in workers.values():
      w.close()
  return times, {name: w.info for name, w in workers.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='small', choices=('tiny', 'small', 'base'))
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--quick', action='store_true', help='tiny model, 1 rep')
  parser.add_argument('--worker', choices=('jax', 'torch'))
  parser.add_argument('--hf_dir')
  args = parser.parse_args()
  if args.worker:
    (jax_worker if args.worker == 'jax' else torch_worker)(args.hf_dir)
    return
  size, reps = ('tiny', 1) if args.quick else (args.size, args.reps)
  info = machine()
  with tempfile.TemporaryDirectory() as hf_dir:
    model, _ = hf_model(size)
    model.config.use_cache = True
    model.eval().save_pretrained(hf_dir)
    del model
    times, infos = measure(hf_dir, reps)
  ours, theirs = infos['ours'], infos['hf']
  generated = BATCH * NEW_TOKENS
  result = {'benchmark': 'decode', 'model': f'flan_t5_{size}', 'batch': BATCH,
            'input_length': INPUT_LENGTH, 'new_tokens': NEW_TOKENS, 'reps': reps,
            'timing': 'calls alternate between the two processes (A B B A ...), median'}
  for name in MODES:
    ours_tps = generated / statistics.median(times['ours'][name])
    hf_tps = generated / statistics.median(times['hf'][name])
    same = sum(a == b for a, b in zip(ours[f'{name}_ids'], theirs[f'{name}_ids']))
    result[name] = {'ours_tokens_per_s': ours_tps, 'hf_tokens_per_s': hf_tps,
                    'ours_over_hf': ours_tps / hf_tps, 'ours_s': times['ours'][name],
                    'hf_s': times['hf'][name], 'ours_compile_s': ours[f'{name}_compile_s'],
                    'rows_identical': f'{same}/{BATCH}'}
  result['hf_flush_denormal'] = theirs['flush_denormal']
  result['hf_threads'] = theirs['threads']
  result['machine'] = {**info, 'cpu_busy_at_end': cpu_busy(),
                       'load_average_at_end': os.getloadavg()[0]}
  result['versions'] = {**ours['versions'], **theirs['versions']}
  print(json.dumps(_rounded(result)))


if __name__ == '__main__':
  main()
