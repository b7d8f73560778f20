"""Evaluation across processes: each prediction and option score is paired with its own
example whatever the mesh's device order (issue 17, item 7)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of an evaluation; argv: process_id num_processes port device_order.
# 'interleaved' builds the mesh from process 1's first device, process 0's first, process 1's
# second, ...: neither the process order nor contiguous blocks of rows per process. 'reversed'
# (one process) lists the devices backwards.
WORKER = r'''
import json, sys
import flax.linen as nn
import numpy as np
from t5x_lite import evaluation, models, partitioning
from t5x_lite.data import mixtures, vocab as vocab_lib
process_id, num_processes, port, order = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if num_processes > 1:
  partitioning.initialize_distributed(partitioning.DistributedConfig(
      f'127.0.0.1:{port}', num_processes, process_id))
import jax
devices = jax.devices()
if order == 'interleaved':
  groups = [[d for d in devices if d.process_index == p] for p in reversed(range(num_processes))]
  devices = [d for group in zip(*groups) for d in group]
elif order == 'reversed':
  devices = devices[::-1]
mesh = partitioning.make_mesh({'data': 2, 'fsdp': -1}, devices=devices)
rules = partitioning.rules_for('fsdp')
config = models.preset('flan_t5', 'tiny')
shardings = partitioning.to_shardings(
    partitioning.param_specs(models.logical_axes(config), rules), mesh)
# Random parameters from numpy (compiling the jax initialiser would take seconds here).
rng = np.random.default_rng(0)
params = jax.device_put(jax.tree.map(
    lambda x: rng.normal(0.0, x.shape[0] ** -0.5, x.shape).astype(np.float32),
    nn.unbox(models.abstract_params(config))), shardings)
mixture = mixtures.Mixture('eval_order', ['builtin_sentiment', 'builtin_qa', 'builtin_arithmetic'])
evaluator = evaluation.Evaluator(
    models.build(config), mixture, vocab_lib.get_vocabulary('byte'),
    evaluation.EvalConfig({'inputs': 64, 'targets': 8}, batch_size=8, max_examples=11),
    mesh, shardings, rules)
out = {'mesh_processes': [d.process_index for d in mesh.devices.flat],
       'metrics': evaluator.evaluate(params, 0), 'predictions': {}, 'rank_scores': {}}
for task in evaluator.tasks:
  out['predictions'][task.name] = evaluator.predict(params, task)
  if task.options:
    out['rank_scores'][task.name] = [s.tolist() for s in evaluator.rank_scores(params, task)]
print(json.dumps(out))
'''


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(script, process_id, num_processes, port, order, devices):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(devices)}
  return subprocess.Popen(
      [sys.executable, str(script), str(process_id), str(num_processes), str(port), order],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_two_processes_on_an_interleaved_mesh_match_one_process(tmp_path):
  script = tmp_path / 'eval_worker.py'
  script.write_text(WORKER)
  port = _free_port()
  procs = [_start(script, 0, 1, 0, 'reversed', devices=8)]
  procs += [_start(script, i, 2, port, 'interleaved', devices=4) for i in (0, 1)]
  one, *two = [_result(p) for p in procs]

  # The mesh really mixes the processes, and the outputs differ between examples (so a
  # misplaced output would show).
  assert two[0]['mesh_processes'] == [1, 0] * 4
  for predictions in one['predictions'].values():
    assert len(set(predictions)) >= 5
  sentiment = np.array(one['rank_scores']['builtin_sentiment'])
  assert sentiment.shape == (11, 2) and len(np.unique(sentiment[:, 0])) >= 8

  for result in two:  # every process returns the full, ordered results
    assert result['predictions'] == one['predictions']
    assert result['rank_scores'].keys() == one['rank_scores'].keys() == {'builtin_sentiment'}
    np.testing.assert_allclose(result['rank_scores']['builtin_sentiment'], sentiment, rtol=1e-5)
    assert result['metrics'] == one['metrics']
  # its headline keys (the prompts/ and normalized/ ones: tests/test_prompt_scores.py)
  assert {k for k in one['metrics']['builtin_sentiment'] if '/' not in k} == {
      'accuracy', 'rank_accuracy'}


def test_length_buckets_give_the_fixed_path_predictions_and_scores():
  """Length-bucketed batches (sorted, padded per bucket, order restored) decode and rank as
  the reference path (every input padded to the full length, each (input, option) pair
  scored as its own example), and the options scored against one encoder pass equal
  `model.score` on each pair; a task's max_target_tokens decodes what a targets length
  of max_target_tokens + 1 (its EOS) would."""
  import dataclasses

  import flax.linen as nn
  import jax
  from t5x_lite import evaluation, models, partitioning
  from t5x_lite.data import eval_inputs, mixtures, pipeline, registry, vocab as vocab_lib
  mesh = partitioning.make_mesh({'data': 2, 'fsdp': -1})
  rules = partitioning.rules_for('fsdp')
  config = models.preset('flan_t5', 'tiny')
  shardings = partitioning.to_shardings(
      partitioning.param_specs(models.logical_axes(config), rules), mesh)
  rng = np.random.default_rng(0)
  params = jax.device_put(jax.tree.map(
      lambda x: rng.normal(0.0, x.shape[0] ** -0.5, x.shape).astype(np.float32),
      nn.unbox(models.abstract_params(config))), shardings)
  short = dataclasses.replace(registry.get('builtin_qa'), name='short_qa', max_target_tokens=2)
  mixture = mixtures.Mixture('buckets', ['builtin_sentiment', short])
  vocab, model = vocab_lib.get_vocabulary('byte'), models.build(config)

  def evaluator(targets=8, **kwargs):
    return evaluation.Evaluator(model, mixture, vocab, evaluation.EvalConfig(
        {'inputs': 256, 'targets': targets}, batch_size=8, max_examples=12, **kwargs),
        mesh, shardings, rules)
  bucketed, fixed = evaluator(), evaluator(length_buckets=False, encode_once=False)
  sentiment, qa = bucketed.tasks
  padded = {b['encoder_input_tokens'].shape[1] for task in ('builtin_sentiment', 'short_qa')
            for b, _ in eval_inputs.eval_batches(bucketed.examples[task], vocab, {
                'inputs': 256, 'targets': 8}, 8, buckets=eval_inputs.bucket_lengths(256))}
  assert len(padded) >= 2 and min(padded) < 256 and bucketed.decode_length(qa) == 3
  predictions = bucketed.predict(params, sentiment)
  assert predictions == fixed.predict(params, sentiment) and len(set(predictions)) >= 3
  assert bucketed.predict(params, qa) == fixed.predict(params, qa) == evaluator(3).predict(
      params, qa)
  scores = bucketed.rank_scores(params, sentiment)
  np.testing.assert_allclose(scores, fixed.rank_scores(params, sentiment), rtol=1e-5)
  examples = bucketed.examples['builtin_sentiment']
  pairs = [(e['inputs'], o) for e in examples for o in e['options']]
  ids = lambda text, n: np.pad(t := pipeline.tokenize(vocab, text, n, 'truncate', '')[0],
                               (0, n - len(t)))
  reencoded = jax.jit(lambda p, i, t: model.score(p, i, t)[0])(
      jax.device_get(params), np.stack([ids(i, 256) for i, _ in pairs]),
      np.stack([ids(o, 8) for _, o in pairs]))
  np.testing.assert_allclose(np.concatenate(scores), reencoded, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.concatenate(fixed.rank_scores(params, sentiment)), reencoded,
                             rtol=1e-6)
