"""HfSentencePieceVocabulary: a model directory that ships tokenizer.model and no tokenizer.json
(Llama 1/2, Gemma) gives transformers' ids and text and the model's own BOS / EOS / PAD / UNK,
and the pipeline uses them.

The directories are what transformers' `save_pretrained` writes, with tokenizer.model in place
of tokenizer.json; the reference is `transformers.AutoTokenizer` on the same directory, except
where transformers 5 leaves the sentencepiece-based tokenizer (module docstring of
hf_sentencepiece.py): there sentencepiece's own ids are the reference.
"""

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from t5x_lite.data import pipeline, tasks, vocab
from t5x_lite.data.feature_converters import DecoderOnlyFeatureConverter
from t5x_lite.data.hf_sentencepiece import HfSentencePieceVocabulary
from t5x_lite.data.hf_tokenizer import HfTokenizerVocabulary
from t5x_lite.data.sources import GeneratedSource
from t5x_lite.data.templates import Template

SENTENCES = ['The quick brown fox jumps over the lazy dog.',
             'Translate to German: the house is small.', 'Das Haus ist klein!',
             'What is 12 plus 30? It is 42.', "I'm sure they've gone; it's late, isn't it?",
             'Ünïcödé and accents: déjà vu, naïve.']
CORPUS = SENTENCES + ['  indented line\n\tand a tab', 'numbers 1234567890 and 2024',
                      'a user turn\nand a model turn']
# Texts on which transformers 5's converted tokenizers still give the sentencepiece ids (no
# text, and no text after a special token, starts with a space); characters not in CORPUS
# (中文 🙂 ∂ ✓) are byte fallback.
TEXTS = SENTENCES + ['a\nnew line\n\n  x', 'tab\tsep', '中文 🙂 ∂ ✓ byte fallback',
                     'digits 1234567 and 3.14', 'end space ', '', 'x</s>y', 'q <s>z',
                     '\nnewline first', 'x<eos>y', '<start_of_turn>user\nhi<end_of_turn>']
# Texts that start with a space: sentencepiece's ids (transformers 4's LlamaTokenizer);
# transformers 5's Llama drops that first space (Gemma adds no dummy prefix: no difference).
LEADING = [' leading space', '  two leading', ' ', '\u2581under', ' 42']
GEMMA_SPECIALS = ['<start_of_turn>', '<end_of_turn>']


def _train(**options) -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 20), model_writer=model, character_coverage=1.0,
      byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
      normalization_rule_name='identity', remove_extra_whitespaces=False, num_threads=1,
      minloglevel=2, **options)
  return model.getvalue()


_MODELS = {   # Llama's ids (unk 0, bos 1, eos 2, no pad, dummy prefix), Gemma's (pad 0 ...)
    'llama': dict(model_type='bpe', vocab_size=360, unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
    'llama_unigram': dict(model_type='unigram', vocab_size=400, hard_vocab_limit=False,
                          unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
    'gemma': dict(model_type='bpe', vocab_size=360, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                  pad_piece='<pad>', eos_piece='<eos>', bos_piece='<bos>', unk_piece='<unk>',
                  add_dummy_prefix=False, user_defined_symbols=GEMMA_SPECIALS),
}


@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('spm')
  files = {}
  for name, options in _MODELS.items():
    files[name] = root / f'{name}.model'
    files[name].write_bytes(_train(**options))
  return files


def _checkpoint_dir(root, model_file, gemma: bool, **config):
  """transformers' save_pretrained, then tokenizer.model instead of tokenizer.json (what a
  Llama 1/2 or Gemma checkpoint ships); `config` entries go into tokenizer_config.json."""
  src = root / 'src'
  src.mkdir()
  shutil.copy(model_file, src / 'tokenizer.model')
  if gemma:
    tok = transformers.GemmaTokenizer.from_pretrained(
        src, additional_special_tokens=GEMMA_SPECIALS)
  else:
    tok = transformers.LlamaTokenizer.from_pretrained(src)
  out = root / 'checkpoint'
  tok.save_pretrained(out)
  shutil.copy(out / 'tokenizer.json', root / 'tokenizer.json')   # kept for the routing test
  (out / 'tokenizer.json').unlink()
  shutil.copy(model_file, out / 'tokenizer.model')
  path = out / 'tokenizer_config.json'
  path.write_text(json.dumps({**json.loads(path.read_text()), 'add_bos_token': True, **config}))
  return out


_CASES = {'llama': ('llama', {}), 'llama_legacy': ('llama', {'legacy': True}),
          'llama_nonlegacy': ('llama', {'legacy': False}), 'gemma': ('gemma', {})}


@pytest.fixture(scope='module')
def dirs(model_files, tmp_path_factory):
  return {case: _checkpoint_dir(tmp_path_factory.mktemp(case), model_files[model],
                                model == 'gemma', **config)
          for case, (model, config) in _CASES.items()}


def _theirs(path, **kwargs):
  return transformers.AutoTokenizer.from_pretrained(path, **kwargs)


@pytest.mark.parametrize('case', ['llama', 'llama_legacy', 'llama_nonlegacy', 'gemma'])
def test_ids_and_text_equal_transformers(case, dirs, model_files):
  # No `legacy` in tokenizer_config.json: True, transformers 4's (sentencepiece-based)
  # LlamaTokenizer's default; transformers 5's is False.
  ours = HfSentencePieceVocabulary(dirs[case])
  theirs = _theirs(dirs[case], **({'legacy': True} if case == 'llama' else {}))
  gemma = case == 'gemma'
  assert type(theirs).__name__ == ('GemmaTokenizer' if gemma else 'LlamaTokenizer')
  texts = TEXTS + (LEADING if gemma else [])
  for text in texts:
    ids = theirs(text, add_special_tokens=False).input_ids
    assert ours.encode(text) == ids, text
    if ours.eos_id not in ids:
      assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
      assert ours.decode(ids + [ours.eos_id, 5, 6]) == ours.decode(ids)   # stops at EOS
  assert ours.encode_batch(texts) == [theirs(t, add_special_tokens=False).input_ids
                                      for t in texts]
  sp = spm.SentencePieceProcessor(model_file=str(model_files[_CASES[case][0]]))
  pieces = [sp.id_to_piece(i) for i in ours.encode('中文🙂')]   # byte fallback
  assert len(pieces) >= 10 and all(p.startswith('<0x') for p in pieces if p != '\u2581')
  # A text that starts with a space: sentencepiece's ids, whatever `legacy` says.
  for text in LEADING:
    assert ours.encode(text) == sp.encode(text), text
  # The model's own special ids, BOS first as the tokenizer adds it.
  assert (ours.bos_id, ours.eos_id, ours.unk_id) == (
      theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id)
  assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None
                         else theirs.eos_token_id)
  with_special = theirs('hello fox').input_ids
  assert ours.add_bos and with_special[0] == theirs.bos_token_id == ours.decoder_start_id
  assert with_special[1:] == ours.encode('hello fox')


@pytest.mark.parametrize('legacy', [True, False])
def test_unigram_model_gives_sentencepieces_ids(legacy, model_files, tmp_path):
  """A Unigram tokenizer.model read as LlamaTokenizer: sentencepiece's ids and text
  (transformers 5 rebuilds every Llama tokenizer.model as BPE, so it is no reference here)."""
  path = _checkpoint_dir(tmp_path, model_files['llama_unigram'], False, legacy=legacy)
  ours = HfSentencePieceVocabulary(path)
  sp = spm.SentencePieceProcessor(model_file=str(model_files['llama_unigram']))
  plain = [t for t in TEXTS + LEADING if '<' not in t]
  for text in plain:
    assert ours.encode(text) == sp.encode(text), text
    if text[:1] not in (' ', '\u2581'):
      assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
  assert ours.encode_batch(plain) == sp.encode(plain)
  assert ours.encode('q <s>z') == sp.encode('q ') + [1] + (sp.encode('z') if legacy else [
      sp.piece_to_id('z')])


def test_legacy_flag_as_transformers(dirs, model_files):
  """LlamaTokenizer's `legacy`: unset is True (transformers 4's default); True gives every
  text between special tokens the dummy prefix, False only the start of the text."""
  sp = spm.SentencePieceProcessor(model_file=str(model_files['llama']))
  unset, legacy, new = (HfSentencePieceVocabulary(dirs[c])
                        for c in ('llama', 'llama_legacy', 'llama_nonlegacy'))
  assert unset.legacy and legacy.legacy and not new.legacy
  for text in TEXTS + LEADING:
    assert unset.encode(text) == legacy.encode(text)
  assert legacy.encode('<s> hi') == [1] + sp.encode(' hi')
  assert new.encode('<s> hi') == [1] + sp.encode('hi')
  assert legacy.encode('x</s>y') != new.encode('x</s>y')   # '▁y' vs 'y', as transformers
  assert legacy.encode('plain text') == new.encode('plain text') == sp.encode('plain text')
  # decode of a text that starts with a space, as transformers 4's LlamaTokenizer
  assert legacy.decode(legacy.encode(' leading space')) == 'leading space'
  assert new.decode(new.encode(' leading space')) == ' leading space'


def test_routing_spec_sizes_and_pickling(dirs, tmp_path):
  llama, gemma = (HfSentencePieceVocabulary(dirs[c]) for c in ('llama', 'gemma'))
  assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.unk_id) == (1, 2, 2, 0)  # PAD = EOS
  assert (gemma.pad_id, gemma.eos_id, gemma.bos_id, gemma.unk_id) == (0, 1, 2, 3)
  assert llama.base_vocab_size == 360 and llama.vocab_size == 384
  # get_vocabulary: tokenizer.model alone -> this class; with tokenizer.json -> tokenizers'
  assert vocab.get_vocabulary(str(dirs['gemma'])) == gemma
  assert isinstance(vocab.get_vocabulary(str(dirs['gemma'])), HfSentencePieceVocabulary)
  same = HfSentencePieceVocabulary(dirs['llama'] / 'tokenizer.model')
  assert same.spec == llama.spec == str(dirs['llama']) and same == llama
  both = tmp_path / 'both'
  shutil.copytree(dirs['llama'], both)
  shutil.copy(dirs['llama'].parent / 'tokenizer.json', both / 'tokenizer.json')
  assert isinstance(vocab.get_vocabulary(str(both)), HfTokenizerVocabulary)
  # pickling (grain workers) carries the model: no file needed on the other side
  moved = tmp_path / 'moved'
  shutil.copytree(dirs['llama_nonlegacy'], moved)
  v = HfSentencePieceVocabulary(moved)
  data = pickle.dumps(v)
  shutil.rmtree(moved)
  again = pickle.loads(data)
  assert again.encode_batch(TEXTS) == v.encode_batch(TEXTS) and not again.legacy
  assert (again.bos_id, again.eos_id, again.pad_id, again.spec) == (
      v.bos_id, v.eos_id, v.pad_id, v.spec)


def test_special_ids_from_configs_and_the_model(model_files, tmp_path):
  # tokenizer.model alone: the model's own ids; no PAD: EOS pads; BOS added (LlamaTokenizer)
  bare = tmp_path / 'bare'
  bare.mkdir()
  shutil.copy(model_files['gemma'], bare / 'tokenizer.model')
  v = HfSentencePieceVocabulary(bare)
  assert (v.pad_id, v.eos_id, v.bos_id, v.unk_id, v.add_bos) == (0, 1, 2, 3, True)
  # Llama 2 style files: AddedToken dicts, a PAD added after the model's pieces,
  # add_bos_token false, config.json's embedding size (its pad_token_id loses to the named one).
  llama2 = tmp_path / 'llama2'
  llama2.mkdir()
  shutil.copy(model_files['llama'], llama2 / 'tokenizer.model')
  token = lambda c: {'__type': 'AddedToken', 'content': c, 'lstrip': False, 'rstrip': False,
                     'normalized': False, 'single_word': False, 'special': True}
  (llama2 / 'tokenizer_config.json').write_text(json.dumps({
      'add_bos_token': False, 'add_eos_token': False, 'bos_token': token('<s>'),
      'eos_token': token('</s>'), 'unk_token': token('<unk>'), 'pad_token': token('<pad>'),
      'legacy': False, 'tokenizer_class': 'LlamaTokenizer', 'clean_up_tokenization_spaces': False,
      'added_tokens_decoder': {'0': token('<unk>'), '1': token('<s>'), '2': token('</s>'),
                               '360': token('<pad>')}}))
  (llama2 / 'config.json').write_text(json.dumps({'vocab_size': 512, 'pad_token_id': 0}))
  v, theirs = HfSentencePieceVocabulary(llama2), _theirs(llama2)
  assert (v.bos_id, v.eos_id, v.pad_id, v.unk_id, v.add_bos) == (1, 2, 360, 0, False)
  assert theirs.pad_token_id == 360 and theirs('hi').input_ids[0] != 1
  assert (v.base_vocab_size, v.vocab_size) == (361, 512)
  for text in ['x<pad>y', 'fox</s>', 'The quick brown fox.']:
    ids = theirs(text, add_special_tokens=False).input_ids
    assert v.encode(text) == ids
    assert v.decode(ids) == theirs.decode(ids, skip_special_tokens=True).split('</s>')[0]
  # special_tokens_map.json, then config.json (a list of EOS ids: the first)
  (llama2 / 'tokenizer_config.json').write_text('{}')
  (llama2 / 'special_tokens_map.json').write_text('{"pad_token": {"content": "<unk>"}}')
  (llama2 / 'config.json').write_text(json.dumps({'eos_token_id': [5, 2]}))
  v = HfSentencePieceVocabulary(llama2)
  assert (v.pad_id, v.eos_id, v.bos_id, v.base_vocab_size) == (0, 5, 1, 360)


def test_errors_are_one_line_and_name_the_file(model_files, tmp_path):
  with pytest.raises(vocab.VocabularyNotFound, match='tokenizer.model'):
    HfSentencePieceVocabulary(tmp_path / 'missing')
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'tokenizer.model').write_bytes(b'not a sentencepiece model')
  for make in (HfSentencePieceVocabulary, lambda p: vocab.get_vocabulary(str(p))):
    with pytest.raises(vocab.VocabularyError) as e:
      make(broken)
    assert 'tokenizer.model' in str(e.value) and '\n' not in str(e.value)
  shutil.copy(model_files['llama'], broken / 'tokenizer.model')
  (broken / 'tokenizer_config.json').write_text('{"eos_token": ')
  with pytest.raises(vocab.VocabularyError, match='tokenizer_config.json'):
    HfSentencePieceVocabulary(broken)
  (broken / 'tokenizer_config.json').write_text('{"eos_token": "<nope>"}')
  with pytest.raises(vocab.VocabularyError, match="'<nope>' is not in the tokenizer"):
    HfSentencePieceVocabulary(broken)


def _task():
  def example(rng, split):
    return {'q': SENTENCES[int(rng.integers(6))], 'a': str(rng.integers(100))}
  return tasks.Task('hf_spm_task', GeneratedSource(example, {'train': 40}),
                    [Template('{q}', '{a}')])


@pytest.mark.parametrize('case', ['llama', 'gemma'])
@pytest.mark.parametrize('pack', [True, False])
def test_pipeline_uses_the_vocabularys_bos_eos_pad(case, pack, dirs):
  v, theirs = HfSentencePieceVocabulary(dirs[case]), _theirs(dirs[case])
  cfg = pipeline.PipelineConfig({'inputs': 24, 'targets': 8}, batch_size=4, pack=pack,
                                prefetch=0, feature_converter=DecoderOnlyFeatureConverter(
                                    inputs_eos=False))
  it = pipeline.train_iterator(_task(), v, cfg, 0, 1)
  b = next(it)
  it.close()
  seg, pos = b['decoder_segment_ids'], b['decoder_positions']
  starts, pad = (seg > 0) & (pos == 0), seg == 0
  assert (b['decoder_input_tokens'][starts] == v.bos_id).all() and v.add_bos
  assert (b['decoder_target_tokens'][pad] == v.pad_id).all()
  assert (b['decoder_input_tokens'][pad] == v.pad_id).all()
  for r in range(4):
    for s in set(seg[r][seg[r] > 0]):
      m = seg[r] == s
      ids = b['decoder_target_tokens'][r][m]
      w = b['decoder_loss_weights'][r][m]
      assert ids[-1] == v.eos_id and (ids[:-1] != v.eos_id).all()   # one EOS, after targets
      # the input row is what transformers makes: BOS + prompt, then the answer, then EOS
      row = b['decoder_input_tokens'][r][m].tolist() + [int(ids[-1])]
      expect = theirs(v.decode(ids[w == 0]), add_special_tokens=True).input_ids
      expect += theirs(v.decode(ids[w > 0]), add_special_tokens=False).input_ids + [v.eos_id]
      assert row == expect
  assert np.array_equal(b['decoder_task_ids'] >= 0, seg > 0)
