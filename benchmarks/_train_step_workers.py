"""Workers of benchmarks/train_step.py: one train step of t5x_lite (jax) or of Hugging Face's
T5ForConditionalGeneration (torch), each in its own process.

A worker builds its model, times a large fp32 matmul, compiles, runs one step plus `discard`
more, prints one JSON line (its info), then times one step per 'step' line read on stdin and
answers with {"step_s": seconds}; any other line (or EOF) ends it.
"""

import contextlib
import json
import os
import re
import sys
import time

import numpy as np

BATCH = 8
LENGTHS = {'inputs': 256, 'targets': 64}
CASES = {'small_fp32': ('small', 'float32'), 'small_bf16': ('small', 'bfloat16'),
         'tiny_fp32': ('tiny', 'float32'), 'tiny_bf16': ('tiny', 'bfloat16')}
LEARNING_RATE = 1e-4  # AdamW on both sides: b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01
MATMUL_N = 2048


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


def best_gflops(matmul, reps=5):
  matmul()  # warm up
  best = min(_timed(matmul) for _ in range(reps))
  return 2 * MATMUL_N ** 3 / best / 1e9


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def serve(out, info, calls):
  """The worker side of `train_step.Worker`: write `info` as one JSON line, then time one
  call of `calls[command]` per command line read from stdin (an unknown one ends it)."""
  out.write(json.dumps(info) + '\n')
  out.flush()
  for line in sys.stdin:
    fn = calls.get(line.strip())
    if fn is None:
      break
    out.write(json.dumps({'step_s': _timed(fn)}) + '\n')
    out.flush()


def serve_steps(out, info, step, discard):
  for _ in range(discard):
    info['loss'] = float(step())
  serve(out, info, {'step': step})


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
    return jax.block_until_ready((holder[0], metrics))[1]['loss']
  start = time.perf_counter()
  step()  # the first run (allocations), then `discard` more in serve_steps()
  info['first_step_s'] = time.perf_counter() - start
  serve_steps(out, info, step, discard)


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


def torch_worker(out, case, compile_model, discard, threads=0):
  import torch
  import transformers
  if threads:
    torch.set_num_threads(threads)
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
  serve_steps(out, info, step, discard)
