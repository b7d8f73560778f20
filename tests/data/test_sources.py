"""Data sources: JSONL, CSV, TFDS (ArrayRecord, built locally) and generated; bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from t5x_lite.data import sources
from t5x_lite.data.sources import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return str(path)


def test_jsonl_reads_renames_and_skips_blank_lines(tmp_path):
  path = tmp_path / 'train.jsonl'
  path.write_text('{"sentence": "good film", "label": "positive"}\n\n'
                  '{"sentence": "bad — film", "label": "negative"}\n', encoding='utf-8')
  src = sources.JsonlSource({'train': str(path)}, field_map={'text': 'sentence'},
                            required_fields=['label'])
  split = src.split('train')
  assert len(split) == 2 and src.num_examples('train') == 2
  assert split[1] == {'sentence': 'bad — film', 'label': 'negative', 'text': 'bad — film'}
  with pytest.raises(DataError, match="no split 'test'"):
    src.split('test')


@pytest.mark.parametrize('content,message', [
    (b'{"inputs": "a", "targets": "b"}\n{"inputs": "c"}\n', r"train.jsonl:2: missing field\(s\) \['targets'\]"),
    (b'{"inputs": "a", "targets": "b"}\n{"inputs": "\xff\xfe", "targets": "x"}\n', r'train.jsonl:2: not valid UTF-8'),
    (b'{"inputs": "a", "targets": "b"}\n{"inputs": \n', r'train.jsonl:2: not valid JSON'),
    (b'["inputs", "targets"]\n', r'train.jsonl:1: expected a JSON object, got list'),
    (b'\n\n', r'holds no examples \(empty file\)'),
])
def test_jsonl_bad_input_names_file_and_line(tmp_path, content, message):
  (tmp_path / 'train.jsonl').write_bytes(content)
  with pytest.raises(DataError, match=message):
    sources.JsonlSource({'train': str(tmp_path / 'train.jsonl')},
                        required_fields=['inputs', 'targets'])


def test_jsonl_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match='no file matches'):
    sources.JsonlSource({'train': str(tmp_path / 'nope.jsonl')})


def test_csv_and_tsv(tmp_path):
  (tmp_path / 'a.csv').write_text('question,answer\n"what, exactly?",yes\nwhy,no\n')
  src = sources.CsvSource({'train': str(tmp_path / 'a.csv')}, required_fields=['answer'])
  assert src.split('train')[0] == {'question': 'what, exactly?', 'answer': 'yes'}
  (tmp_path / 'b.tsv').write_text('q\ta\nx\ty\n')
  assert sources.CsvSource({'train': str(tmp_path / 'b.tsv')}, delimiter='\t',
                           field_map={'answer': 'a'}).split('train')[0]['answer'] == 'y'
  with pytest.raises(DataError, match=r"missing column\(s\) \['label'\]"):
    sources.CsvSource({'train': str(tmp_path / 'a.csv')}, required_fields=['label'])


def _color(rng, split):
  return {'split': split, 'value': int(rng.integers(1_000_000))}


def test_generated_source_is_deterministic_per_index():
  a = sources.GeneratedSource(_color, {'train': 50, 'test': 5}, seed=3)
  b = sources.GeneratedSource(_color, {'train': 50, 'test': 5}, seed=3)
  assert [a.split('train')[i] for i in range(50)] == [b.split('train')[i] for i in range(50)]
  assert a.split('train')[7] != a.split('train')[8]
  assert sources.GeneratedSource(_color, {'train': 50}, seed=4).split('train')[7] != \
      a.split('train')[7]
  with pytest.raises(IndexError):
    a.split('test')[5]
  with pytest.raises(DataError, match='positive size'):
    sources.GeneratedSource(_color, {'train': 0})


class TinyReviews(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder made by the test itself (no downloads)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'sentence': tfds.features.Text(),
        'label': tfds.features.ClassLabel(names=['negative', 'positive']),
        'idx': np.int32}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(30), 'validation': self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'sentence': f'review number {i} — {"great" if i % 2 else "awful"}',
                'label': i % 2, 'idx': i}


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  TinyReviews(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  src = sources.TfdsSource('tiny_reviews', data_dir=str(tmp_path), field_map={'text': 'sentence'})
  assert set(src.splits) == {'train', 'validation'} and src.num_examples('train') == 30
  rows = [src.split('train')[i] for i in range(30)]
  assert sorted(r['idx'] for r in rows) == list(range(30))
  for r in rows:
    assert r['label'] == ('positive' if r['idx'] % 2 else 'negative')  # ClassLabel -> name
    assert r['text'] == r['sentence'] and isinstance(r['text'], str)
  with pytest.raises(DataError, match="has splits"):
    sources.TfdsSource('tiny_reviews', data_dir=str(tmp_path), splits=['test'])
  # Another process, without the builder class, reads it too, and never imports TensorFlow.
  code = f"""
import sys
from t5x_lite.data import sources
src = sources.TfdsSource('tiny_reviews', data_dir={str(tmp_path)!r})
print(src.num_examples('validation'), src.split('validation')[0]['label'] in ('negative', 'positive'),
      'tensorflow' in sys.modules)
"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['6', 'True', 'False']


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="TFDS dataset 'no_such_dataset' is not prepared"):
    sources.TfdsSource('no_such_dataset', data_dir=str(tmp_path))


def test_split_slices_select_lines_of_a_file(tmp_path):
  path = _write_jsonl(tmp_path / 'all.jsonl', [{'inputs': str(i), 'targets': 'x'} for i in range(10)])
  src = sources.JsonlSource({'train': f'{path}[3:]', 'validation': f'{path}[:3]'})
  assert [src.split('validation')[i]['inputs'] for i in range(3)] == ['0', '1', '2']
  assert len(src.split('train')) == 7 and src.split('train')[0]['inputs'] == '3'
  with pytest.raises(DataError, match=r'selects no examples'):
    sources.JsonlSource({'train': f'{path}[20:]'})
  (tmp_path / 'a.csv').write_text('q,a\n' + ''.join(f'{i},y\n' for i in range(5)))
  assert len(sources.CsvSource({'train': str(tmp_path / 'a.csv') + '[-2:]'}).split('train')) == 2
