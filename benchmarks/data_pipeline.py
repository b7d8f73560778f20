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

`parquet`: the same figures at 512/128 from a 1M-row Flan-like Parquet file made here
(inputs, targets, task_name, template_type; row groups of <= 100 MB as `datasets` writes
them), as four tasks cut from it with `where` on `task_name` (T5 vocabulary when present,
else bytes); `prepare_s` is the sources' build (the one-time conversion of the big row groups
to a memory-mapped Arrow file, in a temporary cache, and the filters), `random_read_us` one
row read at random through the converted file and, in place, from the same rows written with
1,000-row groups.

  python benchmarks/data_pipeline.py [--batches 30] [--step_batch 16]
"""

import argparse
import json
import os
import platform
import tempfile
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


def _flan_like_table(rows, num_tasks=50, seed=0):
  """`rows` rows of Flan sub-mixture columns; the text is made vectorised (2,000 passages of
  40-120 words, numbered per row)."""
  import pyarrow as pa
  import pyarrow.compute as pc
  rng = np.random.default_rng(seed)
  words = ('the a of and to in river stone quick brown fox jumps over lazy dog question answer '
           'summary translate sentence review movie city capital number because').split()
  passages = pa.array([' '.join(rng.choice(words, rng.integers(40, 120))) for _ in range(2000)])
  numbers = pa.array(np.arange(rows).astype(str))
  inputs = pc.binary_join_element_wise('Question ', numbers, ': ',
                                       passages.take(rng.integers(0, 2000, rows)), '')
  targets = pc.utf8_slice_codeunits(passages.take(rng.integers(0, 2000, rows)), 0, 60)
  tasks = pa.array([f'task_{i}' for i in range(num_tasks)])
  types = pa.array(['zs_opt', 'zs_noopt', 'fs_opt', 'fs_noopt'])
  return pa.table({'inputs': inputs, 'targets': targets,
                   'task_name': tasks.take(rng.integers(0, num_tasks, rows)),
                   'template_type': types.take(rng.integers(0, 4, rows))})


def measure_parquet(vocab, batches, rows=1_000_000):
  """Four tasks (task_name filters) from one 1M-row Parquet file through the pipeline."""
  import pyarrow.parquet as pq
  from t5x_lite.data import arrow_sources, file_tasks
  with tempfile.TemporaryDirectory() as tmp:
    cache, previous = os.path.join(tmp, 'cache'), os.environ.get('T5X_LITE_CACHE')
    os.environ['T5X_LITE_CACHE'] = cache
    try:
      table = _flan_like_table(rows)
      group_rows = max(1000, int(100e6 / (table.nbytes / rows)))   # datasets: <= 100 MB
      path = os.path.join(tmp, 'train-00000-of-00001.parquet')
      pq.write_table(table, path, row_group_size=group_rows)
      start = time.perf_counter()
      tasks = [file_tasks.file_task(
          f'flan_like_{k}', {'train': path}, [('{inputs}', '{targets}')],
          where={'task_name': [f'task_{i}' for i in range(k, 50, 4)]}, register=False)
               for k in range(4)]
      prepare_s = time.perf_counter() - start
      mixture = file_tasks.file_mixture('flan_like', tasks, register=False)
      out = measure_pipeline(vocab, batches, mixture)
      small = os.path.join(tmp, 'small_groups.parquet')
      pq.write_table(table, small, row_group_size=1000)
      in_place = arrow_sources.ParquetSource({'train': small}, max_in_place_bytes=None)
      read_us = {'converted': _random_read_us(tasks[0].source.split('train')),
                 'in_place_1000_row_groups': _random_read_us(in_place.split('train'))}
    finally:
      if previous is None:
        os.environ.pop('T5X_LITE_CACHE')
      else:
        os.environ['T5X_LITE_CACHE'] = previous
  return {'rows': rows, 'row_group_rows': group_rows, 'tasks': 4, 'prepare_s': prepare_s,
          'random_read_us': read_us, **out}


def _random_read_us(split, reads=3000):
  rng = np.random.default_rng(1)
  start = time.perf_counter()
  for i in rng.integers(0, len(split), reads):
    split[int(i)]
  return (time.perf_counter() - start) / reads * 1e6


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
  spiece = os.path.exists(SPIECE)
  result['parquet'] = {'vocab': 't5_spiece' if spiece else 'byte', **measure_parquet(
      vocab.SentencePieceVocabulary(SPIECE) if spiece else vocab.ByteVocabulary(),
      args.batches)}
  step_s = measure_train_step(args.step_batch) * BATCH / args.step_batch
  result['flan_t5_small_step_s_at_batch_64'] = step_s
  for key in ('byte_vocab', 't5_spiece_vocab', 'span_corruption', 'parquet'):
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
