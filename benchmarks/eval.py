"""Evaluation speed: length-bucketed eval against the fixed-length path and HF `generate`.

Prints one JSON line: eval examples/s on the validation splits of the shared real mixture
(gin_configs/mixtures/real_example.gin on ../shared/data: SST-2 with options, Multi30k
en->de and en->fr, XSum), flan-t5-small shapes with random weights, inputs cut at 512
tokens, greedy decoding capped at `--decode_cap` new tokens (random weights rarely emit EOS:
nearly every row decodes the whole cap, on every path), `--batch_size` examples a batch.
Each task's first `--max_examples` are timed (a subsample, in the JSON); the headline
`*_examples_per_s` is the whole validation splits' rate: each task's seconds per example
times its split size (872, 1014, 1014, 100: XSum is 3% of the eval, not a quarter), summed;
`*_subsample_examples_per_s` is the subsample's own rate. One eval = every task's
predictions, plus SST-2's rank classification (the log-likelihood of each option):

  a_buckets  `evaluation.Evaluator` as issue 19 left it: examples sorted by input length into
             padded lengths 64, 128, 256, 512 (order restored), decoding stops when every row
             has ended, each input encoded once for all its options (`Model.score_options`).
  b_fixed    the Evaluator's reference path, as before issue 19: `EvalConfig(length_buckets=
             False, encode_once=False)`: every input padded to 512 and option to the cap
             (T5X's fixed lengths), each (input, option) pair scored as its own example.
  c_hf       transformers `generate(num_beams=1, do_sample=False, max_new_tokens=cap)` in
             eval mode, `torch.inference_mode()`, `torch.set_flush_denormal(True)`, the same
             batches of the same examples in example order, each padded to its longest input
             (attention mask); the options scored as HF users do (lm-eval-harness style): one
             forward with `labels` per (input, option) pair, batches padded to the longest.

The same weights everywhere: the parent builds the model in torch (fan-in init, as
benchmarks/decode.py), saves it, our workers read it through `t5x_lite.hf.load`. Same token
ids everywhere (our tokenizer and rendering, EOS appended). Each path runs in its own
process; all are set up one after the other, each warming up untimed (`*_first_call_s`:
a_buckets runs the whole eval once, which compiles every bucket's shapes; b_fixed and c_hf
one batch a task, all the shapes they have), then the timed calls alternate, A B C, C B A,
... (`--reps`), median. Reported: examples/s (whole eval; `*_generate_examples_per_s`:
predictions alone), a/b and a/c (targets: >= 3 and >= 2), whether a's and b's predictions
and rank choices are identical (and a's agreement with HF's: fp rounding can flip the
near-ties of random weights).

Decoder-only row (`decoder_only` in the JSON; benchmarks/_eval_decoder.py, which says it all):
the same three paths, processes, warm-ups, interleaving and medians for a small Llama model
(the decoder demo's shape, random weights written once as a HF directory by
`t5x_lite.hf_causal.save`, read by `hf_causal.load` and `AutoModelForCausalLM`) on the built-in
tasks' validation splits (byte vocabulary, the first `--decoder_max_examples` of each of the
10 tasks), greedy to each task's decode length; c_hf is `generate` with the prompts LEFT-padded
to each batch's longest. Runs without ../shared/data; `--decoder_only none` leaves it out.

  python benchmarks/eval.py [--max_examples 16] [--batch_size 8] [--decode_cap 32] [--reps 1]
                            [--decoder_only demo|none] [--decoder_max_examples 16]
  python benchmarks/eval.py --quick     # one batch of 4 a task, cap 8: checks it all runs
  python benchmarks/eval.py --paths a_buckets,c_hf   # a subset (no ratios without both)
  python benchmarks/eval.py --torch_threads 1   # HF on one thread (a busy host: see --help)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):
  if path not in sys.path:
    sys.path.insert(0, path)

from _train_step_workers import hf_model, serve  # noqa: E402
from train_step import PAUSE_S, Worker, _rounded, cpu_busy, machine  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data')
INPUT_LENGTH = 512
PATHS = {'a_buckets': ['--worker', 'jax'], 'b_fixed': ['--worker', 'jax', '--fixed'],
         'c_hf': ['--worker', 'torch']}


def _examples(args):
  """(mixture, vocab, {task: rendered examples}, {task: validation size}): each task's first
  `--max_examples`, rendered as the Evaluator renders them (the task's eval randomness)."""
  from t5x_lite import config
  from t5x_lite.data import pipeline, vocab as vocab_lib
  config.parse_gin(['gin_configs/mixtures/real_example.gin'], [f'DATA_DIR="{args.data_dir}"'])
  mixture = config.mixture_name_or_object()
  vocab = vocab_lib.SentencePieceVocabulary(os.path.join(args.data_dir, 't5_spiece',
                                                         'spiece.model'))
  fits = pipeline.InputFits(vocab, INPUT_LENGTH)
  out = {t.name: [t.render('validation', i, t.eval_rng(i), fits=fits)
                  for i in range(min(args.max_examples, t.num_examples('validation')))]
         for t in mixture.tasks}
  return mixture, vocab, out, {t.name: t.num_examples('validation') for t in mixture.tasks}


def jax_worker(args):
  import jax
  import numpy as np
  from t5x_lite import evaluation, hf, models, partitioning
  mixture, vocab, examples, _ = _examples(args)
  model_config, params = hf.load(args.hf_dir)
  mesh = partitioning.make_mesh({'data': -1})
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  evaluator = evaluation.Evaluator(
      models.build(model_config), mixture, vocab, evaluation.EvalConfig(
          {'inputs': INPUT_LENGTH, 'targets': args.decode_cap}, args.batch_size, 'validation',
          max(map(len, examples.values())), length_buckets=not args.fixed,
          encode_once=not args.fixed),
      mesh, jax.tree.map(lambda _: replicated, params), partitioning.rules_for('dp'))
  for task in evaluator.tasks:  # the benchmark's examples are the evaluator's
    evaluator.examples[task.name] = evaluator.examples[task.name][:len(examples[task.name])]
    assert [e['inputs'] for e in evaluator.examples[task.name]] == [
        e['inputs'] for e in examples[task.name]], task.name
  out, full = {}, dict(evaluator.examples)

  def run(warm=False):
    """The eval; `warm`: the first batch of each task only (every shape of the fixed path)."""
    evaluator.examples = {k: v[:args.batch_size] for k, v in full.items()} if warm else full
    times = {'generate_s': 0.0, 'rank_s': 0.0}
    for task in evaluator.tasks:
      start = time.perf_counter()
      out[task.name] = evaluator.predict(params, task)
      times['generate_s'] += time.perf_counter() - start
      times[f'task/{task.name}'] = time.perf_counter() - start
      if task.options:
        start = time.perf_counter()
        scores = evaluator.rank_scores(params, task)
        out[f'{task.name}/rank'] = [int(np.argmax(s)) for s in scores]
        out[f'{task.name}/scores'] = np.concatenate(scores).tolist()
        times['rank_s'] += time.perf_counter() - start
        times[f'task/{task.name}'] += time.perf_counter() - start
    return times

  start = time.perf_counter()
  run(warm=args.fixed)  # the buckets' shapes need the whole eval once; the fixed path one batch
  info = {'first_call_s': time.perf_counter() - start,
          'warm_up': 'one batch a task' if args.fixed else 'the whole eval',
          'versions': {'jax': jax.__version__}}
  serve(sys.stdout, info, {'eval': run, 'outputs': lambda: {'outputs': out}})


def torch_worker(args):
  import numpy as np
  import torch
  import transformers
  from t5x_lite.data import pipeline
  flush = torch.set_flush_denormal(True)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  _, vocab, examples, _ = _examples(args)
  model = transformers.T5ForConditionalGeneration.from_pretrained(args.hf_dir).eval()
  ids = lambda text, length: pipeline.tokenize(vocab, text, length, 'truncate', '')[0].tolist()

  def padded(rows, pad=0):
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])

  batches = {}
  for name, task_examples in examples.items():
    inputs = [ids(e['inputs'], INPUT_LENGTH) for e in task_examples]
    batches[name] = [padded(inputs[i:i + args.batch_size])
                     for i in range(0, len(inputs), args.batch_size)]
    if task_examples[0].get('options'):
      pairs = [(x, ids(o, args.decode_cap)) for x, e in zip(inputs, task_examples)
               for o in e['options']]
      batches[f'{name}/pairs'] = [
          (padded([x for x, _ in pairs[i:i + args.batch_size]]),
           padded([o for _, o in pairs[i:i + args.batch_size]], pad=-100))
          for i in range(0, len(pairs), args.batch_size)]
  out = {}

  def run(warm=False):
    """The eval; `warm`: one batch of each task."""
    times = {'generate_s': 0.0, 'rank_s': 0.0}
    with torch.inference_mode():
      for name, task_examples in examples.items():
        start = time.perf_counter()
        predictions = []
        for tokens in batches[name][:1 if warm else None]:
          generated = model.generate(input_ids=tokens, attention_mask=(tokens != 0).long(),
                                     num_beams=1, do_sample=False, use_cache=True,
                                     max_new_tokens=args.decode_cap)
          predictions += [vocab.decode(row[1:].numpy()) for row in generated]
        out[name] = predictions
        times['generate_s'] += time.perf_counter() - start
        times[f'task/{name}'] = time.perf_counter() - start
        if f'{name}/pairs' in batches:
          start = time.perf_counter()
          scores = []
          for tokens, labels in batches[f'{name}/pairs'][:1 if warm else None]:
            logits = model(input_ids=tokens, attention_mask=(tokens != 0).long(),
                           labels=labels, use_cache=False).logits
            logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            scores += (logp * (labels >= 0)).sum(-1).tolist()
          if not warm:
            counts = np.cumsum([len(e['options']) for e in task_examples])[:-1]
            out[f'{name}/rank'] = [int(np.argmax(s))
                                   for s in np.split(np.array(scores), counts)]
          times['rank_s'] += time.perf_counter() - start
          times[f'task/{name}'] += time.perf_counter() - start
    return times

  start = time.perf_counter()
  run(warm=True)
  info = {'first_call_s': time.perf_counter() - start, 'warm_up': 'one batch a task',
          'flush_denormal': flush,
          'threads': torch.get_num_threads(),
          'versions': {'torch': torch.__version__, 'transformers': transformers.__version__}}
  serve(sys.stdout, info, {'eval': run, 'outputs': lambda: {'outputs': out}})


def measure(args, hf_dir):
  paths = {name: PATHS[name] for name in args.paths.split(',')}
  workers, calls, outputs = {}, {name: [] for name in paths}, {}
  common = ['--hf_dir', hf_dir, '--data_dir', args.data_dir, '--max_examples',
            str(args.max_examples),
            '--batch_size', str(args.batch_size), '--decode_cap', str(args.decode_cap),
            '--torch_threads', str(args.torch_threads)]
  try:
    for name, argv in paths.items():  # one at a time: a compile never overlaps a timed call
      print(f'[eval] starting {name}', file=sys.stderr, flush=True)
      workers[name] = Worker(f'eval/{name}', argv + common, script=__file__)
      print(f'[eval] {name} first call {workers[name].info["first_call_s"]:.1f}s',
            file=sys.stderr, flush=True)
    order = list(workers)
    for i in range(args.reps):
      for name in (order if i % 2 == 0 else order[::-1]):
        time.sleep(PAUSE_S)
        calls[name].append(workers[name].call('eval'))
      print(f'[eval] rep {i + 1}/{args.reps} ' + ' '.join(
          f'{name} {c[-1]["step_s"]:.1f}s' for name, c in calls.items()),
            file=sys.stderr, flush=True)
    outputs = {name: w.call('outputs')['outputs'] for name, w in workers.items()}
  finally:
    for w in workers.values():
      w.close()
  return calls, outputs, {name: w.info for name, w in workers.items()}


def _agreement(x, y, suffix):
  pairs = [(p, q) for k in y if k.endswith(suffix) for p, q in zip(x[k], y[k])]
  return sum(p == q for p, q in pairs) / len(pairs) if pairs else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--max_examples', type=int, default=16, help='per task: its first N')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--decode_cap', type=int, default=32, help='max new tokens (greedy)')
  parser.add_argument('--reps', type=int, default=1)
  parser.add_argument('--quick', action='store_true', help='one batch of 4 a task, cap 8')
  parser.add_argument('--data_dir', default=DATA)
  parser.add_argument('--torch_threads', type=int, default=0,
                      help="HF's threads (default: torch's, one per core). On a busy host 1 "
                           'can be far faster: two OpenMP threads spin against other loads')
  parser.add_argument('--paths', default=','.join(PATHS), help='a subset, comma-separated')
  parser.add_argument('--decoder_only', default='demo', choices=('demo', 'none'),
                      help="the decoder-only row (benchmarks/_eval_decoder.py)")
  parser.add_argument('--decoder_max_examples', type=int, default=16,
                      help="decoder-only row: each built-in task's first N")
  parser.add_argument('--worker', choices=('jax', 'torch'))
  parser.add_argument('--fixed', action='store_true', help='jax: EvalConfig(length_buckets=False)')
  parser.add_argument('--hf_dir')
  args = parser.parse_args()
  os.chdir(REPO)  # gin_configs/ paths
  if args.quick:
    args.max_examples, args.decode_cap, args.batch_size = 4, 8, 4
    args.decoder_max_examples = 4
  if args.worker:
    (jax_worker if args.worker == 'jax' else torch_worker)(args)
    return
  if not os.path.isdir(args.data_dir):
    result = {'benchmark': 'eval', 'skipped': f'{args.data_dir} not found: this '
              'benchmark reads the shared real data (../shared/data, or --data_dir)'}
    if args.decoder_only != 'none':   # the built-in tasks need no data
      result['decoder_only'] = _decoder_row(args)
    print(json.dumps(_rounded(result)))
    return
  start = time.perf_counter()
  info = machine()
  with tempfile.TemporaryDirectory() as hf_dir:
    model, _ = hf_model('small')
    model.config.use_cache = True  # generate's KV cache (hf_model builds it for training)
    model.eval().save_pretrained(hf_dir)
    del model
    calls, outputs, infos = measure(args, hf_dir)
  paths = list(outputs)
  a = outputs[paths[0]]
  counts = {k: len(v) for k, v in a.items() if '/' not in k}
  examples = sum(counts.values())
  sizes = _examples(args)[3]
  result = {'benchmark': 'eval', 'model': 'flan_t5_small (random weights, fan-in init)',
            'mixture': 'real_example validation', 'validation_sizes': sizes,
            'examples_per_task': counts, 'examples': examples,
            'subsample': f'the first {args.max_examples} examples of each task; '
                         '*_examples_per_s: the whole validation splits, each task timed on '
                         'its subsample and weighted by its split size; '
                         '*_subsample_examples_per_s: the subsample as run',
            'batch_size': args.batch_size, 'input_length': INPUT_LENGTH,
            'decode_cap': args.decode_cap, 'decoding': 'greedy; random weights rarely emit '
            f'EOS, so rows mostly decode all {args.decode_cap} tokens', 'reps': args.reps,
            'timing': 'one call = the whole eval; calls alternate between the processes '
                      '(A B C, C B A, ...), median; each path warmed up untimed first'}
  for name in paths:
    median = lambda key, name=name: statistics.median(r[key] for r in calls[name])
    per_task = {t: median(f'task/{t}') / counts[t] for t in counts}  # s per example
    result[f'{name}_examples_per_s'] = sum(sizes.values()) / sum(
        sizes[t] * per_task[t] for t in counts)
    result[f'{name}_subsample_examples_per_s'] = examples / median('step_s')
    result[f'{name}_generate_examples_per_s'] = examples / median('generate_s')
    result[f'{name}_task_s_per_example'] = per_task
    result[f'{name}_first_call_s'] = infos[name]['first_call_s']
    result[f'{name}_warm_up'] = infos[name]['warm_up']
  ratio = lambda x, y, key='': result[f'{x}{key}_examples_per_s'] / result[f'{y}{key}_examples_per_s']
  if {'a_buckets', 'b_fixed'} <= set(paths):
    b = outputs['b_fixed']
    result.update(
        a_over_b=ratio('a_buckets', 'b_fixed'),
        a_over_b_subsample=ratio('a_buckets', 'b_fixed', '_subsample'),
        a_over_b_generate=ratio('a_buckets', 'b_fixed', '_generate'),
        a_b_predictions_identical=all(a[k] == b[k] for k in a if not k.endswith('/scores')),
        a_b_rank_scores_max_abs_diff=max(
            (max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a if k.endswith('/scores')),
            default=None))
  if {'a_buckets', 'c_hf'} <= set(paths):
    c = outputs['c_hf']
    result.update(
        a_over_c=ratio('a_buckets', 'c_hf'),
        a_over_c_subsample=ratio('a_buckets', 'c_hf', '_subsample'),
        a_over_c_generate=ratio('a_buckets', 'c_hf', '_generate'),
        a_c_predictions_identical_fraction=(
            sum(x == y for k in c if '/' not in k for x, y in zip(a[k], c[k])) / examples),
        a_c_rank_choices_identical_fraction=_agreement(a, c, '/rank'))
  result['targets_met'] = {f'{k} >= {t}': result[k] >= t for k, t in
                           (('a_over_b', 3), ('a_over_c', 2)) if k in result}
  if 'c_hf' in infos:
    result['hf_flush_denormal'] = infos['c_hf']['flush_denormal']
    result['hf_threads'] = infos['c_hf']['threads']
  result['versions'] = {k: v for i in infos.values() for k, v in i['versions'].items()}
  result['machine'] = {**info, 'cpu_busy_at_end': cpu_busy(),
                       'load_average_at_end': os.getloadavg()[0]}
  if args.decoder_only != 'none':
    result['decoder_only'] = _decoder_row(args)
  result['wall_s'] = time.perf_counter() - start
  print(json.dumps(_rounded(result)))


def _decoder_row(args):
  import _eval_decoder  # pylint: disable=import-outside-toplevel
  row_args = argparse.Namespace(**{**vars(args), 'max_examples': args.decoder_max_examples})
  return _eval_decoder.row(row_args, lambda m: print(f'[eval] {m}', file=sys.stderr, flush=True))


if __name__ == '__main__':
  main()
