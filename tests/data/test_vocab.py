"""Vocabularies: T5 conventions, the same ids as Hugging Face's tokenizers, clear errors."""

from __future__ import annotations

import functools
import json
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from t5x_lite.data.vocab import ByteVocabulary, SentencePieceVocabulary, get_vocabulary

# Real sentences: English, German and French inputs and targets, plus a few news articles.
_REAL_FILES = {
    'sst2/validation.jsonl': 80,
    'sst2/test.jsonl': 40,  # line 37 has a Unigram tie ('xxx')
    'multi30k/validation.en-de.jsonl': 60,
    'multi30k/validation.en-fr.jsonl': 60,
    'multi30k/validation.fr-en.jsonl': 40,
    'xsum/test.jsonl': 8,
}
_NON_ASCII = ['Größe naïve café — “quotes” ½ ﬁ', '日本語のテキスト', 'emoji 🙂👍🏽', 'Ελληνικά · Русский']


@functools.lru_cache
def _real_texts(data_dir) -> list[str]:
  texts = []
  for name, n in _REAL_FILES.items():
    with open(data_dir / name, encoding='utf-8') as f:
      for line, _ in zip(f, range(n)):
        row = json.loads(line)
        texts += [row['inputs'], row['targets']]
  return texts


@functools.lru_cache
def _hf_t5(model_dir: str):
  """transformers 5 T5Tokenizer: `vocab_file=` is silently ignored; from_pretrained(dir) works."""
  transformers = pytest.importorskip('transformers')
  return transformers.T5Tokenizer.from_pretrained(model_dir, extra_ids=100)


@functools.lru_cache
def _hf_byt5():
  return pytest.importorskip('transformers').ByT5Tokenizer()


def _t5(shared_data) -> SentencePieceVocabulary:
  return get_vocabulary(str(shared_data / 't5_spiece' / 'spiece.model'))


def _same_or_tie(vocab, ours, theirs) -> bool:
  """Equal ids, or another segmentation of equal Unigram score (tokenizers and sentencepiece
  break exact ties differently: ' xxx' is '▁ xx x' or '▁ x xx')."""
  if ours == theirs:
    return True
  score = lambda ids: sum(vocab._sp.get_score(i) for i in ids)  # pylint: disable=protected-access
  return (vocab.decode(ours) == vocab.decode(theirs)
          and score(ours) == pytest.approx(score(theirs), abs=1e-4))


# --- SentencePiece: the real T5 vocabulary ----------------------------------------------

def test_t5_known_ids(shared_data):
  vocab = _t5(shared_data)
  assert vocab.encode('translate English to German: ') == [13959, 1566, 12, 2968, 10]
  assert vocab.encode('Hello world, translate English to German: That is good.') == [
      8774, 296, 6, 13959, 1566, 12, 2968, 10, 466, 19, 207, 5]
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.base_vocab_size == 32000 and vocab.vocab_size == 32128
  assert (vocab.extra_id(0), vocab.extra_id(99)) == (32099, 32000)
  with pytest.raises(IndexError):
    vocab.extra_id(100)
  assert vocab.model_file == str(shared_data / 't5_spiece' / 'spiece.model')
  assert get_vocabulary(vocab.spec) is vocab
  assert vocab == SentencePieceVocabulary(vocab.model_file)
  assert len({vocab, SentencePieceVocabulary(vocab.model_file)}) == 1
  assert vocab != SentencePieceVocabulary(vocab.model_file, extra_ids=10)


def test_t5_matches_hf_tokenizer_on_real_sentences(shared_data):
  vocab, texts = _t5(shared_data), _real_texts(shared_data)
  tok = _hf_t5(str(shared_data / 't5_spiece'))
  assert len(tok) == 32100 and tok.convert_tokens_to_ids('<extra_id_0>') == vocab.extra_id(0)
  ours = vocab.encode_batch(texts)
  assert ours == [vocab.encode(t) for t in texts]
  theirs = tok(texts, add_special_tokens=True).input_ids
  assert all(t[-1] == vocab.eos_id for t in theirs)  # HF appends EOS; the pipeline does it here.
  theirs = [t[:-1] for t in theirs]
  assert len(texts) > 450
  assert all(_same_or_tie(vocab, o, t) for o, t in zip(ours, theirs))
  assert sum(o != t for o, t in zip(ours, theirs)) <= len(texts) // 100


def test_t5_decode_round_trip_matches_hf(shared_data):
  vocab, texts = _t5(shared_data), _real_texts(shared_data)
  tok = _hf_t5(str(shared_data / 't5_spiece'))
  checked = 0
  hf_ids = tok(texts, add_special_tokens=False).input_ids
  for text, ids, theirs in zip(texts, vocab.encode_batch(texts), hf_ids):
    if vocab.unk_id in ids:  # sentencepiece writes ' ⁇ ' where HF writes '<unk>'.
      assert ' \u2047 ' in vocab.decode(ids)
      continue
    assert vocab.decode(ids) == tok.decode(theirs) == tok.decode(ids)
    assert vocab.decode(np.array(ids + [1, 5, 6], np.int32)) == tok.decode(ids)
    checked += 1
  assert checked > 400


def test_t5_sentinels_match_hf(shared_data):
  vocab, texts = _t5(shared_data), _real_texts(shared_data)
  tok = _hf_t5(str(shared_data / 't5_spiece'))
  prompt = 'The <extra_id_0> walks in <extra_id_1> park.<extra_id_2>x <extra_id_100> <extra_id_01>'
  assert vocab.encode(prompt) == tok(prompt, add_special_tokens=False).input_ids
  assert vocab.encode_batch([prompt, 'a'])[0] == vocab.encode(prompt)
  rng = random.Random(0)
  for ids in vocab.encode_batch(texts[:100]):
    ids = [i for i in ids if i != vocab.unk_id]
    for _ in range(rng.randint(1, 4)):
      ids.insert(rng.randint(0, len(ids)), vocab.extra_id(rng.randrange(100)))
    text = vocab.decode(ids)
    assert text == tok.decode(ids)
    assert vocab.encode(text) == tok(text, add_special_tokens=False).input_ids


def test_t5_decode_stops_at_eos_and_skips_pad_and_padding_ids(shared_data):
  vocab = _t5(shared_data)
  ids = [0, 8774, 0, 296, 32099, 32100, 32127, 5, 1, 466, 1]
  assert vocab.decode(ids) == 'Hello world<extra_id_0>.'
  assert vocab.decode(np.array([ids, ids])[0]) == 'Hello world<extra_id_0>.'
  assert vocab.decode([1, 8774]) == '' and vocab.decode([]) == ''
  assert vocab.decode([8774, vocab.unk_id, 296]) == 'Hello \u2047  world'


def test_t5_pickle_round_trip(shared_data):
  vocab, texts = _t5(shared_data), _real_texts(shared_data)[:50]
  clone = pickle.loads(pickle.dumps(vocab))
  assert clone == vocab and clone.model_file == vocab.model_file
  assert clone.encode_batch(texts) == vocab.encode_batch(texts)
  assert clone.extra_id(0) == 32099 and clone.vocab_size == 32128


# --- SentencePiece: a tiny model trained here (no shared data needed) -------------------

_WORDS = 'the a cat dog sat on mat über café naïve quick brown fox jumps over lazy river'.split()


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
  rng = random.Random(0)
  sentences = [' '.join(rng.choices(_WORDS, k=rng.randint(3, 10))) for _ in range(300)]
  model_dir = tmp_path_factory.mktemp('tiny_spm')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=str(model_dir / 'spiece'), vocab_size=48,
      model_type='unigram', character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=2)
  return model_dir / 'spiece.model', sentences


def test_tiny_sentencepiece_vocabulary(tiny_model):
  path, sentences = tiny_model
  vocab = SentencePieceVocabulary(path)
  assert vocab.base_vocab_size == 48 and vocab.vocab_size == 256  # 48 + 100 -> 256
  assert (vocab.extra_id(0), vocab.extra_id(99)) == (147, 48)
  ids = vocab.encode_batch(sentences)
  assert all(vocab.decode(i) == s for i, s in zip(ids, sentences))
  assert all(0 < i < vocab.base_vocab_size for seq in ids for i in seq)
  assert vocab.decode(ids[0] + [vocab.eos_id] + ids[1]) == sentences[0]
  assert vocab.decode([0] + ids[0] + [0, 200, 255, 300, -1]) == sentences[0]
  assert vocab.decode([vocab.extra_id(0)] + ids[0] + [vocab.extra_id(1)]) == (
      f'<extra_id_0> {sentences[0]}<extra_id_1>')
  assert vocab.encode(f'<extra_id_0> {sentences[0]}<extra_id_1>') == (
      [vocab.extra_id(0)] + ids[0] + [vocab.extra_id(1)])


def test_tiny_matches_hf_tokenizer(tiny_model):
  path, sentences = tiny_model
  vocab, tok = SentencePieceVocabulary(path), _hf_t5(str(path.parent))
  texts = sentences[:50] + ['The Cat über XYZ!', '  spaced   out  ']
  texts += ['<extra_id_3>cat <extra_id_0>.', 'on<extra_id_1>mat']
  assert vocab.encode_batch(texts) == tok(texts, add_special_tokens=False).input_ids
  assert tok.convert_tokens_to_ids('<extra_id_0>') == vocab.extra_id(0)


def test_tiny_spec_and_pickle_without_the_file(tiny_model, tmp_path):
  path, sentences = tiny_model
  copy = tmp_path / 'copy.model'
  copy.write_bytes(path.read_bytes())
  vocab = get_vocabulary(f'{copy}:extra_ids=28')
  assert vocab.extra_ids == 28 and vocab.vocab_size == 128 and vocab.extra_id(0) == 75
  assert vocab.spec == f'{copy}:extra_ids=28' and get_vocabulary(vocab.spec) is vocab
  assert SentencePieceVocabulary(copy).spec == str(copy)
  data = pickle.dumps(vocab)
  copy.unlink()  # grain workers reload from the pickled model, not from the path.
  clone = pickle.loads(data)
  assert clone == vocab and clone.encode_batch(sentences) == vocab.encode_batch(sentences)
  assert clone.sp_model == path.read_bytes()


def test_sentencepiece_errors_name_the_path(tmp_path, tiny_model):
  missing = tmp_path / 'nope' / 'spiece.model'
  with pytest.raises(FileNotFoundError, match=str(missing)):
    SentencePieceVocabulary(missing)
  with pytest.raises(FileNotFoundError, match=str(missing)):
    get_vocabulary(str(missing))
  with pytest.raises(FileNotFoundError, match='is a directory'):
    SentencePieceVocabulary(tmp_path)
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'not a sentencepiece model')
  with pytest.raises(ValueError, match=str(garbage)):
    SentencePieceVocabulary(garbage)
  # A model trained with sentencepiece's default ids (unk=0, bos=1, eos=2) breaks T5's contract.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_WORDS * 20), model_prefix=str(tmp_path / 'default'),
      vocab_size=40, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match='pad_id=0 eos_id=1 unk_id=2'):
    SentencePieceVocabulary(tmp_path / 'default.model')


# --- Bytes (ByT5) ------------------------------------------------------------------------

def test_byte_vocabulary_layout_matches_hf():
  vocab, tok = ByteVocabulary(), _hf_byt5()
  assert vocab.vocab_size == 384 == len(tok) and vocab.base_vocab_size == 259
  assert [vocab.extra_id(i) for i in range(125)] == tok.convert_tokens_to_ids(
      [f'<extra_id_{i}>' for i in range(125)])
  assert vocab.encode('hi') == [107, 108]
  text = 'a <extra_id_0> b<extra_id_124><extra_id_125>'
  assert vocab.encode(text) == tok(text, add_special_tokens=False).input_ids
  assert vocab.spec == 'byte' and get_vocabulary('byte') is get_vocabulary('byte') == vocab
  small = get_vocabulary('byte:extra_ids=0')
  assert small.vocab_size == 384 and small.spec == 'byte:extra_ids=0' and small != vocab
  assert pickle.loads(pickle.dumps(vocab)) == vocab


def test_byte_matches_hf_on_real_sentences(shared_data):
  vocab, tok = ByteVocabulary(), _hf_byt5()
  texts = _real_texts(shared_data) + _NON_ASCII
  assert any(ord(c) > 127 for t in texts for c in t)
  ours = vocab.encode_batch(texts)
  assert ours == tok(texts, add_special_tokens=False).input_ids
  assert [vocab.decode(ids) for ids in ours] == texts
  assert all(vocab.decode(ids) == tok.decode(ids) for ids in ours)


def test_byte_decode_eos_pad_and_invalid_utf8():
  vocab = ByteVocabulary()
  ids = vocab.encode('héllo')
  assert vocab.decode([0] + ids + [0, 1] + vocab.encode('world')) == 'héllo'
  assert vocab.decode(np.array(ids + [vocab.eos_id], np.int32)) == 'héllo'
  assert vocab.decode([0xC3 + 3] + ids) == 'héllo'        # a lone lead byte is dropped
  assert vocab.decode(ids[:2] + ids[3:]) == 'hllo'        # half of 'é' is dropped
  assert vocab.decode(ids + [vocab.unk_id, 384, 1000, -5]) == 'héllo'
  assert vocab.decode([vocab.extra_id(0)] + ids + [vocab.extra_id(7)]) == (
      '<extra_id_0>héllo<extra_id_7>')
  assert vocab.decode([]) == ''
  with pytest.raises(ValueError, match='one sequence'):
    vocab.decode(np.zeros((2, 3), np.int32))

