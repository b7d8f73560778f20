"""The grain pipeline: batch contract, lossless packing, mixing rates, exact resume, sharding."""

import collections
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from t5x_lite.data import eval_inputs, mixtures, pipeline, tasks, templates, vocab
from t5x_lite.data import iterator as data_iterator
from t5x_lite.data.pipeline import PipelineConfig
from t5x_lite.data.sources import DataError, DataSource, GeneratedSource
from t5x_lite.data.templates import Template

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = vocab.ByteVocabulary()


def short_example(rng, split):
  return {'text': 'short ' + 'a' * int(rng.integers(1, 40)), 'answer': str(rng.integers(100))}


def long_example(rng, split):
  return {'text': 'long ' + 'b' * int(rng.integers(20, 150)),
          'answer': 'y' * int(rng.integers(3, 30))}


def make_mixture(rates=(3.0, 1.0)):
  a = tasks.Task('pipe_short', GeneratedSource(short_example, {'train': 800, 'validation': 23}),
                 [Template('{text}'), Template('Q: {text}')])
  b = tasks.Task('pipe_long', GeneratedSource(long_example, {'train': 600, 'validation': 9}),
                 [Template('{text}')])
  return mixtures.Mixture('pipe_mix', [(a, rates[0]), (b, rates[1])])


def config(**kwargs):
  kwargs.setdefault('feature_lengths', {'inputs': 96, 'targets': 24})
  kwargs.setdefault('batch_size', 8)
  return PipelineConfig(**kwargs)


def take(iterator, n):
  out = [next(iterator) for _ in range(n)]
  iterator.close()
  return out


def segments(batch, row):
  """The (inputs, targets, task) of every packed example in one row."""
  out = []
  for seg in sorted(set(batch['encoder_segment_ids'][row]) - {0}):
    enc = batch['encoder_input_tokens'][row][batch['encoder_segment_ids'][row] == seg]
    dec_mask = batch['decoder_segment_ids'][row] == seg
    dec = batch['decoder_target_tokens'][row][dec_mask]
    task = set(batch['decoder_task_ids'][row][dec_mask])
    assert len(task) == 1
    out.append((tuple(enc), tuple(dec), task.pop()))
  return out


def test_batch_contract_and_shift_inside_segments():
  batch = take(pipeline.train_iterator(make_mixture(), VOCAB, config(), 0, 1), 1)[0]
  assert sorted(batch) == sorted(pipeline.FEATURES)
  for k, x in batch.items():
    assert x.dtype == np.int32 and x.shape == (8, 96 if k.startswith('encoder') else 24), k
  seg, tgt, inp = (batch['decoder_segment_ids'], batch['decoder_target_tokens'],
                   batch['decoder_input_tokens'])
  for r in range(8):
    for t in range(24):
      starts = t == 0 or seg[r, t] != seg[r, t - 1]
      assert inp[r, t] == (0 if starts else tgt[r, t - 1])
    np.testing.assert_array_equal(batch['decoder_loss_weights'][r], seg[r] > 0)
    np.testing.assert_array_equal(batch['decoder_task_ids'][r] >= 0, seg[r] > 0)
    for feature in ('encoder', 'decoder'):
      s, p = batch[f'{feature}_segment_ids'][r], batch[f'{feature}_positions'][r]
      for value in set(s) - {0}:
        idx = np.flatnonzero(s == value)
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))   # contiguous
        np.testing.assert_array_equal(p[idx], np.arange(len(idx)))    # restart at 0
      assert (p[s == 0] == 0).all()
  assert max(len(segments(batch, r)) for r in range(8)) > 1           # really packed
  # every target ends with EOS, every input too (nothing here is long enough to truncate)
  for r in range(8):
    for enc, dec, _ in segments(batch, r):
      assert enc[-1] == VOCAB.eos_id and dec[-1] == VOCAB.eos_id


def test_packing_loses_and_duplicates_nothing():
  """With as many bins as rows, each packed batch holds one contiguous run of the example
  stream: unpacking it must give exactly the same examples as the unpacked pipeline."""
  packed = take(pipeline.train_iterator(make_mixture(), VOCAB,
                                        config(packing_bins=8, seed=5), 0, 1), 6)
  padded_it = pipeline.train_iterator(make_mixture(), VOCAB, config(pack=False, seed=5), 0, 1)
  stream = collections.deque()
  for batch in packed:
    got = collections.Counter(s for r in range(8) for s in segments(batch, r))
    while len(stream) < sum(got.values()):
      plain = next(padded_it)
      stream.extend(segments(plain, r)[0] for r in range(8))
    assert got == collections.Counter(stream.popleft() for _ in range(sum(got.values())))
  padded_it.close()


class _Numbered(DataSource):
  """Example i's target is its index; inputs of varied length, so rows pack 1-4 examples."""

  def __init__(self, n):
    self.n = n

  @property
  def splits(self):
    return ('train',)

  def split(self, name):
    self._check_split(name)
    return [{'text': f'q{i} ' + 'x' * (i * 37 % 60), 'answer': str(i)} for i in range(self.n)]


def _numbered_mixture():
  return mixtures.Mixture('numbered', [
      (tasks.Task('numbered_a', _Numbered(30), [Template('{text}')]), 2.0),
      (tasks.Task('numbered_b', _Numbered(22), [Template('{text}')]), 1.0)])


def _ids(batch, rows):
  """(task, example index) of every packed example in `rows`, from its target text."""
  return [(task, int(VOCAB.decode(dec[:-1]))) for r in rows for _, dec, task in segments(batch, r)]


def test_default_packing_over_two_shards_loses_and_duplicates_nothing_across_set_state():
  """packing_bins=None (2 * shard batch bins, so a packing round spans 2 batches), 2 shards:
  over 50 batches each round emits exactly the examples of one contiguous run of the shard's
  unpacked stream, so every (task, example, epoch) that entered comes out once; a restore from
  get_state() mid-round gives the same batches."""
  cfg = config(num_data_shards=2, seed=21)
  whole = take(pipeline.train_iterator(_numbered_mixture(), VOCAB, cfg, 0, 1), 50)
  it = pipeline.train_iterator(_numbered_mixture(), VOCAB, cfg, 0, 1)
  first = [next(it) for _ in range(25)]                   # 25: in the middle of a round
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  it = pipeline.train_iterator(_numbered_mixture(), VOCAB, cfg, 0, 1)
  it.set_state(state)
  _assert_same_batches(first + take(it, 25), whole)
  rows_per_shard = 8 // 2
  for shard in (0, 1):
    plain = pipeline.train_iterator(_numbered_mixture(), VOCAB,
                                    config(num_data_shards=2, seed=21, pack=False), shard, 2)
    stream, seen, epochs = [], collections.Counter(), []
    pos = 0
    for k in range(0, 50, 2):                              # one packing round = 2 batches
      rows = range(shard * rows_per_shard, (shard + 1) * rows_per_shard)
      out = _ids(whole[k], rows) + _ids(whole[k + 1], rows)
      while len(stream) < pos + len(out):
        for item in _ids(next(plain), range(rows_per_shard)):
          stream.append(item)
          epochs.append(seen[item])
          seen[item] += 1
      assert collections.Counter(out) == collections.Counter(stream[pos:pos + len(out)]), k
      pos += len(out)
    plain.close()
    # The rounds tile stream[:pos] with no gap or overlap: each (task, index, epoch) once.
    assert max(epochs[:pos]) >= 5                          # many epochs of both tasks went by
    assert {t for t, _ in stream[:pos]} == {0, 1}


def test_mixture_proportions_match_rates_over_20k_examples():
  rates = (5.0, 2.0)
  it = pipeline.train_iterator(make_mixture(rates), VOCAB,
                               config(pack=False, batch_size=500, prefetch=0), 0, 1)
  counts = collections.Counter()
  for batch in take(it, 40):
    counts.update(batch['decoder_task_ids'][:, 0].tolist())
  assert sum(counts.values()) == 20_000
  assert counts[0] / 20_000 == pytest.approx(5 / 7, abs=0.02)


def test_same_seed_same_batches_and_other_seed_differs():
  a = take(pipeline.train_iterator(make_mixture(), VOCAB, config(seed=3), 0, 1), 3)
  b = take(pipeline.train_iterator(make_mixture(), VOCAB, config(seed=3), 0, 1), 3)
  c = take(pipeline.train_iterator(make_mixture(), VOCAB, config(seed=4), 0, 1), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x['encoder_input_tokens'], z['encoder_input_tokens'])
             for x, z in zip(a, c))


def test_two_processes_together_give_the_one_process_batches():
  cfg = config(num_data_shards=2, seed=7)
  single = take(pipeline.train_iterator(make_mixture(), VOCAB, cfg, 0, 1), 3)
  hosts = [take(pipeline.train_iterator(make_mixture(), VOCAB, cfg, p, 2), 3) for p in (0, 1)]
  for step in range(3):
    for k in single[step]:
      np.testing.assert_array_equal(
          single[step][k], np.concatenate([hosts[0][step][k], hosts[1][step][k]]))


def _global(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_state_of_two_processes_restores_in_one_and_back():
  """The state is per data shard: saved by 2 processes it resumes in 1, and the reverse,
  with the same next 10 global batches and the same stats."""
  cfg = config(num_data_shards=2, seed=13)
  ref = pipeline.train_iterator(make_mixture(), VOCAB, cfg, 0, 1)
  for _ in range(5):
    next(ref)
  ref_state = ref.get_state()
  expected = take(ref, 10)
  # 2 processes -> 1
  hosts = [pipeline.train_iterator(make_mixture(), VOCAB, cfg, p, 2) for p in (0, 1)]
  for _ in range(5):
    for h in hosts:
      next(h)
  merged = data_iterator.merge_states([h.get_state() for h in hosts])
  assert merged == json.loads(json.dumps(ref_state))
  for h in hosts:
    h.close()
  one = pipeline.train_iterator(make_mixture(), VOCAB, cfg, 0, 1)
  one.set_state(merged)
  _assert_same_batches(take(one, 10), expected)
  assert one.stats == ref.stats and one.batches == 15
  # 1 process -> 2: each takes its own shard from the whole state
  hosts = [pipeline.train_iterator(make_mixture(), VOCAB, cfg, p, 2) for p in (0, 1)]
  for h in hosts:
    h.set_state(ref_state)
  _assert_same_batches([_global(parts) for parts in zip(*(take(h, 10) for h in hosts))],
                       expected)
  assert {k: hosts[0].stats[k] + hosts[1].stats[k] for k in ref.stats} == ref.stats
  # Another shard count is another stream: refused, naming both counts and the fix.
  other = pipeline.train_iterator(make_mixture(), VOCAB, config(num_data_shards=4, seed=13), 0, 1)
  with pytest.raises(DataError, match=r'has 2 data shards, this run reads 4.*num_data_shards=2'):
    other.set_state(ref_state)
  other.close()


RESUME_SCRIPT = """
import json, sys, hashlib
import numpy as np
sys.path.insert(0, {repo!r})
from tests.data.test_pipeline import make_mixture, config, VOCAB
from t5x_lite.data import pipeline
it = pipeline.train_iterator(make_mixture(), VOCAB, config(seed=11), 0, 1)
mode = sys.argv[1]
if mode == 'save':
  for _ in range(7):
    next(it)
  print(json.dumps(it.get_state()))
else:
  it.set_state(json.loads(sys.stdin.read()))
out = []
for _ in range(20):
  b = next(it)
  out.append(hashlib.sha256(b''.join(b[k].tobytes() for k in sorted(b))).hexdigest())
print(json.dumps(out))
print(json.dumps(it.stats))
it.close()
"""


def test_resume_in_a_new_process_reproduces_the_next_20_batches(tmp_path):
  script = tmp_path / 'resume.py'
  script.write_text(RESUME_SCRIPT.format(repo=REPO))

  def run(mode, stdin=''):
    out = subprocess.run([sys.executable, str(script), mode], input=stdin, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()

  state, expected, stats = run('save')
  assert json.loads(state)['batches'] == 7
  resumed, resumed_stats = run('restore', state)
  assert resumed == expected and len(set(json.loads(expected))) == 20
  assert resumed_stats == stats


def test_truncation_is_counted_and_reported(caplog):
  cfg = config(feature_lengths={'inputs': 40, 'targets': 24})
  pipeline._warned.clear()  # warnings are once per task and feature per process
  with caplog.at_level(logging.WARNING):
    it = pipeline.train_iterator(make_mixture(), VOCAB, cfg, 0, 1)
    batches = take(it, 3)
  assert it.stats['inputs_truncated'] > 0 and it.stats['truncated_examples'] > 0
  assert 0 < it.stats['truncated_examples'] <= it.stats['examples']
  assert 'inputs truncated to 40 tokens' in caplog.text
  assert all(b['encoder_input_tokens'].shape == (8, 40) for b in batches)


def test_tokenize_trims_to_length_minus_one_then_appends_eos():
  """seqio's append_eos_after_trim: text tokens cut to length - 1, then EOS."""
  ids, cut = pipeline.tokenize(VOCAB, 'abcdef', 4, 'truncate', 'x')
  assert ids.tolist() == VOCAB.encode('abc') + [VOCAB.eos_id] and cut == 3
  ids, cut = pipeline.tokenize(VOCAB, 'abc', 4, 'truncate', 'x')      # fits exactly
  assert ids.tolist() == VOCAB.encode('abc') + [VOCAB.eos_id] and cut == 0
  ids, cut = pipeline.tokenize(VOCAB, 'abcd', 4, 'truncate', 'x')     # one token too many
  assert ids.tolist() == VOCAB.encode('abc') + [VOCAB.eos_id] and cut == 1


def _last_tokens(tokens):
  return [row[row > 0][-1] for row in tokens]


def test_truncated_inputs_and_targets_end_with_eos_in_training_and_eval():
  lengths = {'inputs': 40, 'targets': 8}
  it = pipeline.train_iterator(make_mixture(), VOCAB, config(feature_lengths=lengths, pack=False),
                               0, 1)
  batches = take(it, 4)
  assert it.stats['inputs_truncated'] > 0 and it.stats['targets_truncated'] > 0
  full = {'encoder': 0, 'decoder': 0}
  for b in batches:
    for side, key in (('encoder', 'encoder_input_tokens'), ('decoder', 'decoder_target_tokens')):
      assert all(t == VOCAB.eos_id for t in _last_tokens(b[key])), side
      full[side] += int((b[key][:, -1] == VOCAB.eos_id).sum())    # truncated rows end with EOS
  assert full['encoder'] > 0 and full['decoder'] > 0
  examples = [{'inputs': 'x' * 100, 'targets': 'y' * 30}, {'inputs': 'short', 'targets': 'z'}]
  batch, _ = next(eval_inputs.eval_batches(examples, VOCAB, lengths, batch_size=2, process_index=0,
                                        process_count=1))
  assert batch['encoder_input_tokens'][0].tolist() == VOCAB.encode('x' * 39) + [VOCAB.eos_id]
  assert batch['decoder_target_tokens'][0].tolist() == VOCAB.encode('y' * 7) + [VOCAB.eos_id]
  assert _last_tokens(batch['encoder_input_tokens'])[1] == VOCAB.eos_id


def test_fit_exemplars_drops_the_fewest_longest_first_and_keeps_their_order():
  template = Template('{text}', '{answer}')
  shots = [({'text': 'a' * 50, 'answer': 'x'}, None), ({'text': 'bbbbb', 'answer': 'x'}, None),
           ({'text': 'ccccc', 'answer': 'x'}, None)]
  query = {'text': 'q' * 10, 'answer': 'y'}
  fit = lambda limit: templates.fit_exemplars(template, query, 'fs_noopt', None, shots,
                                              lambda text: len(text) <= limit)
  assert fit(100)[0].startswith('a' * 50) and fit(100)[2] == 0
  assert fit(40) == ('bbbbb\nx\n\nccccc\nx\n\n' + 'q' * 10, 'y', 1)
  assert fit(20) == ('ccccc\nx\n\n' + 'q' * 10, 'y', 2)
  assert fit(5) == ('q' * 10, 'y', 3)        # the tokenizer truncates what is left


def _fewshot_example(rng, split):
  # Every example renders to the same number of bytes, so the prompt length per exemplar count
  # is known exactly.
  return {'text': 'review ' + 'abcdefghij'[int(rng.integers(10))] * 20,
          'answer': ['left', 'rite'][int(rng.integers(2))]}


def test_fewshot_prompts_drop_exemplars_before_the_question_is_cut():
  options = ['left', 'rite']
  template = Template('{text}\nWhich side?{options_}')
  task = tasks.Task('pipe_fewshot', GeneratedSource(_fewshot_example, {'train': 50}), [template],
                    options=options, template_mix={'fs_opt': 1}, num_fewshot=3)
  sample = [task.example('train', i) for i in range(4)]
  prompt = lambda k: templates.format_example(template, sample[0], 'fs_opt', options,
                                              [(s, options) for s in sample[1:1 + k]])[0]
  sizes = [len(prompt(k).encode()) for k in range(4)]
  # Room for one exemplar (with EOS), not two: every prompt keeps one and drops two.
  cfg = config(feature_lengths={'inputs': sizes[1] + 1, 'targets': 8}, pack=False)
  it = pipeline.train_iterator(task, VOCAB, cfg, 0, 1)
  batches = take(it, 3)
  assert it.stats['exemplars_dropped'] == 2 * it.stats['examples'] == 48
  assert it.stats['inputs_truncated'] == 0
  for b in batches:
    for row in b['encoder_input_tokens']:
      assert row[-1] == VOCAB.eos_id
      text = VOCAB.decode(row[:-1])
      assert text.count('OPTIONS:') == 2 and text.count('review ') == 2
      assert text.endswith('\nWhich side?' + templates.options_block(options))
  # No room even for the question: all exemplars go, then the prompt is cut (EOS last).
  cfg = config(feature_lengths={'inputs': sizes[0], 'targets': 8}, pack=False)
  it = pipeline.train_iterator(task, VOCAB, cfg, 0, 1)
  b = take(it, 1)[0]
  assert it.stats['exemplars_dropped'] == 3 * 8 and it.stats['inputs_truncated'] == 8
  assert (b['encoder_input_tokens'][:, -1] == VOCAB.eos_id).all()
  assert all(VOCAB.decode(r[:-1]).count('review ') == 1 for r in b['encoder_input_tokens'])


def test_overflow_error_names_task_example_and_fix():
  cfg = config(feature_lengths={'inputs': 40, 'targets': 24}, overflow='error', prefetch=0)
  it = pipeline.train_iterator(make_mixture(), VOCAB, cfg, 0, 1)
  with pytest.raises(DataError, match=r'task pipe_long train\[\d+\] inputs: \d+ tokens \(with '
                                      r'EOS\), longer than the feature length 40\. Raise '
                                      r'TASK_FEATURE_LENGTHS'):
    take(it, 5)


def test_bad_configurations_fail_before_reading():
  with pytest.raises(KeyError, match="unknown task or mixture 'no_such_mixture'"):
    pipeline.train_iterator('no_such_mixture', VOCAB, config(), 0, 1)
  with pytest.raises(DataError, match='batch size 8 is not divisible by the 3 data shards'):
    pipeline.train_iterator(make_mixture(), VOCAB, config(num_data_shards=3), 0, 1)
  with pytest.raises(DataError, match="has no 'test' split"):
    pipeline.train_iterator(make_mixture(), VOCAB, config(split='test'), 0, 1)
  with pytest.raises(ValueError, match="exactly 'inputs' and 'targets'"):
    config(feature_lengths={'inputs': 8})


def test_eval_batches_cover_every_example_once_with_marked_padding():
  task = make_mixture().tasks[0]
  examples = eval_inputs.eval_examples(task, 'validation')
  assert len(examples) == 23 and examples == eval_inputs.eval_examples(task, 'validation')
  seen = []
  for p in (0, 1):
    for batch, indices in eval_inputs.eval_batches(examples, VOCAB, {'inputs': 96, 'targets': 24},
                                                batch_size=8, process_index=p, process_count=2):
      assert batch['encoder_input_tokens'].shape == (4, 96)
      assert (batch['encoder_input_tokens'][indices < 0] == 0).all()
      assert (batch['decoder_task_ids'][indices < 0] == -1).all()
      for row, i in zip(batch['encoder_input_tokens'], indices):
        if i >= 0:
          assert VOCAB.decode(row) == examples[i]['inputs']
      seen += indices.tolist()
  assert sorted(i for i in seen if i >= 0) == list(range(23)) and seen.count(-1) == 1


def test_bucketed_eval_batches_sort_by_length_and_agree_across_processes():
  """Length buckets: inputs in order of length, each batch padded to the shortest bucket
  holding its longest; both processes get the same number of batches of the same shapes,
  and together every example once."""
  sizes = [60, 5, 90, 12, 40, 7, 30, 100, 3, 20, 15, 8, 25, 50, 70, 2, 10, 33, 45, 80, 11, 300]
  examples = [{'inputs': 'x' * n, 'targets': 'y'} for n in sizes]   # 300, 100: cut to 96
  lengths = {'inputs': 96, 'targets': 8}
  assert eval_inputs.bucket_lengths(96, 16) == (16, 32, 64, 96)
  assert eval_inputs.bucket_lengths(512) == (64, 128, 256, 512)   # the default minimum: 64
  assert eval_inputs.bucket_lengths(96) == (64, 96) and eval_inputs.bucket_lengths(48) == (48,)
  runs = [list(eval_inputs.eval_batches(examples, VOCAB, lengths, 8, process_index=p,
                                     process_count=2, buckets=eval_inputs.bucket_lengths(96, 16)))
          for p in (0, 1)]
  assert len(runs[0]) == len(runs[1]) == 3
  shapes = [[b['encoder_input_tokens'].shape for b, _ in run] for run in runs]
  assert shapes[0] == shapes[1] == [(4, 16), (4, 64), (4, 96)]   # longest: 13, 51, 96
  order, sizes = [], []
  for g in range(3):
    for p in (0, 1):
      batch, indices = runs[p][g]
      for row, i in zip(batch['encoder_input_tokens'], indices):
        order.append(i)
        if i >= 0:
          sizes.append(min(len(examples[i]['inputs']) + 1, 96))
          assert VOCAB.decode(row) == examples[i]['inputs'][:95] and row[sizes[-1] - 1] == 1
  assert sorted(i for i in order if i >= 0) == list(range(22)) and order[-2:] == [-1, -1]
  assert sizes == sorted(sizes)
  with pytest.raises(ValueError, match=r'must ascend to the inputs length 96'):
    next(eval_inputs.eval_batches(examples, VOCAB, lengths, 8, process_index=0, process_count=1,
                               buckets=(16, 64)))
  # options: [examples, most options, bucketed length], zeros where an example has fewer
  options, mask = eval_inputs.option_targets(
      [{'options': ['yes', 'no']}, {'options': ['maybe']}], VOCAB, lengths)
  assert options.shape == (2, 2, 8) and options[1, 1].sum() == 0   # 'maybe' + EOS: 6 -> 8
  assert (mask == (options > 0)).all()   # T5's ids: the mask is the nonzero ids
  fixed, _ = eval_inputs.option_targets([{'options': ['yes', 'no']}, {'options': ['maybe']}],
                                        VOCAB, {'inputs': 96, 'targets': 24}, bucketed=False)
  assert fixed.shape == (2, 2, 24) and (fixed[..., :8] == options).all()
  assert options[0, 0, :4].tolist() == VOCAB.encode('yes') + [1] and options[0, 0, 4:].sum() == 0
