"""HfTokenizerVocabulary: ids and text equal transformers' on the same files; the model's own
BOS / EOS / PAD reach the pipeline's batches."""

import pickle

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
import transformers

from t5x_lite.data import pipeline, tasks, vocab
from t5x_lite.data.feature_converters import DecoderOnlyFeatureConverter
from t5x_lite.data.hf_tokenizer import HfTokenizerVocabulary
from t5x_lite.data.sources import GeneratedSource
from t5x_lite.data.templates import Template

SENTENCES = ['The quick brown fox jumps over the lazy dog.',
             'Translate to German: the house is small.', 'Das Haus ist klein!',
             'What is 12 plus 30? It is 42.', "I'm sure they've gone; it's late, isn't it?",
             'Ünïcödé and emoji 🙂 work too.'] * 3


def _bpe(specials):
  tok = tokenizers.Tokenizer(models.BPE(unk_token=specials.get('unk')))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
      vocab_size=300, special_tokens=[t for t in specials.values() if t],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  """Llama-style: <s> prepended by the template, </s> EOS, no PAD, ids not T5's."""
  tok = _bpe({'unk': '<unk>', 'bos': '<s>', 'eos': '</s>'})
  bos = tok.token_to_id('<s>')
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', bos)])
  path = tmp_path_factory.mktemp('llama_tok')
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>', eos_token='</s>', unk_token='<unk>'
  ).save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def qwen_dir(tmp_path_factory):
  """Qwen-style: no BOS, EOS and PAD tokens of their own, ids from config.json too."""
  tok = _bpe({'eos': '<|im_end|>', 'pad': '<|endoftext|>'})   # EOS 0, PAD 1: T5's swapped
  path = tmp_path_factory.mktemp('qwen_tok')
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|endoftext|>'
  ).save_pretrained(path)
  (path / 'config.json').write_text('{"vocab_size": 384, "eos_token_id": %d}'
                                    % tok.token_to_id('<|im_end|>'))
  return path


@pytest.mark.parametrize('which', ['llama_dir', 'qwen_dir'])
def test_ids_and_text_equal_transformers(which, request):
  path = request.getfixturevalue(which)
  ours = HfTokenizerVocabulary(path)
  theirs = transformers.AutoTokenizer.from_pretrained(path)
  texts = SENTENCES[:6] + ['unseen words: zyxw quarks', '  spaces  and\nnewlines ', '']
  for text in texts:
    ids = theirs(text, add_special_tokens=False).input_ids
    assert ours.encode(text) == ids, text
    assert ours.decode(ids + [ours.eos_id, 5, 6]) == theirs.decode(ids, skip_special_tokens=True)
  assert ours.encode_batch(texts) == [theirs(t, add_special_tokens=False).input_ids for t in texts]
  assert (ours.eos_id, ours.pad_id) == (theirs.eos_token_id,
                                       theirs.pad_token_id if theirs.pad_token_id is not None
                                       else theirs.eos_token_id)
  assert ours.bos_id == theirs.bos_token_id
  # BOS first where the template puts it: what transformers adds with special tokens
  with_special = theirs('hello fox').input_ids
  assert ours.add_bos == (with_special[0] == theirs.bos_token_id)
  # no BOS: no start id, the sequence's first token is read first (as transformers)
  assert ours.decoder_start_id == (theirs.bos_token_id if ours.add_bos else None)


def test_special_ids_sizes_spec_and_pickling(llama_dir, qwen_dir):
  llama, qwen = HfTokenizerVocabulary(llama_dir), HfTokenizerVocabulary(qwen_dir)
  assert llama.add_bos and llama.bos_id is not None and llama.pad_id == llama.eos_id
  assert llama.vocab_size % 128 == 0 and llama.vocab_size >= llama.base_vocab_size
  assert not qwen.add_bos and qwen.bos_id is None and qwen.pad_id != qwen.eos_id
  assert qwen.decoder_start_id is None and qwen.vocab_size == 384   # config.json's
  assert (llama.eos_id, qwen.eos_id, qwen.pad_id) == (2, 0, 1)   # not T5's EOS 1 / PAD 0
  assert vocab.get_vocabulary(str(llama_dir)) == llama
  assert vocab.get_vocabulary(str(qwen_dir / 'tokenizer.json')).eos_id == qwen.eos_id
  again = pickle.loads(pickle.dumps(llama))
  assert again.encode(SENTENCES[0]) == llama.encode(SENTENCES[0]) and again.bos_id == llama.bos_id
  with pytest.raises(vocab.VocabularyNotFound):
    HfTokenizerVocabulary(llama_dir / 'missing')


def _task():
  def example(rng, split):
    return {'q': SENTENCES[int(rng.integers(6))], 'a': str(rng.integers(100))}
  return tasks.Task('hf_tok_task', GeneratedSource(example, {'train': 40}),
                    [Template('{q}', '{a}')])


@pytest.mark.parametrize('which', ['llama_dir', 'qwen_dir'])
@pytest.mark.parametrize('pack', [True, False])
def test_pipeline_uses_the_vocabularys_bos_eos_pad(which, pack, request):
  v = HfTokenizerVocabulary(request.getfixturevalue(which))
  theirs = transformers.AutoTokenizer.from_pretrained(request.getfixturevalue(which))
  cfg = pipeline.PipelineConfig({'inputs': 24, 'targets': 8}, batch_size=4, pack=pack,
                                prefetch=0, feature_converter=DecoderOnlyFeatureConverter(
                                    inputs_eos=False))
  it = pipeline.train_iterator(_task(), v, cfg, 0, 1)
  b = next(it)
  it.close()
  seg, pos = b['decoder_segment_ids'], b['decoder_positions']
  starts, pad = (seg > 0) & (pos == 0), seg == 0
  if v.decoder_start_id is not None:   # else each sequence's own first token (below)
    assert (b['decoder_input_tokens'][starts] == v.decoder_start_id).all()
  assert (b['decoder_target_tokens'][pad] == v.pad_id).all()
  assert (b['decoder_input_tokens'][pad] == v.pad_id).all()
  for r in range(4):
    for s in set(seg[r][seg[r] > 0]):
      m = seg[r] == s
      ids = b['decoder_target_tokens'][r][m]
      w = b['decoder_loss_weights'][r][m]
      assert ids[-1] == v.eos_id and (ids[:-1] != v.eos_id).all()   # one EOS, after targets
      # the model's input row is what transformers makes with special tokens (BOS first
      # where its template adds one) for prompt + answer, the answer's tokens weighted
      # (no BOS: the prompt's first token starts the row and is never a target)
      row = b['decoder_input_tokens'][r][m].tolist() + [int(ids[-1])]
      prompt = v.decode(row[:len(row) - int((w > 0).sum())])
      answer = v.decode(ids[w > 0])
      expect = theirs(prompt, add_special_tokens=True).input_ids
      expect = expect + theirs(answer, add_special_tokens=False).input_ids + [v.eos_id]
      assert row == expect
  assert np.array_equal(b['decoder_task_ids'] >= 0, seg > 0)
