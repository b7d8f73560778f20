"""T5's merged span corruption (merged_objective.py): over short documents every chunk but a
window's last is full, with T5's noise and span counts; chunks reconstruct the concatenated
window exactly; resume is bitwise (the task's stream, the mixed and packed pipeline, one and
two data shards, a scheduled mixture); mixing rates count chunks; lengths are checked."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from t5x_lite import validation
from t5x_lite.data import merged_objective, mixtures, objectives, pipeline, schedules, tasks
from t5x_lite.data.objective_tasks import Objective
from t5x_lite.data.pipeline import PipelineConfig
from t5x_lite.data.sources import DataError, GeneratedSource
from t5x_lite.data.templates import Template
from t5x_lite.data.vocab import EOS_ID, ByteVocabulary

VOCAB = ByteVocabulary()
LENGTHS = {'inputs': 128, 'targets': 32}
SENTINELS = {258 - i for i in range(60)}   # ByT5's: the top byte ids (no ASCII byte is one)


def _short(rng, split):
  """5..20 lowercase letters: short documents (bytes 97..122, ids 100..125)."""
  return {'text': ''.join(chr(c) for c in rng.integers(97, 123, size=int(rng.integers(5, 21))))}


def _qa(rng, split):
  return {'q': 'q' * int(rng.integers(1, 30)), 'a': 'a' * int(rng.integers(1, 9))}


def _docs(name='m_docs', **objective):
  return tasks.Task(name, GeneratedSource(_short, {'train': 500}, seed=4),
                    objective=Objective(**objective))


QA = tasks.Task('m_qa', GeneratedSource(_qa, {'train': 50}), [Template('{q}', '{a}')])


def _config(**kwargs):
  kwargs.setdefault('feature_lengths', LENGTHS)
  kwargs.setdefault('batch_size', 8)
  kwargs.setdefault('num_data_shards', 1)
  return PipelineConfig(**kwargs)


def _task_iterator(task, cfg):
  """The task's merged stream in shard 0 of 1 (as pipeline._shard_dataset builds it)."""
  documents = grain.MapDataset.range(task.num_examples('train')).shuffle(seed=cfg.seed * 7919)
  render = pipeline._RenderAndTokenize(task, 0, VOCAB, cfg, 0)  # pylint: disable=protected-access
  return iter(merged_objective.MergedObjectiveIterDataset(documents.repeat(), len(documents),
                                                          render))


def _undo(inputs, targets):
  """The raw chunk: each sentinel of the inputs replaced by its span in the targets, and
  (noise tokens, spans)."""
  assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
  spans, current = {}, None
  for tok in targets[:-1]:
    if tok in SENTINELS:
      current = spans.setdefault(int(tok), [])
    else:
      current.append(int(tok))
  out = []
  for tok in inputs[:-1]:
    out += spans[int(tok)] if tok in SENTINELS else [int(tok)]
  return out, sum(len(s) for s in spans.values()), len(spans)


def _full_chunk_counts(length, density=0.15, mean=3.0):
  """T5's random_spans_noise_mask arithmetic (float32) on `length` tokens."""
  f32 = np.float32
  noise = min(max(int(np.round(f32(length) * f32(density))), 1), length - 1)
  return noise, max(int(np.round(f32(noise) / f32(mean))), 1)


def test_short_documents_make_full_chunks_with_t5s_noise_and_reconstruct_the_window():
  task, cfg = _docs(), _config()
  chunk, targets_length = objectives.random_spans_helper(LENGTHS['inputs'])   # 141, 29
  want_noise, want_spans = _full_chunk_counts(chunk)                         # 21, 7
  it = _task_iterator(task, cfg)
  windows: dict[int, list] = {}
  noise_total = spans_total = tokens_total = full = 0
  for _ in range(130):
    example = next(it)
    state = it.get_state()
    raw, noise, spans = _undo(list(example['inputs']), list(example['targets']))
    windows.setdefault(state['window'], []).append((state['piece'] - 1, raw))
    assert len(example['targets']) <= targets_length and len(example['inputs']) <= 128
    assert example['inputs_truncated'] == example['targets_truncated'] == 0
    if len(raw) == chunk:   # a full chunk: exactly T5's counts, inputs filling the length
      assert (noise, spans, len(example['inputs'])) == (want_noise, want_spans, 128)
      full += 1
    noise_total, spans_total, tokens_total = (noise_total + noise, spans_total + spans,
                                              tokens_total + len(raw))
  # 128 documents of 5..20 tokens (~1,600) a window: ~11 full chunks, then a shorter one.
  assert len(windows) >= 10 and full >= 0.85 * 130
  assert abs(noise_total / tokens_total - want_noise / chunk) < 0.001   # 0.1490 (21/141)
  assert abs(noise_total / spans_total - want_noise / want_spans) < 0.02   # 3.003 (21/7)
  for w in sorted(windows)[:-1]:     # every complete window: its documents, concatenated
    pieces = windows[w]
    assert [j for j, _ in pieces] == list(range(len(pieces)))
    assert all(len(raw) == chunk for _, raw in pieces[:-1]) and len(pieces[-1][1]) <= chunk
    text = [t for i in it.window_documents(w) for t in VOCAB.encode(task.text('train', i))]
    assert [t for _, raw in pieces for t in raw] == text
  # Per document (the option, as before): each 5..20-token text masked alone.
  per_doc = _docs(merge_examples_to_reduce_padding=False).objective
  rng, noise_total, spans_total, tokens_total = np.random.default_rng(0), 0, 0, 0
  for i in range(300):
    ids = VOCAB.encode(task.text('train', i))
    out = per_doc.make(task.text('train', i), VOCAB, LENGTHS, rng)
    raw, noise, spans = _undo(list(out['inputs']), list(out['targets']))
    assert raw == ids and (noise, spans) == _full_chunk_counts(len(ids))
    noise_total, spans_total, tokens_total = (noise_total + noise, spans_total + spans,
                                              tokens_total + len(raw))
  assert noise_total / spans_total < 2.0    # spans of 1.96 tokens, not T5's 3


def test_the_stream_resumes_bitwise_mid_window_and_seeds_by_window_and_piece():
  task, cfg = _docs(concat_documents=16), _config(seed=3)
  it = _task_iterator(task, cfg)
  first = [next(it) for _ in range(7)]
  state = json.loads(json.dumps(it.get_state()))
  assert state['piece'] > 0        # mid-window (16 short documents: 1-3 chunks a window)
  expected = [next(it) for _ in range(10)]
  resumed = _task_iterator(task, cfg)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert list(got) == ['exemplars_dropped', 'inputs', 'inputs_truncated', 'targets',
                         'targets_truncated', 'task_ids']
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  again = _task_iterator(task, cfg)
  assert all(np.array_equal(next(again)['inputs'], f['inputs']) for f in first)
  other = _task_iterator(task, _config(seed=4))
  assert not all(np.array_equal(next(other)['inputs'], f['inputs']) for f in first)


def _walk(state):
  """Every merged stream state ({'window', 'piece'}) inside a pipeline state."""
  if isinstance(state, dict):
    if set(state) == {'window', 'piece'}:
      yield state
    for v in state.values():
      yield from _walk(v)
  elif isinstance(state, list):
    for v in state:
      yield from _walk(v)


def _assert_resumes(mixture, cfg, save_at=6, steps=12, mid_window=True):
  it = pipeline.train_iterator(mixture, VOCAB, cfg, 0, 1)
  batches, states = [], []
  for _ in range(steps):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  it.close()
  # The shuffle restarts from its window's start state: small windows put that mid-window.
  assert any(s['piece'] > 0 for s in _walk(states[save_at])) == mid_window
  resumed = pipeline.train_iterator(mixture, VOCAB, cfg, 0, 1)
  resumed.set_state(states[save_at])
  for step in range(save_at, steps):
    got = next(resumed)
    for k in batches[step]:
      np.testing.assert_array_equal(got[k], batches[step][k], err_msg=f'{step} {k}')
  resumed.close()
  return batches


@pytest.mark.parametrize('pack,shards', [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_the_mixed_pipeline_resumes_bitwise(pack, shards):
  mixture = mixtures.Mixture('merged_mix', [(_docs(), 1.0), (QA, 1.0)])
  batches = _assert_resumes(mixture, _config(pack=pack, num_data_shards=shards,
                                             shuffle_window=16))
  ids = np.concatenate([b['decoder_task_ids'] for b in batches])
  assert {0, 1} <= set(ids.ravel())


def test_rates_count_chunks_exactly_and_the_default_window_shuffle_works():
  docs = _docs()
  mixture = mixtures.Mixture('merged_rates', [(docs, 1.0), (QA, 3.0)])
  it = pipeline.train_iterator(mixture, VOCAB, _config(batch_size=100, pack=False,
                                                       prefetch=0), 0, 1)
  counts = np.zeros(2, int)
  for _ in range(10):     # 1,000 examples: one whole shuffle window (the default 1000)
    ids = next(it)['decoder_task_ids'][:, 0]
    counts += np.bincount(ids, minlength=2)
  assert list(counts) == [250, 750]   # 250 chunks (~2,800 documents) to 750 QA examples
  assert it.stats['examples'] == 1000 and it.stats['truncated_examples'] == 0
  it.close()


@pytest.mark.parametrize('pack', [True, False])
def test_a_scheduled_mixture_with_a_merged_task_resumes_bitwise(pack):
  mixture = mixtures.Mixture(
      'merged_staged', [_docs(), QA],
      rate_schedule=schedules.Stages([(4, {'m_docs': 1, 'm_qa': 1}), (None, {'m_docs': 1})]))
  batches = _assert_resumes(mixture, _config(pack=pack, num_data_shards=2), save_at=4)
  assert {0, 1} <= set(np.concatenate([b['decoder_task_ids'] for b in batches[:4]]).ravel())
  assert set(np.concatenate([b['decoder_task_ids'] for b in batches[7:]]).ravel()) <= {-1, 0}
  # The state names the merged task's stream: a mixture without it refuses that state.
  state = json.loads(json.dumps(pipeline.train_iterator(
      mixture, VOCAB, _config(pack=pack, num_data_shards=2), 0, 1).get_state()))
  per_doc = mixtures.Mixture('merged_staged', [_docs(merge_examples_to_reduce_padding=False),
                                               QA], rate_schedule=mixture.rate_schedule)
  plain = pipeline.train_iterator(per_doc, VOCAB, _config(pack=pack, num_data_shards=2), 0, 1)
  with pytest.raises(DataError, match='changed since the checkpoint'):
    plain.set_state(state)
  plain.close()


def test_lengths_defaults_and_errors():
  assert Objective().merges and not Objective('prefix_lm').merges   # T5's defaults
  assert Objective(concat_documents=4).describe().startswith(
      'span_corruption (noise density 0.15, mean span 3; 4 documents merged')
  # Texts of at most 151 tokens: one alone needs 32 targets at inputs 256, merged chunks 58.
  alone = Objective(max_text_tokens=151, merge_examples_to_reduce_padding=False)
  merged = Objective(max_text_tokens=151)
  assert (alone.targets_needed(256), merged.targets_needed(256)) == (32, 58)
  assert Objective(max_text_tokens=20, concat_documents=2).longest_chunk(256) == 40
  with pytest.raises(validation.ConfigError, match=r'284 tokens, 128 texts merged: '
                                                   r'merge_examples_to_reduce_padding=False.*'
                                                   r'up to 58 tokens.*is 32'):
    merged.check_lengths('t', {'inputs': 256, 'targets': 32})
  alone.check_lengths('t', {'inputs': 256, 'targets': 32})
  for bad in ({'concat_documents': 0}, {'concat_documents': 2.0},
              {'merge_examples_to_reduce_padding': 'yes'}):
    with pytest.raises(validation.ConfigError):
      Objective(**bad)
  # A task whose every text is empty gives no chunk: an error, not an endless loop.
  empty = tasks.Task('m_empty', GeneratedSource(lambda rng, split: {'text': ''}, {'train': 40}),
                     objective='span_corruption')
  with pytest.raises(DataError, match='every train text .* is empty'):
    next(_task_iterator(empty, _config()))
