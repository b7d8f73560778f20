"""A SentencePiece vocabulary fitted to a mixture: T5 conventions, deterministic, cached."""

import os

from t5x_lite.data import spm_training, vocab


def test_mixture_vocabulary_is_deterministic_cached_and_follows_t5_conventions(tmp_path,
                                                                            monkeypatch):
  monkeypatch.setenv('T5X_LITE_CACHE', str(tmp_path / 'cache'))
  path = spm_training.mixture_vocabulary('builtin', vocab_size=500, examples_per_task=200)
  again = spm_training.mixture_vocabulary('builtin', vocab_size=500, examples_per_task=200)
  assert path == again and os.path.dirname(path) == str(tmp_path / 'cache')
  lines = spm_training.training_text('builtin', examples_per_task=200)
  other = spm_training.train_sentencepiece(lines, str(tmp_path / 'other.model'), vocab_size=500)
  assert open(path, 'rb').read() == open(str(tmp_path / 'other.model'), 'rb').read()
  v = vocab.SentencePieceVocabulary(path)
  assert v.vocab_size == other.vocab_size
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2) and v.vocab_size % 128 == 0
  ids = v.encode('Sort from smallest to largest: 55, 22, 12')
  pieces = [v.decode([i]) for i in ids]
  assert '5' in pieces and '55' not in pieces              # digits are split
  assert v.decode(v.encode('soixante-huit')) == 'soixante-huit'
  assert v.decode(v.encode('ÿ unseen ✓')) == 'ÿ unseen ✓'    # byte fallback, no UNK
  assert len(ids) < len('Sort from smallest to largest: 55, 22, 12') / 1.5
