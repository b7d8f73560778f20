"""Prompt tuning's inputs: the soft prompt's ids -1..-n start every example's encoder input,
in packed and padded training rows and in eval batches, within the inputs length."""

import numpy as np
import pytest

from t5x_lite import validation
from t5x_lite.data import eval_inputs, pipeline, tasks, templates, vocab
from t5x_lite.data.pipeline import PipelineConfig
from t5x_lite.data.sources import GeneratedSource

VOCAB = vocab.ByteVocabulary()
PROMPT = [-1, -2, -3]


def batches(prompt_length, inputs=64, pack=True, n=2):
  cfg = PipelineConfig({'inputs': inputs, 'targets': 32}, batch_size=8, pack=pack, prefetch=0,
                       shuffle_window=16, prompt_length=prompt_length)
  it = pipeline.train_iterator('builtin', VOCAB, cfg, 0, 1)
  out = [next(it) for _ in range(n)]
  stats = it.stats
  it.close()
  return out, stats


def test_packed_rows_carry_the_prompt_once_per_segment():
  rows = segments = 0
  for batch in batches(3)[0]:
    tokens, seg, pos = (batch[k] for k in ('encoder_input_tokens', 'encoder_segment_ids',
                                           'encoder_positions'))
    assert ((tokens < 0) <= (seg > 0)).all()          # prompt ids only inside segments
    for r in range(len(tokens)):
      ids = sorted(set(seg[r]) - {0})
      assert len(ids) >= 1
      rows += 1
      for s in ids:
        where = np.flatnonzero(seg[r] == s)
        assert where.tolist() == list(range(where[0], where[0] + len(where)))   # contiguous
        assert tokens[r, where[:3]].tolist() == PROMPT and pos[r, where[:3]].tolist() == [0, 1, 2]
        assert (tokens[r, where[3:]] > 0).all() and tokens[r, where[-1]] == VOCAB.eos_id
        assert pos[r, where].tolist() == list(range(len(where))) and len(where) <= 64
        segments += 1
  assert segments > rows   # some rows hold several examples, each with its own prompt


def test_prompt_takes_its_positions_from_the_text_budget():
  """Unpacked rows with a 3-token prompt in 64 positions are the prompt followed by exactly
  the rows of no prompt in 61 (same truncation, same exemplars dropped), and the prompt
  positions belong to the example's segment."""
  (with_prompt,), stats3 = batches(3, inputs=64, pack=False, n=1)
  (plain,), stats0 = batches(0, inputs=61, pack=False, n=1)
  assert stats3 == stats0 and stats0['exemplars_dropped'] + stats0['inputs_truncated'] > 0
  tokens = with_prompt['encoder_input_tokens']
  assert (tokens[:, :3] == PROMPT).all()
  np.testing.assert_array_equal(tokens[:, 3:], plain['encoder_input_tokens'])
  seg, pos = with_prompt['encoder_segment_ids'], with_prompt['encoder_positions']
  np.testing.assert_array_equal(seg, tokens != 0)
  np.testing.assert_array_equal(pos, np.arange(64) * seg)
  for key in pipeline.FEATURES:
    if key.startswith('decoder'):
      np.testing.assert_array_equal(with_prompt[key], plain[key], err_msg=key)


def test_eval_batches_prefix_and_buckets_hold_prompt_and_text():
  examples = [{'inputs': 'x' * n, 'targets': 'y'} for n in (5, 60, 200, 12)]
  lengths = {'inputs': 96, 'targets': 8}
  def run(prompt_length, buckets=None, batch_size=2):
    return list(eval_inputs.eval_batches(examples, VOCAB, lengths, batch_size, process_index=0,
                                         process_count=1, buckets=buckets,
                                         prompt_length=prompt_length))
  plain = run(0)
  for batch, indices in plain:   # no prompt: today's rows, exactly
    for row, i in zip(batch['encoder_input_tokens'], indices):
      text = VOCAB.encode(examples[i]['inputs'])[:95] + [VOCAB.eos_id]
      np.testing.assert_array_equal(row, np.pad(text, (0, 96 - len(text))))
  for batch, indices in run(3):
    for row, i in zip(batch['encoder_input_tokens'], indices):
      text = VOCAB.encode(examples[i]['inputs'])[:92] + [VOCAB.eos_id]
      assert row[:3].tolist() == PROMPT and row[3:3 + len(text)].tolist() == text
      assert (row[3 + len(text):] == 0).all()
    np.testing.assert_array_equal(batch['encoder_segment_ids'],
                                  batch['encoder_input_tokens'] != 0)
  # Buckets hold prompt + text: 60 characters + EOS + 3 prompt ids = 64 fits the 64 bucket.
  shapes = lambda n: [b['encoder_input_tokens'].shape[1] for b, _ in run(n, (64, 96), 1)]
  assert shapes(0) == shapes(3) == [64, 64, 64, 96]
  assert shapes(4) == [64, 64, 96, 96]


def _same_size_example(rng, split):
  return {'text': 'abcdefghij'[int(rng.integers(10))] * 20, 'answer': 'yes'}


def test_fewshot_prompts_drop_exemplars_to_leave_room_for_the_prompt():
  """Inputs length = one exemplar's prompt + EOS + n: without the prompt two exemplars would
  fit; with it one does, and nothing is cut."""
  template = templates.Template('{text}', '{answer}')
  task = tasks.Task('prompt_fewshot', GeneratedSource(_same_size_example, {'train': 40}),
                    [template], template_mix={'fs_noopt': 1}, num_fewshot=2)
  shot = lambda k: len(templates.format_example(
      template, _same_size_example(np.random.default_rng(0), ''), 'fs_noopt', None,
      [(_same_size_example(np.random.default_rng(0), ''), None)] * k)[0])
  n = shot(2) - shot(1)
  cfg = PipelineConfig({'inputs': shot(1) + 1 + n, 'targets': 8}, batch_size=4, pack=False,
                       prefetch=0, prompt_length=n)
  it = pipeline.train_iterator(task, VOCAB, cfg, 0, 1)
  batch = next(it)
  assert it.stats['exemplars_dropped'] == it.stats['examples'] == 4
  assert it.stats['inputs_truncated'] == 0
  assert (batch['encoder_input_tokens'][:, :n] == vocab.prompt_ids(n)).all()
  assert (batch['encoder_input_tokens'][:, -1] == VOCAB.eos_id).all()
  it.close()


def test_fits_and_overflow_count_the_prompt():
  fits = pipeline.InputFits(VOCAB, 10, prompt_length=3)
  assert fits('abcdef') and not fits('abcdefg')            # 6 + EOS + 3 = 10
  assert pipeline.tokenize(VOCAB, 'abcdef', 10, 'error', 'x', 3)[0].tolist() == (
      PROMPT + VOCAB.encode('abcdef') + [VOCAB.eos_id])
  with pytest.raises(pipeline.DataError, match=r'8 tokens \(with EOS\), longer than the 7 '
                                               r'positions .* beside the 3-token prompt'):
    pipeline.tokenize(VOCAB, 'abcdefg', 10, 'error', 'x', 3)
  ids, cut = pipeline.tokenize(VOCAB, 'abcdefgh', 10, 'truncate', 'x', 3)
  assert len(ids) == 10 and cut == 2 and ids[-1] == VOCAB.eos_id
  np.testing.assert_array_equal(vocab.prompt_ids(3), PROMPT)


def test_a_prompt_that_leaves_no_room_is_a_clear_error():
  for n in (64, 65):
    with pytest.raises(validation.ConfigError, match=f'prompt_length {n} leaves no room for '
                                                     'the text in the inputs length 64'):
      PipelineConfig({'inputs': 64, 'targets': 8}, batch_size=8, prompt_length=n)
  with pytest.raises(validation.ConfigError, match='prompt_length must be an int >= 0'):
    PipelineConfig({'inputs': 64, 'targets': 8}, batch_size=8, prompt_length=-1)
  with pytest.raises(validation.ConfigError, match='leaves no room'):
    next(eval_inputs.eval_batches([{'inputs': 'a', 'targets': 'b'}], VOCAB,
                                  {'inputs': 4, 'targets': 4}, 1, process_index=0,
                                  process_count=1, prompt_length=4))
  PipelineConfig({'inputs': 64, 'targets': 8}, batch_size=8, prompt_length=63)   # EOS fits


def test_evaluator_feeds_the_prompt_and_fits_exemplars_beside_it():
  """The Evaluator's encoder inputs (what predict and rank_scores feed the model) carry the
  prompt, with the rendered text after it; a prompt as long as the inputs fails early."""
  from t5x_lite import evaluation, models, partitioning   # pylint: disable=import-outside-toplevel
  from t5x_lite.data import mixtures   # pylint: disable=import-outside-toplevel
  mesh = partitioning.make_mesh({'data': -1})
  model = models.build(models.preset('flan_t5', 'tiny'))
  mixture = mixtures.Mixture('prompt_eval', ['builtin_sentiment', 'builtin_qa'])
  make = lambda n, length=64: evaluation.Evaluator(
      model, mixture, VOCAB, evaluation.EvalConfig({'inputs': length, 'targets': 8}, batch_size=8,
                                                   max_examples=9, prompt_length=n),
      mesh, None, partitioning.rules_for('dp'))
  evaluator = make(5)
  for task in evaluator.tasks:
    examples = evaluator.examples[task.name]
    tokens = evaluator._in_example_order(   # pylint: disable=protected-access
        lambda params, x: x, None, examples, task.name, ['encoder_input_tokens'])
    for row, example in zip(tokens, examples):
      assert row[:5].tolist() == vocab.prompt_ids(5).tolist()
      assert VOCAB.decode(row[5:]) == VOCAB.decode(VOCAB.encode(example['inputs'])[:58])
      assert evaluator.examples[task.name] is examples
  # Few-shot prompts drop exemplars to fit beside the prompt, as in training.
  inputs = lambda n: [e['inputs'] for e in eval_inputs.eval_examples(
      mixture.tasks[0], 'validation', fits=pipeline.InputFits(VOCAB, 256, n))[:9]]
  rendered = [e['inputs'] for e in make(200, 256).examples['builtin_sentiment']]
  assert rendered == inputs(200) and rendered != inputs(0)
  with pytest.raises(validation.ConfigError, match='prompt_length 64 leaves no room'):
    make(64)


def test_infer_reads_the_prompt_length_from_the_checkpoint_meta():
  from t5x_lite.commands import infer   # pylint: disable=import-outside-toplevel
  from t5x_lite.peft import spec   # pylint: disable=import-outside-toplevel
  assert infer.prompt_length({}) == 0 and infer.prompt_length({'peft': None}) == 0
  assert infer.prompt_length({'peft': spec.AdapterSpec(prompt_length=4).to_json()}) == 4
