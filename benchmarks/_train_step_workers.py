"""Workers of benchmarks/train_step.py: one train step of t5x_lite (jax) or of Hugging Face's
T5ForConditionalGeneration (torch), each in its own process; for the decoder-only cases
(`_decoder_only_case.TRAIN_CASES`), of our decoder-only model and HF's LlamaForCausalLM, both
reading the weights of the Hugging Face directory the parent wrote (`hf_dir`).

A worker builds its model and its batches, times a large fp32 matmul, compiles, runs one step
plus `discard` more (with batches of varying shapes: one pass over all of them, so that every
shape is compiled before timing), prints one JSON line (its info), then times one call per
'step' line read on stdin and answers with {"step_s": seconds, "tokens": non-pad tokens
trained on, "loss": ...}; any other line (or EOF) ends it.

Batches (`data`): 'synthetic' (random ids, every position real, the steps/s cases), or the
first `n` batches of the builtin mixture tokenized by our pipeline, for the useful-tokens
figures: 'packed' (ours, the pipeline's packed batches) and 'longest' (HF, the examples of the
pipeline's pack=False rows collated by `transformers.DataCollatorForSeq2Seq(padding='longest')`,
optionally `pad_to_multiple_of`).
"""

import contextlib
import ctypes
import itertools
import json
import os
import re
import sys
import time

import numpy as np

from _decoder_only_case import TRAIN_CASES as DECODER_CASES, train_batch as decoder_batch

BATCH = 8
LENGTHS = {'inputs': 256, 'targets': 64}
CASES = {'small_fp32': ('small', 'float32'), 'small_bf16': ('small', 'bfloat16'),
         'tiny_fp32': ('tiny', 'float32'), 'tiny_bf16': ('tiny', 'bfloat16')}
LEARNING_RATE = 1e-4  # AdamW on both sides: b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01
MATMUL_N = 2048
SPIECE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
                      't5_spiece', 'spiece.model')


def _local_sh_glibc_tunables():
  """The GLIBC_TUNABLES launch/local.sh trains with (read from it: one place to change)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'launch', 'local.sh')
  with open(path) as f:
    return re.search(r'GLIBC_TUNABLES:-([^}]*)\}', f.read()).group(1)


def worker_env():
  """A worker's environment: launch/local.sh's malloc settings (XLA:CPU's per-step temporaries
  stay in the heap, see there), given to ours and HF alike; a GLIBC_TUNABLES set by the caller
  is kept."""
  return dict(os.environ, GLIBC_TUNABLES=os.environ.get('GLIBC_TUNABLES',
                                                        _local_sh_glibc_tunables()))


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


def mixture_batches(case, pack, n):
  """The first `n` batches of the builtin mixture in the batch contract (packed, or one example
  per row padded to LENGTHS), tokenized with T5's SentencePiece for flan-t5 sizes (when
  ../shared/data has it) and with bytes for tiny; and how they were made."""
  from t5x_lite.data import pipeline
  from t5x_lite.data import vocab as vocab_lib
  use_spiece = CASES[case][0] != 'tiny' and os.path.exists(SPIECE)
  vocab = vocab_lib.SentencePieceVocabulary(SPIECE) if use_spiece else vocab_lib.ByteVocabulary()
  config = pipeline.PipelineConfig(LENGTHS, batch_size=BATCH, pack=pack, prefetch=0)
  it = pipeline.train_iterator('builtin', vocab, config, 0, 1)
  try:
    batches = [next(it) for _ in range(n)]
    stats = dict(it.stats)
  finally:
    it.close()
  return batches, {'vocab': 't5_spiece' if use_spiece else 'byte', 'batches': n,
                   'examples_per_batch': stats.get('examples', 0) / n,
                   'truncated_examples': stats.get('truncated_examples')}


def nonpad_tokens(batch):
  """Real (non-pad) input + target tokens of a batch in the contract (either family's)."""
  return int(sum((batch[k] > 0).sum() for k in ('encoder_segment_ids', 'decoder_segment_ids')
                 if k in batch))


def _data_info(info, tokens, positions, shapes):
  info.update(tokens_per_batch=tokens, efficiency=sum(tokens) / sum(positions),
              distinct_shapes=sorted(set(shapes)))


def best_gflops(matmul, reps=5):
  matmul()  # warm up
  best = min(_timed(matmul) for _ in range(reps))
  return 2 * MATMUL_N ** 3 / best / 1e9


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _rss_gb(field='VmRSS'):
  with open('/proc/self/status') as f:
    line = next(l for l in f if l.startswith(field + ':'))
  return int(line.split()[1]) / 1e6  # kB


def release_memory(settle_s=0.3):
  """Hand the heap's free pages back to the kernel (glibc `malloc_trim(0)`; GLIBC_TUNABLES's
  trim_threshold otherwise keeps them), again after `settle_s`: XLA:CPU frees a step's
  temporaries on its own thread, sometimes after the outputs are ready (a trim right away
  then finds 6 of the 8.5 GB still in use); seconds taken."""
  start = time.perf_counter()
  with contextlib.suppress(OSError, AttributeError):
    trim = ctypes.CDLL('libc.so.6').malloc_trim
    trim(0)
    time.sleep(settle_s)
    trim(0)
  return time.perf_counter() - start


def serve(out, info, calls, trim=False):
  """The worker side of `train_step.Worker`: write `info` as one JSON line, then time one
  call of `calls[command]` per command line read from stdin (an unknown one ends it); a call
  that returns a dict adds it to the reply. `trim`: return the freed heap to the kernel before
  `info` and after each call, outside the timing and before replying (the parent's next call
  goes to another worker): an idle worker then holds its live memory only, not its step's
  peak (the decoder-only row's three workers would need ~21 GB at 135M)."""
  if trim:
    info.update(peak_rss_gb=_rss_gb('VmHWM'), trim_s=release_memory(), idle_rss_gb=_rss_gb())
  out.write(json.dumps(info) + '\n')
  out.flush()
  for line in sys.stdin:
    fn = calls.get(line.strip())
    if fn is None:
      break
    start = time.perf_counter()
    result = fn()
    reply = {'step_s': time.perf_counter() - start}
    if isinstance(result, dict):
      reply.update(result)
    if trim:
      reply['trim_s'] = release_memory()
    out.write(json.dumps(reply) + '\n')
    out.flush()


def serve_steps(out, info, run_batch, num_batches, discard, first_key, warm_all=False,
                per_call=1, ready=None, trim=False):
  """Run the first step (timed as info[first_key]: compile and allocations), warm up with
  `discard` more (or every other batch once when `warm_all`: shapes vary, each must be compiled
  before timing), call `ready(info)`, then serve 'step' calls of `per_call` batches each, cycling
  through the batches in order. `run_batch(i)` trains on batch i, returns (loss, non-pad tokens)."""
  order = itertools.cycle(range(num_batches))
  start = time.perf_counter()
  info['loss'] = run_batch(next(order))[0]
  info[first_key] = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(max(discard, num_batches - 1) if warm_all else discard):
    info['loss'] = run_batch(next(order))[0]
  info['warmup_s'] = time.perf_counter() - start
  if ready:
    ready(info)

  def step():
    tokens = 0
    for _ in range(per_call):
      loss, n = run_batch(next(order))
      tokens += n
    return {'tokens': tokens, 'loss': loss}
  serve(out, info, {'step': step}, trim)


def jax_worker(out, case, discard, data='synthetic', num_batches=1, hf_dir=None):
  """Ours: the synthetic batch ('synthetic'), or packed batches of the builtin mixture
  ('packed'), trained with the mixture's per-task loss weights as `t5x-lite train` does. A
  decoder-only case starts from the weights in `hf_dir` (synthetic batches only)."""
  import flax
  import flax.linen as nn
  import jax
  import optax
  from t5x_lite import models, partitioning
  from t5x_lite.data import mixtures
  from t5x_lite.training import optimizers
  from t5x_lite.training import state as state_lib
  from t5x_lite.training import step as step_lib
  params = None
  if case in DECODER_CASES:
    from t5x_lite import hf_causal
    config, params = hf_causal.load(hf_dir)
    config = config.replace(dtype=DECODER_CASES[case][1])
  else:
    size, dtype = CASES[case]
    config = models.preset('flan_t5', size, dtype=dtype)
  optimizer = optimizers.OptimizerConfig(name='adamw', learning_rate=LEARNING_RATE).build()
  mesh = partitioning.make_mesh({'data': 1}, jax.devices()[:1])
  rules = partitioning.rules_for('dp')
  model = models.build(config)
  layout = state_lib.state_layout(model, optimizer, mesh, rules)
  state = state_lib.create_state(model, optimizer, layout, jax.random.key(0), params)
  del params
  info = {}
  if data == 'synthetic':
    make = decoder_batch if case in DECODER_CASES else synthetic_batch
    host, task_weights = [make(config.vocab_size)], np.ones(1)
  elif data == 'packed':
    host, info['data'] = mixture_batches(case, True, num_batches)
    task_weights = mixtures.get_mixture('builtin').loss_weights()
    _data_info(info, [nonpad_tokens(b) for b in host], [BATCH * sum(LENGTHS.values())] * len(host),
               [tuple(b['encoder_input_tokens'].shape + b['decoder_target_tokens'].shape)
                for b in host])
  else:
    raise ValueError(f'ours trains on synthetic or packed batches, not {data!r}')
  train_step = step_lib.make_train_step(model, optimizer, task_weights)
  run = step_lib.jit_train_step(train_step, layout, mesh, rules)
  batches = [partitioning.global_batch(b, mesh) for b in host]
  tokens = [nonpad_tokens(b) for b in host]
  rng = jax.random.key(1)
  a = jax.random.normal(jax.random.key(2), (MATMUL_N, MATMUL_N), jax.numpy.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  info['matmul_gflops'] = best_gflops(lambda: jax.block_until_ready(matmul(a, a)))
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = run.jitted.lower(state, batches[0], rng, {}, run.task_loss_weights).compile()
  info['compile_s'] = time.perf_counter() - start
  cost = compiled.cost_analysis()
  info['flops'] = float((cost[0] if isinstance(cost, list) else cost)['flops'])
  info['versions'] = {'jax': jax.__version__, 'flax': flax.__version__,
                      'optax': optax.__version__}
  holder = [state]

  def run_batch(i):
    holder[0], metrics = compiled(holder[0], batches[i], rng, {}, run.task_loss_weights)
    return float(jax.block_until_ready((holder[0], metrics))[1]['loss']), tokens[i]
  serve_steps(out, info, run_batch, len(batches), discard, 'first_step_s',
              trim=case in DECODER_CASES)


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
      eos_token_id=1, decoder_start_token_id=0,
      tie_word_embeddings=False)  # sets scale_decoder_outputs=False (no d_model**-0.5 scaling)
  config.tie_word_embeddings = False  # transformers 5 forces True at construction
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config)
  model.encoder.embed_tokens = model.shared
  model.decoder.embed_tokens = model.shared
  with torch.no_grad():
    model.lm_head.weight.normal_(0.0, c.d_model ** -0.5)
  return model.train(), c


def hf_batches(case, num_batches, bucket, model):
  """HF's batches of the builtin mixture (the examples and token ids of our pipeline's pack=False
  rows), as keyword arguments of `model(**batch)`: each row's real tokens collated by
  `DataCollatorForSeq2Seq(padding='longest', pad_to_multiple_of=bucket)` with `model` (so
  decoder_input_ids are the labels shifted right), as `transformers.Seq2SeqTrainer` batches."""
  import transformers
  rows, how = mixture_batches(case, False, num_batches)
  # The ids come from our pipeline, so the tokenizer only pads: a T5Tokenizer without a
  # vocabulary has T5's pad id (0) and padding side (right), for SentencePiece and byte ids alike.
  collator = transformers.DataCollatorForSeq2Seq(
      transformers.T5Tokenizer(), model=model, padding='longest', pad_to_multiple_of=bucket or None)
  batches = []
  for b in rows:
    enc, dec = b['encoder_segment_ids'] > 0, b['decoder_segment_ids'] > 0
    batches.append(dict(collator([
        {'input_ids': b['encoder_input_tokens'][r][enc[r]].tolist(),
         'labels': b['decoder_target_tokens'][r][dec[r]].tolist()} for r in range(len(enc))])))
  how['collator'] = ('DataCollatorForSeq2Seq(padding="longest", '
                     f'pad_to_multiple_of={bucket or None}, label_pad_token_id=-100, model=model)')
  return batches, how


def hf_causal_lm(hf_dir):
  """LlamaForCausalLM from the parent's directory, in train mode, no KV cache (training
  needs none: `use_cache=True` would fill a DynamicCache every forward)."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  model.config.use_cache = False
  return model.train()


def torch_worker(out, case, compile_model, discard, threads=0, data='synthetic', num_batches=1,
                 per_call=1, dynamic=False, bucket=0, hf_dir=None):
  """HF: synthetic batch, or builtin-mixture batches padded to their 'longest' row; eager,
  `torch.compile(model)`, `dynamic=True`, or (with `bucket`) one static graph per padded shape
  (`dynamic=False`; the recompile limit raised to the shapes seen). A decoder-only case:
  `hf_causal_lm(hf_dir)` on our synthetic batch's inputs, `labels=input_ids` (HF shifts them:
  position t learns token t + 1, our target t, so 255 of our 256 targets)."""
  import torch
  import transformers
  if threads:
    torch.set_num_threads(threads)
  info = {'flush_denormal': torch.set_flush_denormal(True), 'threads': torch.get_num_threads()}
  a = torch.randn(MATMUL_N, MATMUL_N)
  info['matmul_gflops'] = best_gflops(lambda: torch.mm(a, a))
  if case in DECODER_CASES:
    model, dtype = hf_causal_lm(hf_dir), DECODER_CASES[case][1]
    info['attn_implementation'] = getattr(model.config, '_attn_implementation', None)
  else:
    size, dtype = CASES[case]
    model, c = hf_model(size)
  try:
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01, fused=True)
    info['adamw'] = 'fused'
  except (RuntimeError, ValueError):
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    info['adamw'] = 'default'
  if data == 'synthetic' and case in DECODER_CASES:
    ids = torch.from_numpy(decoder_batch(model.config.vocab_size)['decoder_input_tokens']).long()
    batches = [dict(input_ids=ids, labels=ids)]
  elif data == 'synthetic':
    b = {k: torch.from_numpy(v).long() for k, v in synthetic_batch(c.vocab_size).items()}
    batches = [dict(input_ids=b['encoder_input_tokens'], attention_mask=b['encoder_segment_ids'],
                    decoder_input_ids=b['decoder_input_tokens'],
                    labels=b['decoder_target_tokens'])]
  elif data == 'longest':
    batches, info['data'] = hf_batches(case, num_batches, bucket, model)
  else:
    raise ValueError(f'HF trains on synthetic or longest batches, not {data!r}')
  if case in DECODER_CASES:  # every position real; tokens as ours counts them
    tokens = [int(b['input_ids'].numel()) for b in batches]
  else:
    tokens = [int(b['attention_mask'].sum() + (b['labels'] != -100).sum()) for b in batches]
  shapes = [tuple(b['input_ids'].shape) + tuple(b['labels'].shape) for b in batches]
  if data != 'synthetic':
    _data_info(info, tokens, [b['input_ids'].numel() + b['labels'].numel() for b in batches],
               shapes)
  info['compile'] = 'eager'
  forward = model
  if compile_model:
    kwargs = {'dynamic': True} if dynamic else {'dynamic': False} if bucket else {}
    info['compile'] = f'torch.compile(model{"".join(f", {k}={v}" for k, v in kwargs.items())})'
    if bucket:  # a graph per padded shape: never fall back to eager for lack of slots
      limit = torch._dynamo.config.recompile_limit
      torch._dynamo.config.recompile_limit = max(limit, len(set(shapes)) + 1)
    forward = torch.compile(model, **kwargs)
  autocast = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if dtype == 'bfloat16' else (
      contextlib.nullcontext)
  info['versions'] = {'torch': torch.__version__, 'transformers': transformers.__version__}

  def run_batch(i):
    with autocast():
      loss = forward(**batches[i]).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), tokens[i]
  serve_steps(out, info, run_batch, len(batches), discard,
              'compile_s' if compile_model else 'first_step_s', warm_all=data == 'longest',
              per_call=per_call, ready=_dynamo_graphs if compile_model else None,
              trim=case in DECODER_CASES)


def _dynamo_graphs(info):
  """How many graphs torch.compile made during the warm-up (dynamo's own counters)."""
  from torch._dynamo.utils import counters
  info['dynamo_unique_graphs'] = counters['stats'].get('unique_graphs')
