"""Feature converters: the decoder-only (prefix-LM) contract against seqio's definitions
(google/seqio seqio/feature_converters.py @ b898b9f992877cea2cda40dbc03597ea5cd4b08f,
PrefixLMFeatureConverter's docstring examples), and the pipeline with either converter."""

import numpy as np
import pytest

from t5x_lite import validation
from t5x_lite.data import mixtures, pipeline, tasks, vocab
from t5x_lite.data.feature_converters import (DECODER_ONLY_FEATURES, ENC_DEC_FEATURES,
                                              DecoderOnlyFeatureConverter, EncDecFeatureConverter)
from t5x_lite.data.objective_tasks import Objective
from t5x_lite.data.pipeline import PipelineConfig
from t5x_lite.data.sources import GeneratedSource

VOCAB = vocab.ByteVocabulary()   # T5's ids: PAD 0, EOS 1, no BOS -> decoder start 0 (seqio's)


class _BosVocab(vocab.ByteVocabulary):
  """A vocabulary whose template prepends BOS, with PAD not 0 (as HF tokenizers can have)."""
  pad_id, bos_id, add_bos = 7, 5, True


class _NoBosVocab(vocab.ByteVocabulary):
  """A Hugging Face vocabulary without BOS (Qwen's): no start id."""
  pad_id, pad_starts_sequences = 7, False


def _example(inputs, targets, task=0):
  return {'inputs': np.asarray(inputs, np.int32), 'targets': np.asarray(targets, np.int32),
          'task_ids': np.full(len(targets), task + 1, np.int32), 'exemplars_dropped': np.int32(0),
          'inputs_truncated': np.int32(0), 'targets_truncated': np.int32(0)}


def _pack_by_hand(rows, length):
  """What grain's first-fit packing returns for these examples in one bin, in order."""
  out = {k: np.zeros(length, np.int32) for k in ('targets', 'task_ids', 'inputs_width',
                                                  'start_ids', 'targets_segment_ids',
                                                  'targets_positions')}
  at = 0
  for seg, r in enumerate(rows, 1):
    n = len(r['targets'])
    for k in ('targets', 'task_ids', 'inputs_width', 'start_ids'):
      out[k][at:at + n] = r[k]
    out['targets_segment_ids'][at:at + n] = seg
    out['targets_positions'][at:at + n] = np.arange(n)
    at += n
  for k in ('inputs_truncated', 'targets_truncated', 'exemplars_dropped'):
    out[k] = [r[k] for r in rows]
  return out


def _convert(conv, examples, lengths, packed, v=VOCAB):
  rows = [conv.example(e, v) for e in examples]
  if packed:
    rows = [_pack_by_hand(rows, sum(lengths.values()))]
  finish = conv.finish_row(lengths, packed)
  rows = [finish(r) for r in rows]
  batch = conv.to_contract(v)({k: np.stack([r[k] for r in rows]) for k in rows[0]})
  return {k: batch[k].tolist() for k in DECODER_ONLY_FEATURES}, batch


def test_packed_prefix_lm_is_seqio_example_1():
  # seqio PrefixLMFeatureConverter docstring, Example 1 (packed), lengths inputs 7 targets 8.
  got, batch = _convert(DecoderOnlyFeatureConverter(),
                        [_example([7, 8, 5, 1], [3, 9, 1]), _example([8, 4, 9, 3, 1], [4, 1], 2)],
                        {'inputs': 7, 'targets': 8}, packed=True)
  assert got['decoder_target_tokens'] == [[7, 8, 5, 1, 3, 9, 1, 8, 4, 9, 3, 1, 4, 1, 0]]
  assert got['decoder_input_tokens'] == [[0, 7, 8, 5, 1, 3, 9, 0, 8, 4, 9, 3, 1, 4, 0]]
  assert got['decoder_loss_weights'] == [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0]]
  assert got['decoder_positions'] == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0]]
  assert got['decoder_segment_ids'] == [[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0]]
  assert got['decoder_causal_attention'] == [[1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]]
  assert got['decoder_task_ids'] == [[0] * 7 + [2] * 7 + [-1]]
  assert batch['stats/examples'].tolist() == [2]


def test_unpadded_prefix_lm_is_seqio_example_2_but_for_padding():
  # seqio Example 2 (unpacked, inputs 10 targets 4): the same arrays, except that seqio's
  # decoder_input_tokens carry the last EOS into the first padding position (we put PAD).
  got, _ = _convert(DecoderOnlyFeatureConverter(), [_example([9, 4, 6, 1], [3, 9, 1])],
                    {'inputs': 10, 'targets': 4}, packed=False)
  assert got['decoder_target_tokens'] == [[9, 4, 6, 1, 3, 9, 1] + [0] * 7]
  assert got['decoder_input_tokens'] == [[0, 9, 4, 6, 1, 3, 9] + [0] * 7]
  assert got['decoder_loss_weights'] == [[0, 0, 0, 0, 1, 1, 1] + [0] * 7]
  assert got['decoder_causal_attention'] == [[1, 1, 1, 1, 1, 0, 0] + [0] * 7]
  assert got['decoder_segment_ids'] == [[1] * 7 + [0] * 7]
  assert got['decoder_positions'] == [list(range(7)) + [0] * 7]


def test_full_sequence_loss_causal_mask_and_dropped_inputs_eos():
  examples = [_example([7, 8, 5, 1], [3, 9, 1]), _example([8, 4, 9, 3, 1], [4, 1])]
  lengths = {'inputs': 7, 'targets': 8}
  full, _ = _convert(DecoderOnlyFeatureConverter(loss_on_targets_only=False, prefix_lm=False),
                     examples, lengths, packed=True)
  assert full['decoder_loss_weights'] == [[1] * 14 + [0]]     # every real token
  assert full['decoder_causal_attention'] == [[0] * 15]
  chat, _ = _convert(DecoderOnlyFeatureConverter(inputs_eos=False), examples, lengths, True)
  assert chat['decoder_target_tokens'] == [[7, 8, 5, 3, 9, 1, 8, 4, 9, 3, 4, 1, 0, 0, 0]]
  assert chat['decoder_loss_weights'] == [[0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]]
  assert chat['decoder_causal_attention'] == [[1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0]]


def test_empty_inputs_are_a_causal_lm_example_as_seqio_swaps_width_0():
  # seqio replaces inputs_width 0 by -1 around packing, so inputs_width_add_pos stays 1:
  # an example without inputs has causal attention at its first position only.
  got, _ = _convert(DecoderOnlyFeatureConverter(), [_example([], [3, 9, 1]), _example([4], [5, 1])],
                    {'inputs': 2, 'targets': 4}, packed=True)
  assert got['decoder_causal_attention'] == [[1, 0, 0, 1, 1, 0]]
  assert got['decoder_loss_weights'] == [[1, 1, 1, 0, 1, 1]]


def test_bos_starts_every_segment_and_pad_fills_padding():
  got, _ = _convert(DecoderOnlyFeatureConverter(),
                    [_example([7, 8, 1], [3, 1]), _example([9, 1], [4, 1])],
                    {'inputs': 4, 'targets': 6}, packed=True, v=_BosVocab())
  assert got['decoder_target_tokens'] == [[7, 8, 1, 3, 1, 9, 1, 4, 1, 7]]
  assert got['decoder_input_tokens'] == [[5, 7, 8, 1, 3, 5, 9, 1, 4, 7]]
  unpacked, _ = _convert(DecoderOnlyFeatureConverter(), [_example([0, 1], [0, 1])],
                         {'inputs': 3, 'targets': 3}, packed=False, v=_BosVocab())
  # token id 0 is a real token here: padding is told by the task ids, not by token values
  assert unpacked['decoder_segment_ids'] == [[1, 1, 1, 1, 0, 0]]
  assert unpacked['decoder_target_tokens'] == [[0, 1, 0, 1, 7, 7]]
  assert unpacked['decoder_input_tokens'] == [[5, 0, 1, 0, 7, 7]]


def test_without_bos_each_sequence_starts_with_its_own_first_token():
  """As transformers trains Qwen (`labels=input_ids`): the first token is read, never
  predicted, and the prompt the model decodes from is the inputs alone."""
  got, batch = _convert(DecoderOnlyFeatureConverter(),
                        [_example([7, 8, 1], [3, 1]), _example([9, 1], [4, 1])],
                        {'inputs': 4, 'targets': 6}, packed=True, v=_NoBosVocab())
  assert got['decoder_input_tokens'] == [[7, 8, 1, 3, 9, 1, 4, 7, 7, 7]]
  assert got['decoder_target_tokens'] == [[8, 1, 3, 1, 1, 4, 1, 7, 7, 7]]
  assert got['decoder_loss_weights'] == [[0, 0, 1, 1, 0, 1, 1, 0, 0, 0]]
  assert got['decoder_causal_attention'] == [[1, 1, 1, 0, 1, 1, 0, 0, 0, 0]]
  conv = DecoderOnlyFeatureConverter()
  rows = [conv.finish_row({'inputs': 3, 'targets': 3}, False)(conv.example(e, _NoBosVocab()))
          for e in (_example([7, 8, 1], [3, 1]), _example([9, 1], [4, 1]))]
  eval_batch = conv.to_contract(_NoBosVocab())({k: np.stack([r[k] for r in rows])
                                                for k in rows[0]})
  assert conv.model_inputs(eval_batch, 3).tolist() == [[7, 8, 1, 0], [9, 1, 0, 0]]
  assert conv.model_inputs_mask(eval_batch, 3).sum(1).tolist() == [3, 2]
  assert conv.model_targets(eval_batch, 3).tolist() == [[3, 1, 0], [4, 1, 0]]


def test_a_soft_prompt_goes_before_bos_as_peft_reads_it():
  """Prompt tuning with a BOS tokenizer: the sequence reads the soft prompt, then BOS, then
  the text (peft's PROMPT_TUNING order); prompt ids are never predicted."""
  got, _ = _convert(DecoderOnlyFeatureConverter(loss_on_targets_only=False),
                    [_example([-1, -2, 7, 1], [3, 1])], {'inputs': 5, 'targets': 3},
                    packed=False, v=_BosVocab())
  assert got['decoder_input_tokens'] == [[-1, -2, 5, 7, 1, 3, 7, 7]]
  assert got['decoder_target_tokens'] == [[-2, 5, 7, 1, 3, 1, 7, 7]]
  assert got['decoder_loss_weights'] == [[0, 1, 1, 1, 1, 1, 0, 0]]
  assert got['decoder_causal_attention'] == [[1, 1, 1, 1, 1, 0, 0, 0]]


def test_model_lengths_and_config_check():
  assert DecoderOnlyFeatureConverter().model_lengths({'inputs': 7, 'targets': 8}) == {
      k: 15 for k in DECODER_ONLY_FEATURES}
  assert EncDecFeatureConverter().model_lengths({'inputs': 7, 'targets': 8})[
      'encoder_input_tokens'] == 7
  with pytest.raises(validation.ConfigError, match='feature_converter'):
    PipelineConfig({'inputs': 8, 'targets': 8}, 4, feature_converter='decoder')


def _batches(mixture, converter, pack, n=3, lengths=None):
  cfg = PipelineConfig(lengths or {'inputs': 96, 'targets': 32}, batch_size=8, pack=pack,
                       prefetch=0, feature_converter=converter)
  it = pipeline.train_iterator(mixture, VOCAB, cfg, 0, 1)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _check_decoder_batch(b, length, num_tasks):
  assert sorted(k for k in b if not k.startswith('stats/')) == sorted(DECODER_ONLY_FEATURES)
  for k in DECODER_ONLY_FEATURES:
    assert b[k].shape == (8, length) and b[k].dtype == np.int32, k
  seg, pos = b['decoder_segment_ids'], b['decoder_positions']
  real = seg > 0
  starts = real & (pos == 0)
  # each segment starts at position 0 and counts up; decoder inputs never see another segment
  prev_seg = np.pad(seg, ((0, 0), (1, 0)))[:, :-1]
  assert np.array_equal(starts, real & (prev_seg != seg))
  assert (b['decoder_input_tokens'][starts] == VOCAB.decoder_start_id).all()
  inner = real & ~starts
  assert np.array_equal(b['decoder_input_tokens'][:, 1:][inner[:, 1:]],
                        b['decoder_target_tokens'][:, :-1][inner[:, 1:]])
  # loss only on targets: every segment ends with EOS (weighted), starts unweighted (inputs),
  # and its weighted positions are a suffix right after the causal-attention prefix - 1
  for r in range(8):
    for s in set(seg[r][real[r]]):
      m = seg[r] == s
      w, c, t = b['decoder_loss_weights'][r][m], b['decoder_causal_attention'][r][m], \
          b['decoder_target_tokens'][r][m]
      assert t[-1] == VOCAB.eos_id and w[-1] == 1 and w[0] == 0
      first = int(np.argmax(w))
      assert w[first:].all() and not w[:first].any()
      assert c[:first + 1].all() and not c[first + 1:].any()
      assert len(set(b['decoder_task_ids'][r][m])) == 1
  assert not b['decoder_loss_weights'][~real].any() and (b['decoder_task_ids'][~real] == -1).all()
  assert set(np.unique(b['decoder_task_ids'][real])) <= set(range(num_tasks))


@pytest.mark.parametrize('pack', [True, False])
def test_every_builtin_task_flows_through_the_decoder_only_converter(pack):
  mix = mixtures.get_mixture('builtin')
  seen = set()
  for b in _batches(mix, DecoderOnlyFeatureConverter(), pack, n=6):
    _check_decoder_batch(b, 128, len(mix.tasks))
    seen |= set(np.unique(b['decoder_task_ids'])) - {-1}
  assert len(seen) > len(mix.tasks) // 2   # the mixture's tasks all reach the batches


def test_span_corruption_objective_task_flows_through_the_decoder_only_converter():
  def doc(rng, split):
    return {'text': ' '.join(['word%d' % rng.integers(50) for _ in range(rng.integers(5, 40))])}
  task = tasks.Task('fc_span', GeneratedSource(doc, {'train': 64}), objective=Objective(
      'span_corruption', max_text_tokens=400))
  batches = _batches(task, DecoderOnlyFeatureConverter(), True, n=2,
                     lengths={'inputs': 64, 'targets': 24})
  for b in batches:
    _check_decoder_batch(b, 88, 1)
    w, t = b['decoder_loss_weights'], b['decoder_target_tokens']
    first_target = (w > 0) & (np.pad(w, ((0, 0), (1, 0)))[:, :-1] == 0)
    # every example's targets start with the first sentinel (ByT5's top byte id, 258)
    segments = ((b['decoder_segment_ids'] > 0) & (b['decoder_positions'] == 0)).sum()
    assert first_target.sum() == segments
    assert (t[first_target] == 258).all()


def test_the_same_examples_in_both_contracts():
  """Both converters see the same tokenized examples: the decoder-only sequence of a padded
  row is the encoder-decoder row's inputs then targets."""
  mix = mixtures.get_mixture('builtin')
  (ed,), (do,) = (_batches(mix, c, False, n=1) for c in (EncDecFeatureConverter(),
                                                          DecoderOnlyFeatureConverter()))
  assert sorted(k for k in ed if not k.startswith('stats/')) == sorted(ENC_DEC_FEATURES)
  for r in range(8):
    enc = ed['encoder_input_tokens'][r][ed['encoder_segment_ids'][r] > 0]
    dec = ed['decoder_target_tokens'][r][ed['decoder_segment_ids'][r] > 0]
    seq = do['decoder_target_tokens'][r][do['decoder_segment_ids'][r] > 0]
    assert seq.tolist() == enc.tolist() + dec.tolist()
    assert do['decoder_target_tokens'][r][do['decoder_loss_weights'][r] > 0].tolist() == \
        dec.tolist()
  assert {k: ed[k] for k in ed if k.startswith('stats/')}.keys() == \
      {k: do[k] for k in do if k.startswith('stats/')}.keys()


def test_causal_lm_objective_on_raw_text():
  texts = ['alpha beta gamma delta ' * int(n) for n in (1, 2, 9)]
  task = tasks.Task('fc_causal', GeneratedSource(
      lambda rng, split: {'text': texts[int(rng.integers(3))]}, {'train': 30}),
      objective=Objective('causal_lm'))
  with pytest.raises(validation.ConfigError, match='causal_lm'):
    Objective('causal_lm', merge_examples_to_reduce_padding=True)
  for pack in (True, False):
    (b,) = _batches(task, DecoderOnlyFeatureConverter(), pack, n=1,
                    lengths={'inputs': 8, 'targets': 40})
    real = b['decoder_segment_ids'] > 0
    starts = real & (b['decoder_positions'] == 0)
    # no inputs: loss on every text token, prefix attention only where the first is read
    assert np.array_equal(b['decoder_loss_weights'] > 0, real)
    assert np.array_equal(b['decoder_causal_attention'] > 0, starts)
    for r in range(8):
      for s in set(b['decoder_segment_ids'][r][real[r]]):
        ids = b['decoder_target_tokens'][r][b['decoder_segment_ids'][r] == s]
        assert len(ids) <= 40 and ids[-1] == VOCAB.eos_id
        text = VOCAB.decode(ids)
        # a chunk of one text: the longest text is cut into chunks of 39 tokens + EOS
        assert any(text in t for t in texts) and (len(ids) == 40 or text in texts[:2] or
                                                  text == texts[2][-len(text):])


def test_eval_batches_in_the_decoder_only_form_give_t5x_prompts():
  from t5x_lite.data import eval_inputs  # pylint: disable=import-outside-toplevel
  task = mixtures.get_mixture('builtin').tasks[0]
  examples = eval_inputs.eval_examples(task, 'validation')[:5]
  lengths = {'inputs': 64, 'targets': 16}
  dec = list(eval_inputs.eval_batches(examples, VOCAB, lengths, 4, process_index=0,
                                      process_count=1,
                                      feature_converter=DecoderOnlyFeatureConverter()))
  enc = list(eval_inputs.eval_batches(examples, VOCAB, lengths, 4, process_index=0,
                                      process_count=1))
  assert [i.tolist() for _, i in dec] == [[0, 1, 2, 3], [4, -1, -1, -1]]
  for (d, idx), (e, _) in zip(dec, enc):
    assert sorted(d) == sorted(DECODER_ONLY_FEATURES) and d['decoder_input_tokens'].shape == (4, 80)
    prompt = d['decoder_input_tokens'] * d['decoder_causal_attention']
    for r in range(4):
      enc_ids = e['encoder_input_tokens'][r][e['encoder_segment_ids'][r] > 0].tolist()
      n = int(d['decoder_causal_attention'][r].sum())
      assert n == (len(enc_ids) + 1 if idx[r] >= 0 else 0)
      assert prompt[r][:n].tolist() == ([VOCAB.decoder_start_id] + enc_ids)[:n]
      assert not prompt[r][n:].any()


def test_for_kind_makes_each_models_converter_with_its_options():
  from t5x_lite.data import feature_converters  # pylint: disable=import-outside-toplevel
  assert feature_converters.for_kind('encoder_decoder') == EncDecFeatureConverter()
  assert feature_converters.for_kind('decoder_only', prefix_lm=False) == (
      DecoderOnlyFeatureConverter(prefix_lm=False))
  assert EncDecFeatureConverter.kind == 'encoder_decoder'
  assert DecoderOnlyFeatureConverter.kind == 'decoder_only'
  with pytest.raises(validation.ConfigError, match='prefix_lm.*encoder_decoder'):
    feature_converters.for_kind('encoder_decoder', prefix_lm=True)
  with pytest.raises(validation.ConfigError, match='prefx_lm'):
    feature_converters.for_kind('decoder_only', prefx_lm=True)


def feature_converters_for_kind(kind, **options):
  from t5x_lite.data import feature_converters  # pylint: disable=import-outside-toplevel
  return feature_converters.for_kind(kind, **options)


@pytest.mark.parametrize('buckets', [None, (16, 32, 64)])
def test_model_inputs_of_eval_rows_are_the_encoder_inputs_or_start_plus_inputs(buckets):
  """Whatever the training options, the eval converter's rows give each example's prompt:
  the encoder inputs, or the start id then the same inputs, cut to inputs + 1 positions."""
  from t5x_lite.data import eval_inputs  # pylint: disable=import-outside-toplevel
  task = mixtures.get_mixture('builtin').tasks[0]
  examples = eval_inputs.eval_examples(task, 'validation')[:6]
  lengths = {'inputs': 64, 'targets': 16}
  causal = DecoderOnlyFeatureConverter(prefix_lm=False, loss_on_targets_only=False)
  assert causal.for_eval() == DecoderOnlyFeatureConverter()
  assert feature_converters_for_kind(**causal.options()) == causal
  enc_conv = EncDecFeatureConverter()
  assert enc_conv.for_eval() is enc_conv
  common = dict(process_index=0, process_count=1, buckets=buckets)
  dec = list(eval_inputs.eval_batches(examples, VOCAB, lengths, 4,
                                      feature_converter=causal.for_eval(), **common))
  enc = list(eval_inputs.eval_batches(examples, VOCAB, lengths, 4, **common))
  for (d, idx), (e, _) in zip(dec, enc):
    enc_inputs = enc_conv.model_inputs(e, lengths['targets'])
    assert enc_inputs is e['encoder_input_tokens']
    prompt = causal.model_inputs(d, lengths['targets'])
    assert prompt.shape == (4, enc_inputs.shape[1] + 1)
    np.testing.assert_array_equal(causal.model_targets(d, lengths['targets']),
                                  enc_conv.model_targets(e, lengths['targets']))
    np.testing.assert_array_equal(causal.model_targets_mask(d, lengths['targets']),
                                  enc_conv.model_targets_mask(e, lengths['targets']))
    mask = causal.model_inputs_mask(d, lengths['targets'])
    for r in range(4):
      ids = enc_inputs[r][enc_inputs[r] != 0].tolist()
      want = [VOCAB.decoder_start_id] + ids if idx[r] >= 0 else []
      assert prompt[r].tolist() == want + [0] * (prompt.shape[1] - len(want))
      assert mask[r].tolist() == [True] * len(want) + [False] * (prompt.shape[1] - len(want))


def test_masks_mark_token_0_of_a_vocabulary_where_it_is_real():
  """Eval rows of a vocabulary whose id 0 is a token (Llama's "!"): the masks, not the ids,
  say where the prompt and the targets end (the last input and a target are 0 here)."""
  conv = DecoderOnlyFeatureConverter(inputs_eos=False).for_eval()
  lengths = {'inputs': 4, 'targets': 3}
  row = conv.example({'inputs': np.array([7, 0, 1]), 'targets': np.array([0, 1]),
                      'task_ids': np.array([1, 1]), 'inputs_truncated': np.int32(0),
                      'targets_truncated': np.int32(0)}, VOCAB)   # inputs' EOS dropped
  batch = conv.to_contract(VOCAB)({k: v[None] for k, v in conv.finish_row(lengths, False)(
      row).items()})
  assert conv.model_inputs(batch, 3)[0].tolist() == [VOCAB.decoder_start_id, 7, 0, 0, 0]
  assert conv.model_inputs_mask(batch, 3)[0].tolist() == [True] * 3 + [False] * 2
  assert conv.model_targets(batch, 3)[0].tolist() == [0, 1, 0]
  assert conv.model_targets_mask(batch, 3)[0].tolist() == [True, True, False]
