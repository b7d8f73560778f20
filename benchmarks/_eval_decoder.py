"""The decoder-only row of benchmarks/eval.py: the same three paths as its T5 row, for a small
Llama model (the decoder demo's shape, gin_configs/runs/demo_decoder_cpu.gin: hidden 128, 4
layers, 4 heads x 32, 2 kv heads, MLP 384, the byte vocabulary's 384 ids, tied embeddings),
random weights (benchmarks/_decoder_only_case.random_params: our init, in numpy) written once
by `t5x_lite.hf_causal.save`, on the built-in mixture's validation splits (10 tasks of 200
examples; the first `max_examples` of each timed), byte vocabulary, prompts as
`DecoderOnlyFeatureConverter()` makes them (start id, inputs, EOS; no chat template), inputs
cut at 256 bytes, greedy decoding of each task's decode length (`Evaluator.decode_length`: its
longest target + EOS, at most `decode_cap`), plus rank classification of the two options tasks
(sentiment, compare):

  a_buckets  `Evaluator(EvalConfig(length_buckets=True, encode_once=True))` on the
             decoder-only model (`hf_causal.load`): prompts sorted by length into padded
             lengths 16 ... 256, right-padded with `inputs_mask`, decoding stops when every
             row has ended, each prompt read once for all its options.
  b_fixed    `EvalConfig(length_buckets=False, encode_once=False)`: every prompt padded to 256
             and option to the cap, each (prompt, option) pair scored as its own example.
  c_hf       `AutoModelForCausalLM.from_pretrained` (LlamaForCausalLM, eval mode,
             `torch.inference_mode()`, flush_denormal), `generate(num_beams=1, do_sample=False,
             max_new_tokens=<the task's decode length>, eos_token_id=EOS, pad_token_id=PAD)` on
             the same batches of the same prompt ids in example order, LEFT-padded to the
             batch's longest prompt (attention mask), as HF's docs say for decoder-only batched
             generation; options scored HF-style: one forward per batch of (prompt + option)
             sequences, right-padded to the longest, summing the option tokens' log-probs.

Workers are processes of this file (`--worker jax [--fixed] | torch`); benchmarks/eval.py's
`measure` starts them and interleaves A B C, C B A, ...; `row` computes the row.
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _path in (REPO, HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

from _train_step_workers import serve  # noqa: E402

INPUT_LENGTH = 256
MIXTURE = 'builtin'
# gin_configs/runs/demo_decoder_cpu.gin's model, Llama architecture
SHAPE = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
             head_dim=32, vocab_size=384)
PATHS = {'a_buckets': ['--worker', 'jax'], 'b_fixed': ['--worker', 'jax', '--fixed'],
         'c_hf': ['--worker', 'torch']}


def config():
  from t5x_lite.models import DecoderOnlyConfig  # pylint: disable=import-outside-toplevel
  return DecoderOnlyConfig(architecture='llama', rms_norm_eps=1e-5, rope_theta=10000.0,
                           max_position_embeddings=2048, tie_word_embeddings=True, **SHAPE)


def describe():
  s = SHAPE
  return (f'llama (demo_decoder_cpu.gin shape: hidden {s["hidden_size"]}, {s["num_layers"]} '
          f'layers, {s["num_heads"]} heads x {s["head_dim"]}, {s["num_kv_heads"]} kv heads, MLP '
          f'{s["intermediate_size"]}, byte vocab {s["vocab_size"]}, tied), random weights')


def write_hf_dir(path):
  import _decoder_only_case  # pylint: disable=import-outside-toplevel
  from t5x_lite import hf_causal  # pylint: disable=import-outside-toplevel
  c = config()
  hf_causal.save(c, _decoder_only_case.random_params(c), path)


def _setup(args):
  """(mixture, vocab, converter, {task: rendered examples}, {task: validation size}): each
  task's first `--max_examples`, rendered as the Evaluator renders them."""
  from t5x_lite.data import decoder_only_converter, mixtures, pipeline  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  mixture = mixtures.get_mixture(MIXTURE)
  vocab = vocab_lib.ByteVocabulary()
  fits = pipeline.InputFits(vocab, INPUT_LENGTH)
  tasks = [t for t in mixture.tasks if 'validation' in t.splits and t.objective is None]
  examples = {t.name: [t.render('validation', i, t.eval_rng(i), fits=fits)
                       for i in range(min(args.max_examples, t.num_examples('validation')))]
              for t in tasks}
  converter = decoder_only_converter.DecoderOnlyFeatureConverter()
  return (mixture, vocab, converter, examples,
          {t.name: t.num_examples('validation') for t in tasks})


def jax_worker(args):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from t5x_lite import hf_causal, models, partitioning  # pylint: disable=import-outside-toplevel
  from t5x_lite.evaluation import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  mixture, vocab, converter, examples, _ = _setup(args)
  model_config, params = hf_causal.load(args.hf_dir)
  mesh = partitioning.make_mesh({'data': -1})
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  evaluator = evaluator_lib.Evaluator(
      models.build(model_config), mixture, vocab, evaluator_lib.EvalConfig(
          {'inputs': INPUT_LENGTH, 'targets': args.decode_cap}, args.batch_size, 'validation',
          max(map(len, examples.values())), length_buckets=not args.fixed,
          encode_once=not args.fixed),
      mesh, jax.tree.map(lambda _: replicated, params), partitioning.rules_for('dp'),
      feature_converter=converter)
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
          'decode_lengths': {t.name: evaluator.decode_length(t) for t in evaluator.tasks},
          'versions': {'jax': jax.__version__}}
  serve(sys.stdout, info, {'eval': run, 'outputs': lambda: {'outputs': out}})


def _decode_length(task, cap):
  """`Evaluator.decode_length` (its longest target + EOS, at most the cap), without a model."""
  return cap if task.max_target_tokens is None else min(task.max_target_tokens + 1, cap)


def torch_worker(args):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from t5x_lite.data import eval_inputs  # pylint: disable=import-outside-toplevel
  flush = torch.set_flush_denormal(True)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  mixture, vocab, converter, examples, _ = _setup(args)
  converter = converter.for_eval()
  tasks = {t.name: t for t in mixture.tasks}
  lengths = {'inputs': INPUT_LENGTH, 'targets': args.decode_cap}
  model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir).eval()
  model.config.use_cache = True
  pad, eos = vocab.pad_id, vocab.eos_id

  def left_padded(rows):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
      ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    return ids, mask

  def right_padded(rows):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
      ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    return ids, mask

  batches, prompts_of = {}, {}
  for name, task_examples in examples.items():
    prompts = [None] * len(task_examples)   # our prompt ids: the same rows as ours decode
    for batch, indices in eval_inputs.eval_batches(
        task_examples, vocab, lengths, args.batch_size, task_name=name, process_index=0,
        process_count=1, feature_converter=converter):
      ids = converter.model_inputs(batch, args.decode_cap)
      mask = converter.model_inputs_mask(batch, args.decode_cap)
      for row, i in enumerate(indices):
        if i >= 0:
          prompts[i] = ids[row][mask[row]].tolist()
    prompts_of[name] = prompts
    batches[name] = [left_padded(prompts[i:i + args.batch_size])
                     for i in range(0, len(prompts), args.batch_size)]
    if task_examples[0].get('options'):
      units = [dict(e, options=[o]) for e in task_examples for o in e['options']]
      options, options_mask = eval_inputs.option_targets(
          units, vocab, lengths, name, bucketed=False, feature_converter=converter)
      pairs = [(p, options[u, 0][options_mask[u, 0]].tolist()) for u, p in enumerate(
          p for p, e in zip(prompts, task_examples) for _ in e['options'])]
      batches[f'{name}/pairs'] = [
          (right_padded([p + o for p, o in pairs[i:i + args.batch_size]]),
           [(len(p), len(o)) for p, o in pairs[i:i + args.batch_size]])
          for i in range(0, len(pairs), args.batch_size)]
  new_tokens = {name: _decode_length(tasks[name], args.decode_cap) for name in examples}
  out = {}

  def run(warm=False):
    """The eval; `warm`: one batch of each task."""
    times = {'generate_s': 0.0, 'rank_s': 0.0}
    with torch.inference_mode():
      for name, task_examples in examples.items():
        start = time.perf_counter()
        predictions = []
        for ids, mask in batches[name][:1 if warm else None]:
          generated = model.generate(input_ids=ids, attention_mask=mask, num_beams=1,
                                     do_sample=False, use_cache=True,
                                     max_new_tokens=new_tokens[name], eos_token_id=eos,
                                     pad_token_id=pad)
          predictions += [converter.decode(vocab, row[ids.shape[1]:].numpy())
                          for row in generated]
        out[name] = predictions
        times['generate_s'] += time.perf_counter() - start
        times[f'task/{name}'] = time.perf_counter() - start
        if f'{name}/pairs' in batches:
          start = time.perf_counter()
          scores = []
          for (ids, mask), spans in batches[f'{name}/pairs'][:1 if warm else None]:
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask,
                                           use_cache=False).logits, -1)
            for r, (p, o) in enumerate(spans):   # position t predicts token t + 1
              picked = logp[r, p - 1:p + o - 1].gather(-1, ids[r, p:p + o, None])
              scores.append(float(picked.sum()))
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
          'flush_denormal': flush, 'threads': torch.get_num_threads(),
          'attn_implementation': getattr(model.config, '_attn_implementation', None),
          'prompt_tokens': {n: [min(map(len, p)), max(map(len, p))]
                            for n, p in prompts_of.items()},
          'versions': {'torch': torch.__version__, 'transformers': transformers.__version__}}
  serve(sys.stdout, info, {'eval': run, 'outputs': lambda: {'outputs': out}})


def measure(args, hf_dir, log):
  """Start the three workers one at a time, then interleave `args.reps` whole evals."""
  from train_step import PAUSE_S, Worker  # pylint: disable=import-outside-toplevel
  workers, calls = {}, {name: [] for name in PATHS}
  common = ['--hf_dir', hf_dir, '--max_examples', str(args.max_examples), '--batch_size',
            str(args.batch_size), '--decode_cap', str(args.decode_cap), '--torch_threads',
            str(args.torch_threads)]
  try:
    for name, argv in PATHS.items():  # one at a time: a compile never overlaps a timed call
      log(f'decoder-only: starting {name}')
      workers[name] = Worker(f'eval_decoder/{name}', argv + common,
                             script=os.path.abspath(__file__))
      log(f'decoder-only: {name} first call {workers[name].info["first_call_s"]:.1f}s')
    order = list(workers)
    for i in range(args.reps):
      for name in (order if i % 2 == 0 else order[::-1]):
        time.sleep(PAUSE_S)
        calls[name].append(workers[name].call('eval'))
      log(f'decoder-only: rep {i + 1}/{args.reps} ' + ' '.join(
          f'{name} {c[-1]["step_s"]:.1f}s' for name, c in calls.items()))
    outputs = {name: w.call('outputs')['outputs'] for name, w in workers.items()}
  finally:
    for w in workers.values():
      w.close()
  return calls, outputs, {name: w.info for name, w in workers.items()}


def row(args, log):
  """The decoder-only row of eval.py's JSON (a dict)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as hf_dir:
    write_hf_dir(hf_dir)
    calls, outputs, infos = measure(args, hf_dir, log)
  sizes = _setup(args)[4]
  a, b, c = outputs['a_buckets'], outputs['b_fixed'], outputs['c_hf']
  counts = {k: len(v) for k, v in a.items() if '/' not in k}
  examples = sum(counts.values())
  out = {'model': describe(), 'mixture': f'{MIXTURE} validation', 'vocabulary': 'byte',
         'converter': 'DecoderOnlyFeatureConverter() (start id + inputs + EOS, no chat template)',
         'validation_sizes': sizes, 'examples_per_task': counts, 'examples': examples,
         'batch_size': args.batch_size, 'input_length': INPUT_LENGTH,
         'decode_cap': args.decode_cap, 'decode_lengths': infos['a_buckets']['decode_lengths'],
         'hf_prompt_tokens_min_max': infos['c_hf']['prompt_tokens'],
         'hf_padding': 'left, to the batch\'s longest prompt (generate); right for scoring',
         'reps': args.reps}
  for name in PATHS:
    median = lambda key, name=name: statistics.median(r[key] for r in calls[name])
    per_task = {t: median(f'task/{t}') / counts[t] for t in counts}  # s per example
    out[f'{name}_examples_per_s'] = sum(sizes.values()) / sum(
        sizes[t] * per_task[t] for t in counts)
    out[f'{name}_subsample_examples_per_s'] = examples / median('step_s')
    out[f'{name}_generate_examples_per_s'] = examples / median('generate_s')
    out[f'{name}_task_s_per_example'] = per_task
    out[f'{name}_first_call_s'] = infos[name]['first_call_s']
  ratio = lambda x, y, key='': out[f'{x}{key}_examples_per_s'] / out[f'{y}{key}_examples_per_s']
  out.update(
      a_over_b=ratio('a_buckets', 'b_fixed'),
      a_over_b_generate=ratio('a_buckets', 'b_fixed', '_generate'),
      a_over_c=ratio('a_buckets', 'c_hf'),
      a_over_c_generate=ratio('a_buckets', 'c_hf', '_generate'),
      a_b_predictions_identical=all(a[k] == b[k] for k in a if not k.endswith('/scores')),
      a_b_rank_scores_max_abs_diff=max(
          (max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a if k.endswith('/scores')),
          default=None),
      a_c_predictions_identical_fraction=(
          sum(x == y for k in c if '/' not in k for x, y in zip(a[k], c[k])) / examples),
      a_c_rank_choices_identical_fraction=_agreement(a, c, '/rank'))
  out['targets_met'] = {f'{k} >= {t} (the T5 row\'s targets)': out[k] >= t
                        for k, t in (('a_over_b', 3), ('a_over_c', 2))}
  out['hf_flush_denormal'] = infos['c_hf']['flush_denormal']
  out['hf_threads'] = infos['c_hf']['threads']
  out['hf_attn_implementation'] = infos['c_hf']['attn_implementation']
  out['versions'] = {k: v for i in infos.values() for k, v in i['versions'].items()}
  out['wall_s'] = time.perf_counter() - start
  return out


def _agreement(x, y, suffix):
  pairs = [(p, q) for k in y if k.endswith(suffix) for p, q in zip(x[k], y[k])]
  return sum(p == q for p, q in pairs) / len(pairs) if pairs else None


def main():
  parser = argparse.ArgumentParser(description="a worker of eval.py's decoder-only row")
  parser.add_argument('--worker', choices=('jax', 'torch'), required=True)
  parser.add_argument('--fixed', action='store_true')
  parser.add_argument('--hf_dir', required=True)
  parser.add_argument('--max_examples', type=int, required=True)
  parser.add_argument('--batch_size', type=int, required=True)
  parser.add_argument('--decode_cap', type=int, required=True)
  parser.add_argument('--torch_threads', type=int, default=0)
  args = parser.parse_args()
  os.chdir(REPO)
  (jax_worker if args.worker == 'jax' else torch_worker)(args)


if __name__ == '__main__':
  main()
