"""Objective tasks (span corruption, prefix LM) through the training pipeline: sentinels,
lossless chunks, exact lengths, determinism and resume of per-document examples, file tasks
(T5's merged chunks by default), the built-in raw-text tasks (per document), and their
exclusion from evaluation. Merged chunks: test_merged_objective.py."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from t5x_lite import evaluation, validation
from t5x_lite.data import (builtin_text, file_tasks, mixtures, objectives, pipeline, registry,
                           tasks)
from t5x_lite.data.objective_tasks import Objective
from t5x_lite.data.pipeline import PipelineConfig
from t5x_lite.data.sources import DataError, GeneratedSource
from t5x_lite.data.templates import Template
from t5x_lite.data.vocab import EOS_ID, ByteVocabulary, get_vocabulary

VOCAB = ByteVocabulary()
_WORDS = ('alpha', 'beta', 'gamma', 'delta', 'river', 'stone', 'cloud', 'seven', 'table')


def _doc(rng, split):
  """ASCII documents of 30..900 bytes: up to three 284-token chunks at inputs 256."""
  return {'body': ' '.join(_WORDS[i] for i in rng.integers(len(_WORDS),
                                                           size=int(rng.integers(5, 150)))),
          'answer': 'x'}


def _qa(rng, split):
  return {'q': 'q' * int(rng.integers(1, 30)), 'a': 'a' * int(rng.integers(1, 9))}


def _mixture():
  """Per-document span corruption (merged chunks: test_merged_objective.py)."""
  denoise = tasks.Task('obj_docs', GeneratedSource(_doc, {'train': 64}, seed=3),
                       objective=Objective(text_field='body',
                                           merge_examples_to_reduce_padding=False))
  qa = tasks.Task('obj_qa', GeneratedSource(_qa, {'train': 50}), [Template('{q}', '{a}')])
  return mixtures.Mixture('obj_mix', [(denoise, 3.0), (qa, 1.0)]), denoise


def _config(**kwargs):
  kwargs.setdefault('feature_lengths', {'inputs': 256, 'targets': 64})
  kwargs.setdefault('batch_size', 8)
  kwargs.setdefault('num_data_shards', 1)
  return PipelineConfig(**kwargs)


def _segments(batch, task_id):
  """(inputs, targets) of every packed example of task `task_id` in the batch."""
  out = []
  for row in range(len(batch['encoder_input_tokens'])):
    for seg in sorted(set(batch['decoder_segment_ids'][row]) - {0}):
      dec = batch['decoder_segment_ids'][row] == seg
      if batch['decoder_task_ids'][row][dec][0] == task_id:
        out.append((batch['encoder_input_tokens'][row][batch['encoder_segment_ids'][row] == seg],
                    batch['decoder_target_tokens'][row][dec]))
  return out


def _reconstruct(inputs, targets, sentinel_ids):
  """The chunk: each sentinel of inputs replaced by the tokens after it in targets."""
  assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
  spans, current = {}, None
  for tok in targets[:-1]:
    if tok in sentinel_ids:
      current = spans.setdefault(int(tok), [])
    else:
      current.append(int(tok))
  out = []
  for tok in inputs[:-1]:
    out += spans.pop(int(tok)) if tok in sentinel_ids else [int(tok)]
  assert not spans   # every target span was used
  return out


@pytest.mark.parametrize('pack', [True, False])
def test_span_corruption_in_the_pipeline_reconstructs_chunks_with_the_vocabs_sentinels(pack):
  mixture, denoise = _mixture()
  helper_chunk, helper_targets = objectives.random_spans_helper(256)   # 284, 58
  chunks = {}
  for i in range(denoise.num_examples('train')):
    ids = VOCAB.encode(denoise.text('train', i))
    for k in range(0, len(ids), helper_chunk):
      chunks[tuple(ids[k:k + helper_chunk])] = i
  sentinels = [258 - i for i in range(60)]   # ByT5's: the top byte ids, counting down
  it = pipeline.train_iterator(mixture, VOCAB, _config(pack=pack), 0, 1)
  seen, full = set(), 0
  for _ in range(12):
    for inputs, targets in _segments(next(it), 0):
      used = [t for t in inputs if t > 258 - 60 and t <= 258]
      assert used == sentinels[:len(used)] and used
      assert [t for t in targets if t in sentinels] == used
      chunk = tuple(_reconstruct(list(inputs), list(targets), set(sentinels)))
      assert chunk in chunks          # a chunk of a document, losslessly
      assert VOCAB.decode(chunk) in denoise.text('train', chunks[chunk])
      seen.add(chunk)
      assert len(targets) <= helper_targets and len(inputs) <= 256
      if len(chunk) == helper_chunk:  # a whole chunk fills the inputs exactly (EOS included)
        assert len(inputs) == 256
        full += 1
  assert full >= 10 and len(seen) >= 30
  assert it.stats['inputs_truncated'] == it.stats['targets_truncated'] == 0
  it.close()


def test_same_position_same_example_and_restore_mid_stream_is_identical():
  mixture, denoise = _mixture()
  cfg = _config(seed=5)
  first = pipeline.train_iterator(mixture, VOCAB, cfg, 0, 1)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  expected = [next(first) for _ in range(5)]
  first.close()
  resumed = pipeline.train_iterator(mixture, VOCAB, cfg, 0, 1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  resumed.close()
  # One example: a function of (seed, shard, task, stream position) only; the next visit
  # of the same document (another position, e.g. the next epoch) is corrupted afresh.
  make = pipeline._RenderAndTokenize(denoise, 0, VOCAB, cfg, 0)  # pylint: disable=protected-access
  a, b, c = make(7, 3), make(7, 3), make(7 + 64, 3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a['inputs'], c['inputs'])
  assert list(a) == ['exemplars_dropped', 'inputs', 'inputs_truncated', 'targets',
                     'targets_truncated', 'task_ids']
  assert a['inputs'].dtype == a['task_ids'].dtype == np.int32


def test_t5_sentencepiece_chunks_fill_512_inputs_with_114_targets(shared_data):
  spm = get_vocabulary(str(shared_data / 't5_spiece' / 'spiece.model'))
  objective = Objective()
  text = ' '.join(f'The {w} number {i} is here.' for i, w in enumerate(_WORDS * 60))
  last = len(spm.encode(text)) % 568   # the other chunks are whole: 568 tokens (T5's)
  noise = int(np.round(np.float32(last) * np.float32(0.15)))
  last_inputs = last - noise + max(1, int(np.round(np.float32(noise) / np.float32(3)))) + 1
  rng, lengths = np.random.default_rng(0), set()
  for _ in range(20):
    out = objective.make(text, spm, {'inputs': 512, 'targets': 114}, rng)
    lengths.add(len(out['inputs']))
    assert len(out['targets']) <= 114
    used = [t for t in out['inputs'] if t >= 32000]
    assert used == [spm.extra_id(i) for i in range(len(used))]
    assert used == list(range(32099, 32099 - len(used), -1))
  assert lengths == {512, last_inputs}
  with pytest.raises(validation.ConfigError, match=r'targets of up to 114 tokens.*targets '
                                                   r'length is 100'):
    objective.check_lengths('t', {'inputs': 512, 'targets': 100})


def test_targets_length_check_prompt_and_prefix_lm():
  mixture, denoise = _mixture()
  with pytest.raises(validation.ConfigError, match=r'obj_docs.*inputs length 256 .*284 '
                                                   r'tokens.*up to 58 tokens.*is 32'):
    pipeline.train_iterator(mixture, VOCAB, _config(feature_lengths={'inputs': 256,
                                                                     'targets': 32}), 0, 1)
  # A soft prompt takes 16 of the positions: chunks sized for 240.
  out = denoise.objective.make('word ' * 200, VOCAB, {'inputs': 256, 'targets': 64},
                               np.random.default_rng(1), prompt_length=16)
  assert len(out['inputs']) == 256 and list(out['inputs'][:3]) == [-1, -2, -3]
  # Prefix LM: the chunk (inputs length - 1 tokens) split at a random point.
  plm = Objective('prefix_lm')
  ids = VOCAB.encode('x' * 40)
  out = plm.make('x' * 40, VOCAB, {'inputs': 64, 'targets': 64}, np.random.default_rng(2))
  assert list(out['inputs'][:-1]) + list(out['targets'][:-1]) == ids
  long = plm.make('y' * 500, VOCAB, {'inputs': 64, 'targets': 64}, np.random.default_rng(2))
  assert len(long['inputs']) + len(long['targets']) == 63 + 2
  with pytest.raises(validation.ConfigError, match='kind must be one of'):
    Objective('denoise')
  with pytest.raises(ValueError, match='drop templates'):
    tasks.Task('bad', denoise.source, [Template('{body}')], objective='span_corruption')


def test_file_task_with_an_objective_over_jsonl(tmp_path):
  lines = [{'text': f'Line {i} of a raw text file. ' * (1 + i % 7), 'id': i} for i in range(40)]
  (tmp_path / 'train.jsonl').write_text('\n'.join(json.dumps(r) for r in lines))
  task = file_tasks.file_task('jsonl_spans', {'train': 'train.jsonl'}, data_dir=str(tmp_path),
                              objective='span_corruption', register=False)
  assert task.objective.text_field == 'text' and not task.templates and not task.metric_names
  assert task.objective.merges   # T5's default: 128 lines merged into full chunks
  it = pipeline.train_iterator(task, VOCAB, _config(feature_lengths={'inputs': 128,
                                                                     'targets': 32}), 0, 1)
  batch = next(it)
  it.close()
  assert (batch['decoder_task_ids'][batch['decoder_loss_weights'] > 0] == 0).all()
  with pytest.raises(DataError, match="'body'"):   # every line is checked for the field
    file_tasks.file_task('jsonl_body', {'train': 'train.jsonl'}, data_dir=str(tmp_path),
                         objective='prefix_lm', text_field='body', register=False)
  # Any other source: the field is checked when the pipeline starts.
  wrong = tasks.Task('gen_spans', GeneratedSource(_qa, {'train': 10}), objective='span_corruption')
  with pytest.raises(DataError, match=r"no field 'text'.*it has \['a', 'q'\].*text_field"):
    pipeline.train_iterator(wrong, VOCAB, _config(), 0, 1)
  with pytest.raises(Exception, match='no templates to render'):
    wrong.render('train', 0, np.random.default_rng(0))


@pytest.mark.parametrize('lang', builtin_text.TEXT_LANGUAGES)
def test_builtin_texts_fit_256_32_with_noise_near_015(lang):
  task = registry.get(f'builtin_text_{lang}')
  assert task.language == lang and task.objective.kind == 'span_corruption'
  assert not task.objective.merges   # each text alone: merged chunks need 58 targets at 256
  rng, noise, total = np.random.default_rng(0), 0, 0
  for i in range(0, task.num_examples('train'), 5):
    text = task.text('train', i)
    assert builtin_text.MIN_TEXT_BYTES <= len(text.encode()) <= builtin_text.MAX_TEXT_BYTES
    out = task.objective.make(text, VOCAB, {'inputs': 256, 'targets': 32}, rng)
    assert out['inputs_truncated'] == out['targets_truncated'] == 0
    spans = int(np.sum(out['targets'] >= 248))   # sentinels 258..248: bytes no UTF-8 has
    assert 1 <= spans <= 8
    noise, total = noise + len(out['targets']) - spans - 1, total + len(VOCAB.encode(text))
  assert abs(noise / total - 0.15) < 0.003
  if lang == 'zh':
    assert all('\u4e00' <= c <= '\u9fff' or c in '。' for c in task.text('train', 0))
  else:
    assert {'en': ' the ', 'fr': ' à ', 'de': ' in ', 'es': ' en '}[lang] in ' '.join(
        task.text('train', i) for i in range(20))


def test_builtin_denoise_mixes_with_builtin_at_256_32_without_truncation():
  names = {t.name for t in registry.get('builtin_denoise').tasks}
  assert names == {f'builtin_text_{lang}' for lang in builtin_text.TEXT_LANGUAGES}
  for other in ('builtin', 'builtin_heldout', 'builtin_crosslingual'):
    assert not names & {t.name for t in registry.get(other).tasks}
  mix = mixtures.Mixture('denoise_and_builtin', ['builtin_denoise', 'builtin'])
  it = pipeline.train_iterator(mix, VOCAB, _config(feature_lengths={'inputs': 256,
                                                                    'targets': 32},
                                                   batch_size=16), 0, 1)
  ids = np.concatenate([next(it)['decoder_task_ids'] for _ in range(4)])
  assert it.stats['truncated_examples'] == 0 and it.stats['examples'] > 64
  assert set(range(5)) & set(ids.ravel())    # denoising examples are in the batches
  it.close()


def test_eval_leaves_objective_tasks_out_and_refuses_a_set_of_only_them(caplog):
  with pytest.raises(validation.ConfigError, match=r"'builtin_denoise' has only objective "
                                                   r'tasks.*not decode-evaluated'):
    evaluation.check_split(mixtures.get_mixture('builtin_denoise'), 'validation')
  evaluation.check_split(mixtures.Mixture('m', ['builtin_denoise', 'builtin_qa']), 'validation')
  from t5x_lite import models, partitioning  # pylint: disable=import-outside-toplevel
  mesh, rules = partitioning.make_mesh({'data': 2, 'fsdp': -1}), partitioning.rules_for('fsdp')
  config = models.preset('flan_t5', 'tiny')
  shardings = partitioning.to_shardings(
      partitioning.param_specs(models.logical_axes(config), rules), mesh)
  with caplog.at_level(logging.INFO):
    evaluator = evaluation.Evaluator(
        models.build(config), mixtures.Mixture('m', ['builtin_text_en', 'builtin_qa']),
        VOCAB, evaluation.EvalConfig({'inputs': 256, 'targets': 8}, batch_size=8,
                                     max_examples=4), mesh, shardings, rules)
  assert [t.name for t in evaluator.tasks] == ['builtin_qa']
  assert 'leaves out its objective tasks builtin_text_en' in caplog.text
