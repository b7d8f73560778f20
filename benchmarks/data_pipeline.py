"""Input pipeline throughput and packing efficiency on the built-in mixture.

Prints one JSON line: packed batches/s, examples/s and tokens/s at batch 64 x (512 inputs,
128 targets) with the byte vocabulary (the demo's) and with the T5 SentencePiece vocabulary
when ../shared/data has it; packing efficiency (non-pad fraction of encoder, decoder and all
tokens); and the ratio to the flan-t5-small forward+backward step that the batches feed,
measured in the same run (jit, fp32, value_and_grad of the token cross-entropy; the
optimizer update, a few % of the step, is left out).

`span_corruption`: the same figures for T5's objective at T5's 512/114 on long raw text
(../shared/data's XSum articles with the T5 vocabulary when present, in T5's merged chunks of
128 articles; else the built-in `builtin_denoise` texts, one at a time, with the byte
vocabulary), against the same 512/128 step.

  python benchmarks/data_pipeline.py [--batches 30] [--step_batch 16]
"""

import argparse
import json
import os
import platform
import time

import numpy as np

LENGTHS = {'inputs': 512, 'targets': 128}
BATCH = 64
SPAN_LENGTHS = {'inputs': 512, 'targets': 114}   # T5's span corruption (random_spans_helper)
SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data')
SPIECE = os.path.join(SHARED, 't5_spiece', 'spiece.model')
XSUM = os.path.join(SHARED, 'xsum', 'test.jsonl')


def measure_pipeline(vocab, batches, mixture='builtin', lengths=None):
  from t5x_lite.data import pipeline
  lengths = lengths or LENGTHS
  cfg = pipeline.PipelineConfig(lengths, batch_size=BATCH, seed=0, prefetch=0)
  it = pipeline.train_iterator(mixture, vocab, cfg, 0, 1)
  next(it)  # warm up (first group of packing bins)
  enc = dec = 0
  start = time.perf_counter()
  examples0 = it.stats['examples']
  for _ in range(batches):
    b = next(it)
    enc += int((b['encoder_segment_ids'] > 0).sum())
    dec += int((b['decoder_segment_ids'] > 0).sum())
  seconds = time.perf_counter() - start
  examples = it.stats['examples'] - examples0
  it.close()
  cap_enc, cap_dec = batches * BATCH * lengths['inputs'], batches * BATCH * lengths['targets']
  return {
      'batches_per_s': batches / seconds, 'examples_per_s': examples / seconds,
      'tokens_per_s': (enc + dec) / seconds, 'examples_per_batch': examples / batches,
      'efficiency_encoder': enc / cap_enc, 'efficiency_decoder': dec / cap_dec,
      'efficiency_all': (enc + dec) / (cap_enc + cap_dec),
      'truncated_examples': it.stats['truncated_examples'],
  }


def measure_span_corruption(batches):
  """Span corruption at 512/114 over XSum articles (T5 vocab) or the built-in texts (bytes)."""
  from t5x_lite.data import file_tasks, vocab
  if os.path.exists(SPIECE) and os.path.exists(XSUM):
    task = file_tasks.file_task('xsum_spans', {'train': XSUM}, objective='span_corruption',
                                text_field='inputs', register=False)
    out = measure_pipeline(vocab.SentencePieceVocabulary(SPIECE), batches, task, SPAN_LENGTHS)
    return {'text': 'xsum articles', 'vocab': 't5_spiece', 'feature_lengths': SPAN_LENGTHS,
            **out}
  out = measure_pipeline(vocab.ByteVocabulary(), batches, 'builtin_denoise', SPAN_LENGTHS)
  return {'text': 'builtin_denoise', 'vocab': 'byte', 'feature_lengths': SPAN_LENGTHS, **out}


def measure_train_step(step_batch, repeats=3):
  import jax
  import jax.numpy as jnp
  import optax
  from t5x_lite import models
  config = models.preset('flan_t5', 'small')
  model = models.build(config)
  params = model.init_params(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {
      'encoder_input_tokens': rng.integers(3, 32000, (step_batch, LENGTHS['inputs'])),
      'decoder_input_tokens': rng.integers(3, 32000, (step_batch, LENGTHS['targets'])),
      'decoder_target_tokens': rng.integers(3, 32000, (step_batch, LENGTHS['targets'])),
  }
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}

  def loss(p):
    logits = model.logits(p, batch)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['decoder_target_tokens']).mean()

  step = jax.jit(jax.value_and_grad(loss))
  jax.block_until_ready(step(params))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--step_batch', type=int, default=16,
                      help='batch of the timed train step (scaled linearly to 64)')
  args = parser.parse_args()
  from t5x_lite.data import vocab
  result = {'benchmark': 'data_pipeline', 'batch': BATCH, 'feature_lengths': LENGTHS,
            'machine': f'{platform.machine()} {os.cpu_count()} cpus'}
  result['byte_vocab'] = measure_pipeline(vocab.ByteVocabulary(), args.batches)
  if os.path.exists(SPIECE):
    result['t5_spiece_vocab'] = measure_pipeline(vocab.SentencePieceVocabulary(SPIECE),
                                                 args.batches)
  result['span_corruption'] = measure_span_corruption(args.batches)
  step_s = measure_train_step(args.step_batch) * BATCH / args.step_batch
  result['flan_t5_small_step_s_at_batch_64'] = step_s
  for key in ('byte_vocab', 't5_spiece_vocab', 'span_corruption'):
    if key in result:
      result[key]['x_faster_than_train_step'] = result[key]['batches_per_s'] * step_s
  print(json.dumps(_rounded(result)))


def _rounded(x):
  if isinstance(x, float):
    return float(f'{x:.4g}')
  if isinstance(x, dict):
    return {k: _rounded(v) for k, v in x.items()}
  return x


if __name__ == '__main__':
  main()
