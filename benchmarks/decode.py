"""Decoding speed of t5x_lite against Hugging Face `transformers` `generate` on CPU.

Prints one JSON line. Shapes: flan-t5-small, batch 8, 256 input tokens (no padding),
exactly 64 new tokens per input (EOS can never end a row early: our decoders get an EOS id
no token has, HF gets `min_new_tokens=64`). Both sides decode the same random-weight model:
the parent builds it in torch (fan-in init, as benchmarks/train_step.py), saves it with
`save_pretrained`, and our worker reads it through `t5x_lite.hf.load`.

  ours                `decoding.jit`-compiled `decoding.decode` (greedy) and
                      `beam_search.beam_search` (4 beams, alpha 0), KV cache, encoder run once;
                      compiled before timing.
  hf_dynamic          `model.generate(num_beams=1 | 4, length_penalty=0, use_cache=True)` in
                      eval mode under `torch.inference_mode()`, `torch.set_flush_denormal(True)`:
                      transformers' default DynamicCache, eager.
  hf_static_compiled  the same with `cache_implementation='static'` and the decoder step under
                      torch.compile (transformers' CompileConfig defaults): greedy through
                      generate's own auto-compile (`compile_config`, flagged to compile on CPU),
                      beam4 through `model.forward = torch.compile(model.forward)` (generate
                      never compiles beam search). Two warm-up calls (compile, recompiles). A
                      mode that fails is reported as `hf_static_compiled_error` in the JSON.

Generated tokens/s = batch * 64 / seconds per call (beam: output tokens, not beams * tokens),
median of `--reps` calls after the warm-up. Each setting runs in its own process, set up (and
compiled) one after the other; then the calls alternate between them, A B C, C B A, ..., so
that all see the same machine (this host's speed drifts by 20-30% over minutes). Per mode,
`ours_over_hf` divides by the faster of HF's two settings in the run, named in `hf_best`
(`hf_tokens_per_s` is its figure). Also reported: how many of the 8 rows are token-identical
between ours and each HF setting (random weights make near-ties, so a few may differ by fp
rounding).

Decoder-only row (`decoder_only` in the JSON; `--decoder_only 135m`, the default): greedy
decoding of 8 random 256-token prompts (no padding), 64 new tokens each, by our decoder-only
model and transformers' LlamaForCausalLM at SmolLM-135M's shape (benchmarks/
_decoder_only_case.py), both from the same random weights (a HF directory written by
hf_causal.save; ours reads it with hf_causal.load). Ours: `decoding.decode` under
`decoding.jit` (`init_decode` prefills the prompts in one pass into a KV cache of 256 + 64
slots, then one token a step); HF: `generate` on AutoModelForCausalLM in the two settings
above (its greedy path: the static cache with transformers' auto-compile). Same processes
per setting, interleaving, `--reps` and medians as the flan-t5 rows, run after them; no
config has an EOS id, so every row decodes 64 tokens on both sides. `ours_over_hf` (under
`decoder_only.greedy`) divides by HF's faster setting, named in `hf_best`.

  python benchmarks/decode.py [--reps 3] [--size small] [--decoder_only 135m|tiny|none]
  python benchmarks/decode.py --quick     # tiny models, 1 rep: checks it all runs
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

import _decoder_only_case as decoder_only  # noqa: E402
from _train_step_workers import hf_model, serve  # noqa: E402
from train_step import PAUSE_S, Worker, _rounded, cpu_busy, machine  # noqa: E402

BATCH, INPUT_LENGTH, NEW_TOKENS, BEAMS = 8, 256, 64, 4
MODES = ('greedy', 'beam4')


def _inputs(vocab_size):
  return np.random.default_rng(0).integers(3, vocab_size, (BATCH, INPUT_LENGTH), np.int32)


def jax_worker(hf_dir, family='t5'):
  """Ours: greedy and beam4 of flan-t5 (`family` 't5', read by `hf.load`), or greedy of the
  decoder-only model ('decoder_only', `hf_causal.load`: the prompts prefilled by `init_decode`,
  then one token a step)."""
  import jax
  from t5x_lite import decoding, hf, hf_causal, models
  from t5x_lite.decoding import beam_search
  if family == 'decoder_only':
    config, params = hf_causal.load(hf_dir)
    inputs = decoder_only.prompts(config.vocab_size, INPUT_LENGTH)
  else:
    config, params = hf.load(hf_dir)
    inputs = _inputs(config.vocab_size)
  params = jax.device_put(params)  # once, as `t5x-lite infer` does
  model = models.build(config)
  tokens = jax.numpy.asarray(inputs)
  no_eos = -1  # no token has this id: every row decodes exactly NEW_TOKENS
  greedy = decoding.jit(lambda p, x: decoding.decode(model, p, x, NEW_TOKENS, eos_id=no_eos)[0])
  beam = decoding.jit(lambda p, x: beam_search.beam_search(model, p, x, NEW_TOKENS, BEAMS, 0.0,
                                                            no_eos)[0][:, 0])
  info, calls = {'versions': {'jax': jax.__version__}}, {}
  fns = (('greedy', greedy),) if family == 'decoder_only' else (('greedy', greedy),
                                                                ('beam4', beam))
  for name, fn in fns:
    start = time.perf_counter()
    jax.block_until_ready(fn.lower(params, tokens).compile())
    info[f'{name}_compile_s'] = time.perf_counter() - start
    calls[name] = lambda f=fn: jax.block_until_ready(f(params, tokens))
    info[f'{name}_ids'] = np.asarray(calls[name]()).tolist()  # also the warm-up call
  serve(sys.stdout, info, calls)


def torch_worker(hf_dir, static=False, family='t5'):
  """HF `generate` of T5ForConditionalGeneration (`family` 't5': greedy and beam4) or of
  AutoModelForCausalLM ('decoder_only': greedy; the new tokens follow the prompt in its
  output): the default dynamic cache, eager; or (`static`) a static cache with the
  decoder step compiled. Greedy then takes transformers' own path: `cache_implementation=
  'static'` plus a `CompileConfig` (transformers' defaults) flagged `_compile_all_devices`
  (its `_valid_auto_compile_criteria` compiles by itself only on cuda/xpu/neuron/tpu). Beam
  search never auto-compiles in 5.24 (`_beam_search` calls `self(...)`), so beam4 compiles
  `model.forward` with the same config, as transformers' docs do for static caches. A mode
  whose first call fails is left out and its error reported."""
  import torch
  import transformers
  flush = torch.set_flush_denormal(True)
  if family == 'decoder_only':
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    inputs = decoder_only.prompts(model.config.vocab_size, INPUT_LENGTH)
    modes, skip = (('greedy', 1),), INPUT_LENGTH   # output: the prompt, then the new tokens
  else:
    model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    inputs = _inputs(model.config.vocab_size)
    modes, skip = (('greedy', 1), ('beam4', BEAMS)), 1   # output: the start token, then new
  tokens = torch.from_numpy(inputs).long()
  info = {'flush_denormal': flush, 'threads': torch.get_num_threads(),
          'versions': {'torch': torch.__version__, 'transformers': transformers.__version__},
          'cache': 'static' if static else 'dynamic', 'errors': {}}
  if static:
    compile_config = transformers.CompileConfig()
    compile_config._compile_all_devices = True  # pylint: disable=protected-access
    info['compile_config'] = compile_config.to_dict()
  calls = {}
  for name, beams in modes:
    options, compiled_forward = {}, None
    if static:
      options['cache_implementation'] = 'static'
      if beams == 1:
        options['compile_config'] = compile_config
      else:
        compiled_forward = torch.compile(model.forward, **compile_config.to_dict())

    def generate(beams=beams, options=options, step=compiled_forward):
      if step is not None:
        model.forward = step
      try:
        with torch.inference_mode():
          return model.generate(
              input_ids=tokens, attention_mask=torch.ones_like(tokens), num_beams=beams,
              do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
              length_penalty=0.0, use_cache=True, **options)
      finally:
        model.__dict__.pop('forward', None)  # back to the class's forward
    try:
      start = time.perf_counter()
      info[f'{name}_ids'] = generate()[:, skip:].tolist()  # the new tokens; the warm-up
      info[f'{name}_first_call_s'] = time.perf_counter() - start
      if static:
        generate()  # a compiled step may recompile once (e.g. on the second cache position)
        from torch._dynamo.utils import counters  # graphs so far: 0 would mean never compiled
        info[f'{name}_dynamo_graphs_total'] = counters['stats'].get('unique_graphs', 0)
    except Exception as e:  # pylint: disable=broad-except
      info['errors'][name] = f'{type(e).__name__}: {e}'[:2000]
      continue
    calls[name] = generate
  serve(sys.stdout, info, calls)


HF_VARIANTS = {'hf_dynamic': ['--worker', 'torch'],
               'hf_static_compiled': ['--worker', 'torch', '--static']}


def measure(hf_dir, reps, family='t5'):
  """Seconds per call {worker: {mode: [reps]}}, calls interleaved between the workers
  (A B C, then C B A, ...); the modes a worker could not run are absent from its info's calls."""
  workers = {}
  try:
    variants = {'ours': ['--worker', 'jax'], **HF_VARIANTS}
    for name, argv in variants.items():  # one at a time: a compile never overlaps a timed call
      print(f'[decode] {family}: starting {name}', file=sys.stderr, flush=True)
      workers[name] = Worker(f'decode/{family}/{name}',
                             argv + ['--hf_dir', hf_dir, '--family', family], script=__file__)
    times = {name: {mode: [] for mode in MODES if f'{mode}_ids' in w.info}
             for name, w in workers.items()}
    order = list(workers)
    for i in range(reps):
      for mode in MODES:
        for name in (order if i % 2 == 0 else order[::-1]):
          if mode in times[name]:
            time.sleep(PAUSE_S)
            times[name][mode].append(workers[name].step(mode))
      print(f'[decode] {family}: rep {i + 1}/{reps} ' + ' '.join(
          f'{mode} {name} {t[mode][-1]:.2f}s' for mode in MODES for name, t in times.items()
          if mode in t), file=sys.stderr, flush=True)
  finally:
    for w in workers.values():
      w.close()
  return times, {name: w.info for name, w in workers.items()}


def summarize(name, times, infos):
  """One mode's figures: ours, each HF setting that ran, and the ratio to the faster one."""
  generated = BATCH * NEW_TOKENS
  ours = infos['ours']
  ours_tps = generated / statistics.median(times['ours'][name])
  r = {'ours_tokens_per_s': ours_tps, 'ours_s': times['ours'][name],
       'ours_compile_s': ours[f'{name}_compile_s']}
  for hf in HF_VARIANTS:
    if name in times[hf]:
      same = sum(a == b for a, b in zip(ours[f'{name}_ids'], infos[hf][f'{name}_ids']))
      r[f'{hf}_tokens_per_s'] = generated / statistics.median(times[hf][name])
      r[f'{hf}_s'] = times[hf][name]
      r[f'{hf}_first_call_s'] = infos[hf][f'{name}_first_call_s']
      r[f'{hf}_rows_identical'] = f'{same}/{BATCH}'
      if f'{name}_dynamo_graphs_total' in infos[hf]:
        r[f'{hf}_dynamo_graphs_total'] = infos[hf][f'{name}_dynamo_graphs_total']
    else:
      r[f'{hf}_error'] = infos[hf]['errors'][name]
  ran = [hf for hf in HF_VARIANTS if name in times[hf]]
  if not ran:
    raise RuntimeError(f'HF could not run {name}: {r}')
  best = max(ran, key=lambda hf: r[f'{hf}_tokens_per_s'])
  # The ratio's denominator: the faster of HF's two settings in this run.
  r.update(hf_best=best, hf_tokens_per_s=r[f'{best}_tokens_per_s'],
           ours_over_hf=ours_tps / r[f'{best}_tokens_per_s'],
           rows_identical=r[f'{best}_rows_identical'])
  return r


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='small', choices=('tiny', 'small', 'base'))
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--quick', action='store_true', help='tiny model, 1 rep')
  parser.add_argument('--worker', choices=('jax', 'torch'))
  parser.add_argument('--static', action='store_true', help='HF: static cache + torch.compile')
  parser.add_argument('--decoder_only', default='135m',
                      choices=sorted(decoder_only.SIZES) + ['none'],
                      help='size of the decoder-only greedy row (135m: SmolLM-135M\'s shape; '
                           '--quick: tiny)')
  parser.add_argument('--hf_dir')
  parser.add_argument('--family', default='t5', choices=('t5', 'decoder_only'))
  args = parser.parse_args()
  if args.worker:
    if args.worker == 'jax':
      jax_worker(args.hf_dir, args.family)
    else:
      torch_worker(args.hf_dir, args.static, args.family)
    return
  size, reps = ('tiny', 1) if args.quick else (args.size, args.reps)
  decoder_size = 'tiny' if args.quick and args.decoder_only != 'none' else args.decoder_only
  start = time.perf_counter()
  info = machine()
  with tempfile.TemporaryDirectory() as hf_dir:
    model, _ = hf_model(size)
    model.config.use_cache = True
    model.eval().save_pretrained(hf_dir)
    del model
    times, infos = measure(hf_dir, reps)
  ours = infos['ours']
  result = {'benchmark': 'decode', 'model': f'flan_t5_{size}', 'batch': BATCH,
            'input_length': INPUT_LENGTH, 'new_tokens': NEW_TOKENS, 'reps': reps,
            'timing': 'calls alternate between the three processes (A B C, C B A, ...), median',
            'hf_variants': {
                'hf_dynamic': 'generate(use_cache=True): DynamicCache, eager',
                'hf_static_compiled': "generate(cache_implementation='static'): greedy with "
                                      'compile_config=CompileConfig() (_compile_all_devices, '
                                      "transformers' auto-compile of the decode step); beam4 "
                                      'with model.forward = torch.compile(model.forward, '
                                      'CompileConfig defaults): generate never compiles beam '
                                      'search'}}
  for name in MODES:
    result[name] = summarize(name, times, infos)
  if decoder_size != 'none':
    with tempfile.TemporaryDirectory() as hf_dir:
      decoder_only.write_hf_dir(decoder_size, hf_dir)
      d_times, d_infos = measure(hf_dir, reps, 'decoder_only')
    result['decoder_only'] = {
        'name': decoder_only.NAMES[decoder_size], 'model': decoder_only.describe(decoder_size),
        'batch': BATCH,
        'prompt_length': INPUT_LENGTH, 'new_tokens': NEW_TOKENS, 'reps': reps,
        'method': 'greedy; ours: decoding.decode (prefill by init_decode, KV cache of prompt + '
                  '64 slots); HF: AutoModelForCausalLM.generate, same settings as above',
        'greedy': summarize('greedy', d_times, d_infos)}
  theirs = infos['hf_dynamic']
  result['hf_flush_denormal'] = theirs['flush_denormal']
  result['hf_threads'] = theirs['threads']
  result['hf_compile_config'] = infos['hf_static_compiled'].get('compile_config')
  result['machine'] = {**info, 'cpu_busy_at_end': cpu_busy(),
                       'load_average_at_end': os.getloadavg()[0]}
  result['versions'] = {**ours['versions'], **theirs['versions']}
  result['wall_s'] = time.perf_counter() - start
  print(json.dumps(_rounded(result)))


if __name__ == '__main__':
  main()
