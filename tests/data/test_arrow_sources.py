"""Parquet and Arrow sources: globs, save_to_disk directories, where filters, errors, resume."""

import json
import os
import pickle
import re
import subprocess
import sys

import gin
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t5x_lite import config
from t5x_lite.data import arrow_sources, file_tasks, sources
from t5x_lite.data.arrow_sources import ArrowSource, ParquetSource
from t5x_lite.data.sources import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TYPES = ['zs_opt', 'zs_noopt', 'fs_opt', 'fs_noopt']


def flan_rows(n, start=0):
  """Rows with the Flan 2022 sub-mixture columns."""
  return [{'inputs': f'question {i}', 'targets': f'answer {i}', 'task_source': 'Flan2021',
           'task_name': f'task_{i % 5}', 'template_type': TYPES[i % 4]}
          for i in range(start, start + n)]


def write_parquet(path, rows, row_group_size=7, **kwargs):
  pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size,
                 **kwargs)
  return str(path)


def save_to_disk(directory, table, num_shards=1, features=None, batch_rows=1000):
  """What `datasets.Dataset.save_to_disk(directory, num_shards=n)` writes
  (huggingface/datasets src/datasets/arrow_dataset.py): contiguous shards (`shard(n, i,
  contiguous=True)`), each an Arrow IPC *stream* `data-{i:05d}-of-{n:05d}.arrow` of record
  batches (ArrowWriter, features in the schema's 'huggingface' metadata), then state.json
  (`_data_files` in order; sorted keys, indent 2) and dataset_info.json (`features`)."""
  os.makedirs(directory)
  schema = table.schema.with_metadata(
      {'huggingface': json.dumps({'info': {'features': features}})})
  div, mod = divmod(len(table), num_shards)
  names = [f'data-{i:05d}-of-{num_shards:05d}.arrow' for i in range(num_shards)]
  for i, name in enumerate(names):
    start = div * i + min(i, mod)
    shard = table.slice(start, div + (i < mod)).cast(schema)
    with pa.OSFile(os.path.join(directory, name), 'wb') as sink:
      with pa.ipc.new_stream(sink, schema) as writer:
        for batch in shard.to_batches(max_chunksize=batch_rows):
          writer.write_batch(batch)
  state = {'_data_files': [{'filename': n} for n in names], '_fingerprint': '0123456789abcdef',
           '_format_columns': None, '_format_kwargs': {}, '_format_type': None,
           '_output_all_columns': False, '_split': 'train'}
  with open(os.path.join(directory, 'state.json'), 'w', encoding='utf-8') as f:
    json.dump(state, f, indent=2, sort_keys=True)
  info = {'builder_name': None, 'citation': '', 'config_name': None, 'dataset_size': None,
          'description': '', 'download_checksums': None, 'download_size': None,
          'features': features, 'homepage': '', 'license': '', 'size_in_bytes': None,
          'splits': None, 'supervised_keys': None, 'version': None}
  with open(os.path.join(directory, 'dataset_info.json'), 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=2)
  return str(directory)


SST2_FEATURES = {'sentence': {'dtype': 'string', '_type': 'Value'},
                 'label': {'names': ['negative', 'positive'], '_type': 'ClassLabel'},
                 'idx': {'dtype': 'int32', '_type': 'Value'}}


def sst2_table(n):
  return pa.table({'sentence': [f'review {i}' for i in range(n)],
                   'label': pa.array([i % 2 for i in range(n)], pa.int64()),
                   'idx': pa.array(range(n), pa.int32())})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('T5X_LITE_CACHE', str(tmp_path / 'cache'))
  return tmp_path / 'cache' / 'arrow'


def test_parquet_glob_in_place_and_converted_read_the_same_rows(tmp_path, cache):
  rows = flan_rows(50)
  write_parquet(tmp_path / 'train-00000-of-00002.parquet', rows[:20])
  write_parquet(tmp_path / 'train-00001-of-00002.parquet', rows[20:], row_group_size=6)
  glob = str(tmp_path / 'train-*.parquet')
  in_place = ParquetSource({'train': glob, 'validation': glob + '[45:]'},
                           field_map={'question': 'inputs'}, required_fields=['targets'])
  assert not cache.exists()       # small files: read where they are
  split = in_place.split('train')
  order = np.random.default_rng(0).permutation(50)    # the pipeline reads shuffled
  assert [split[int(i)] for i in order] == [dict(rows[i], question=rows[i]['inputs'])
                                           for i in order]
  assert [r['inputs'] for r in in_place.split('validation')] == [f'question {i}'
                                                                 for i in range(45, 50)]
  converted = ParquetSource({'train': glob}, max_in_place_bytes=0)
  assert sorted(p.name.split('.')[0] for p in cache.iterdir()) == ['train-00000-of-00002',
                                                                   'train-00001-of-00002']
  assert [converted.split('train')[int(i)] for i in order] == [rows[i] for i in order]
  stamps = sorted(p.stat().st_mtime_ns for p in cache.iterdir())
  ParquetSource({'train': glob}, max_in_place_bytes=0)    # converted once
  assert sorted(p.stat().st_mtime_ns for p in cache.iterdir()) == stamps
  # A copy (another process) reopens the files; a directory of Parquet files reads the same.
  copy = pickle.loads(pickle.dumps(split))
  assert [copy[i] for i in range(50)] == [split[i] for i in range(50)]
  assert ParquetSource({'train': str(tmp_path)}).split('train')[49] == rows[49]
  assert split[-1] == split[49]
  with pytest.raises(IndexError):
    split[50]


def test_save_to_disk_directories_and_arrow_files(tmp_path):
  """A two-shard save_to_disk directory, rows in `_data_files` order, ClassLabel ints as
  names; a single `.arrow` stream file and an IPC file-format file read the same."""
  table = sst2_table(2501)
  directory = save_to_disk(tmp_path / 'sst2', table, num_shards=2, features=SST2_FEATURES)
  assert sorted(os.listdir(directory)) == ['data-00000-of-00002.arrow',
                                           'data-00001-of-00002.arrow', 'dataset_info.json',
                                           'state.json']
  split = ArrowSource({'train': directory}, required_fields=['sentence', 'label']).split(
      'train')
  assert len(split) == 2501
  for i in (0, 999, 1000, 1250, 1251, 2500):      # batch and shard boundaries
    assert split[i] == {'sentence': f'review {i}', 'label': ['negative', 'positive'][i % 2],
                        'idx': i}
  raw = ArrowSource({'train': directory}, class_label_names=False).split('train')
  assert raw[3]['label'] == 1
  stream = os.path.join(directory, 'data-00001-of-00002.arrow')
  assert ArrowSource({'t': stream + '[:2]'}).split('t')[1]['sentence'] == 'review 1252'
  with pa.OSFile(str(tmp_path / 'file.arrow'), 'wb') as sink:
    with pa.ipc.new_file(sink, table.schema) as writer:
      writer.write_table(table, max_chunksize=100)
  file_split = ArrowSource({'t': str(tmp_path / 'file.arrow')}).split('t')
  assert [file_split[i] for i in (0, 2500)] == [raw[0], raw[2500]]
  # DatasetDict.save_to_disk: a directory per split and dataset_dict.json
  (tmp_path / 'dict').mkdir()
  (tmp_path / 'dict' / 'dataset_dict.json').write_text('{"splits": ["train", "test"]}')
  with pytest.raises(DataError, match=r"holds a DatasetDict \(splits \['train', 'test'\]\): "
                                      r"name one split's directory, e.g. '.*dict/train'"):
    ArrowSource({'train': str(tmp_path / 'dict')})


def test_where_cuts_one_file_into_tasks_computed_once_per_file(tmp_path, monkeypatch):
  rows = flan_rows(40)
  path = write_parquet(tmp_path / 'flan.parquet', rows)
  directory = save_to_disk(tmp_path / 'flan', pa.Table.from_pylist(rows), batch_rows=9)
  calls = []
  real = arrow_sources._filter_rows
  monkeypatch.setattr(arrow_sources, '_filter_rows',
                      lambda shard, where: calls.append(shard.path) or real(shard, where))
  zs = {'template_type': ['zs_opt', 'zs_noopt']}
  for source in (ParquetSource, ArrowSource):
    spec = path if source is ParquetSource else directory
    split = source({'train': spec}, where=zs).split('train')
    assert [split[i] for i in range(len(split))] == [r for r in rows if r['template_type']
                                                     in zs['template_type']]
    both = source({'train': spec + '[1:3]'}, where={'template_type': 'fs_opt',
                                                   'task_name': ['task_2', 'task_3']})
    assert [r['inputs'] for r in both.split('train')] == ['question 18', 'question 22']
    source({'train': spec}, where=zs)        # the same filter again: from the cache
  assert len(calls) == 4
  # JSONL and CSV files take the same filters (CSV compares text).
  (tmp_path / 'flan.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  jsonl = sources.JsonlSource({'train': str(tmp_path / 'flan.jsonl') + '[1:]'},
                              where={'task_name': 'task_4'})
  assert [r['inputs'] for r in jsonl.split('train')] == [f'question {i}'
                                                        for i in range(9, 40, 5)]
  (tmp_path / 'a.csv').write_text('q,n\nx,1\ny,2\nz,1\n')
  assert [r['q'] for r in sources.CsvSource({'t': str(tmp_path / 'a.csv')},
                                            where={'n': [1]}).split('t')] == ['x', 'z']


def _error(make):
  with pytest.raises(DataError) as info:
    make()
  message = str(info.value)
  assert '\n' not in message, message
  return message


def test_bad_files_filters_and_slices_are_one_line_errors(tmp_path):
  path = write_parquet(tmp_path / 'flan.parquet', flan_rows(12))
  directory = save_to_disk(tmp_path / 'ds', pa.Table.from_pylist(flan_rows(12)))
  (tmp_path / 'empty_dir').mkdir()
  cases = [
      (lambda: ParquetSource({'train': str(tmp_path / 'train-*.parquet')}),
       r"no file matches '.*train-\*.parquet'"),
      (lambda: ArrowSource({'train': str(tmp_path / 'empty_dir')}),
       r'empty_dir is not a directory written by datasets.save_to_disk: it has no state.json '
       r'or dataset_info.json'),
      (lambda: ParquetSource({'train': str(tmp_path / 'empty_dir')}),
       r'empty_dir is a directory with no .parquet file'),
      (lambda: ParquetSource({'train': path}, required_fields=['answer']),
       r"flan.parquet: missing column\(s\) \['answer'\]; the file has columns \['inputs', "
       r"'targets', 'task_source', 'task_name', 'template_type'\]"),
      (lambda: ArrowSource({'train': directory}, field_map={'q': 'question'}),
       r"data-00000-of-00001.arrow: missing column\(s\) \['question'\]; the file has columns"),
      (lambda: ParquetSource({'train': path}, where={'split': ['train']}),
       r"flan.parquet: where= column 'split' is not in the file; it has columns \['inputs'"),
      (lambda: ArrowSource({'train': directory}, where={'task_name': ['task_9', 'task_7']}),
       r"where=\{'task_name': \['task_9', 'task_7'\]\} selects no rows; column 'task_name' "
       r"has values \['task_0', 'task_1', 'task_2', 'task_3', 'task_4'\]"),
      (lambda: ParquetSource({'train': path}, where={'task_name': [3]}),
       r"where= values \[3\] do not fit column 'task_name' of type string"),
      (lambda: ParquetSource({'train': path + '[20:]'}),
       r'flan.parquet\[20:\] selects no examples \(of the 12 rows\)'),
      (lambda: ParquetSource({'train': path + '[5:]'}, where={'task_name': 'task_0'}),
       r'flan.parquet\[5:\] selects no examples \(of the 3 rows where= keeps\)'),
      (lambda: ParquetSource({'train': path}, where=['task_name']), r'where must map a column'),
      (lambda: sources.JsonlSource({'train': _jsonl(tmp_path)}, where={'lang': 'fr'}),
       r"where=\{'lang': \['fr'\]\} selects no rows; column 'lang' has values \['de', 'en'\]"),
  ]
  for make, pattern in cases:
    assert re.search(pattern, _error(make)), pattern
  many = write_parquet(tmp_path / 'many.parquet', [{'t': f'v{i:02d}'} for i in range(30)])
  assert '(first 10 of 30)' in _error(lambda: ParquetSource({'train': many}, where={'t': 'x'}))


def _jsonl(tmp_path):
  path = tmp_path / 'langs.jsonl'
  path.write_text('{"text": "a", "lang": "en"}\n{"text": "b", "lang": "de"}\n')
  return str(path)


@pytest.mark.parametrize('kind', ['parquet', 'parquet_no_statistics', 'arrow'])
def test_a_null_in_a_needed_column_names_file_row_and_column(tmp_path, kind):
  rows = flan_rows(20)
  rows[13]['targets'] = None
  if kind == 'arrow':
    spec = save_to_disk(tmp_path / 'ds', pa.Table.from_pylist(rows), batch_rows=5)
    make, label = ArrowSource, 'data-00000-of-00001.arrow'
  else:
    spec = write_parquet(tmp_path / 'n.parquet', rows,
                         write_statistics=kind == 'parquet')
    make, label = ParquetSource, 'n.parquet'
  message = _error(lambda: make({'train': spec}, required_fields=['targets']))
  assert re.search(label + r": row 13: column 'targets' is null; give it a value, or leave "
                   r'the row out', message), message
  # Not needed, or left out by the slice or the filter: no error.
  assert make({'train': spec}).split('train')[13]['targets'] is None
  assert len(make({'train': spec + '[:13]'}, required_fields=['targets']).split('train')) == 13
  assert len(make({'train': spec}, required_fields=['targets'],
                  where={'template_type': 'zs_opt'}).split('train')) == 5


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_the_docs_gin_example_reads_a_parquet_glob_and_a_save_to_disk_directory(
    tmp_path, clean_gin):
  """docs/data.md's example, run on files laid out as it names them."""
  with open(os.path.join(REPO, 'docs', 'data.md'), encoding='utf-8') as f:
    page = f.read()
  block = re.search(r'### Parquet and Arrow files.*?```gin\n(.*?)```', page, re.S).group(1)
  flan = tmp_path / 'flan2021_submix_original' / 'data'
  flan.mkdir(parents=True)
  write_parquet(flan / 'train-00000-of-00002.parquet', flan_rows(30))
  write_parquet(flan / 'train-00001-of-00002.parquet', flan_rows(30, start=30))
  for split, n in (('train', 40), ('validation', 600)):
    save_to_disk(tmp_path / 'glue_sst2' / split, sst2_table(n), features=SST2_FEATURES)
  (tmp_path / 'mixture.gin').write_text(block)
  config.parse_gin([str(tmp_path / 'mixture.gin')], [f'DATA_DIR={tmp_path}'])
  mixture = config.mixture_name_or_object()
  counts = {t.name: t.num_examples('train') for t, _ in mixture.tasks_and_rates()}
  assert counts == {'flan2021_zs': 30, 'flan2021_fs': 30, 'sst2_arrow': 40}
  sst2 = next(t for t, _ in mixture.tasks_and_rates() if t.name == 'sst2_arrow')
  assert sst2.num_examples('validation') == 500
  rendered = sst2.render('validation', 1, sst2.eval_rng(1), fmt='zs_opt')
  assert rendered['targets'] == 'positive' and rendered['inputs'].startswith('review 1\n')
  flan_fs = next(t for t, _ in mixture.tasks_and_rates() if t.name == 'flan2021_fs')
  assert flan_fs.example('train', 0)['template_type'] == 'fs_opt'
  assert flan_fs.example('train', 29)['inputs'] == 'question 59'


RESUME_SCRIPT = """
import hashlib, json, sys
sys.path.insert(0, {repo!r})
from t5x_lite.data import file_tasks, pipeline, vocab
tasks = [file_tasks.file_task(f'p{{k}}', {{'train': {parquet!r}}}, [('{{inputs}}', '{{targets}}')],
                              where={{'template_type': types}}, register=False)
         for k, types in enumerate([['zs_opt', 'zs_noopt'], ['fs_opt', 'fs_noopt']])]
tasks.append(file_tasks.file_task('a', {{'train': {arrow!r}}}, [('{{sentence}}', '{{label}}')],
                                  register=False))
mixture = file_tasks.file_mixture('m', tasks, register=False)
cfg = pipeline.PipelineConfig({{'inputs': 32, 'targets': 16}}, batch_size=4, seed=3,
                              prefetch=0, shuffle_window=50)
it = pipeline.train_iterator(mixture, vocab.ByteVocabulary(), cfg, 0, 1)
if sys.argv[1] == 'save':
  for _ in range(6):
    next(it)
  print(json.dumps(it.get_state()))
else:
  it.set_state(json.loads(sys.stdin.read()))
print(json.dumps([hashlib.sha256(b''.join(b[k].tobytes() for k in sorted(b))).hexdigest()
                  for b in (next(it) for _ in range(12))]))
"""


def test_resume_in_a_new_process_is_bitwise_with_parquet_and_arrow_tasks(tmp_path):
  parquet = write_parquet(tmp_path / 'flan.parquet', flan_rows(300), row_group_size=32)
  arrow = save_to_disk(tmp_path / 'sst2', sst2_table(120), num_shards=2,
                       features=SST2_FEATURES, batch_rows=25)
  script = tmp_path / 'resume.py'
  script.write_text(RESUME_SCRIPT.format(repo=REPO, parquet=parquet, arrow=arrow))

  def run(mode, stdin=''):
    out = subprocess.run([sys.executable, str(script), mode], input=stdin, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()

  state, expected = run('save')
  [resumed] = run('restore', state)
  assert resumed == expected and len(set(json.loads(expected))) == 12


MEMORY_SCRIPT = """
import json, os, re, sys
import numpy as np
def anon_mb():
  return int(re.search(r'RssAnon:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024
from t5x_lite.data.arrow_sources import ArrowSource
before = anon_mb()
split = ArrowSource({{'train': {directory!r}}}).split('train')
for i in np.random.default_rng(0).integers(0, len(split), 2000):
  split[int(i)]
print(json.dumps([len(split), anon_mb() - before]))
"""


def test_opening_and_reading_a_big_save_to_disk_directory_stays_memory_mapped(tmp_path):
  """200k rows (~100 MB of Arrow): opening it and 2,000 random reads add little anonymous
  memory (the rows stay in the page cache of the mapped file)."""
  text = pa.array(['x' * 480] * 1000)
  table = pa.table({'inputs': pa.concat_arrays([text] * 200), 'n': pa.array(range(200_000))})
  directory = save_to_disk(tmp_path / 'big', table)
  del table, text
  size_mb = os.path.getsize(os.path.join(directory, 'data-00000-of-00001.arrow')) / 2**20
  assert size_mb > 90
  out = subprocess.run([sys.executable, '-c', MEMORY_SCRIPT.format(directory=directory)],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, 'PYTHONPATH': REPO})
  assert out.returncode == 0, out.stderr
  rows, added_mb = json.loads(out.stdout)
  assert rows == 200_000 and added_mb < 20, added_mb


def test_a_real_save_to_disk_directory_when_datasets_is_installed(tmp_path):
  datasets = pytest.importorskip('datasets')
  features = datasets.Features({'sentence': datasets.Value('string'),
                                'label': datasets.ClassLabel(names=['negative', 'positive'])})
  dataset = datasets.Dataset.from_dict({'sentence': [f's{i}' for i in range(7)],
                                        'label': [i % 2 for i in range(7)]}, features=features)
  dataset.save_to_disk(str(tmp_path / 'd'), num_shards=2)
  split = ArrowSource({'train': str(tmp_path / 'd')}).split('train')
  assert [split[i] for i in range(7)] == [
      {'sentence': f's{i}', 'label': ['negative', 'positive'][i % 2]} for i in range(7)]


def test_file_task_dispatches_on_extension_and_directory(tmp_path):
  write_parquet(tmp_path / 'p.parquet', flan_rows(8))
  save_to_disk(tmp_path / 'ds', pa.Table.from_pylist(flan_rows(8)))
  for spec, kind in (('p.parquet', ParquetSource), ('ds', ArrowSource),
                     ('.', ParquetSource)):     # a directory of .parquet files
    task = file_tasks.file_task('t', {'train': spec}, [('{inputs}', '{targets}')],
                                data_dir=str(tmp_path), where={'task_name': 'task_1'},
                                register=False)
    assert isinstance(task.source, kind) and task.num_examples('train') == 2
  with pytest.raises(DataError, match=r"no file matches '.*nothing'"):
    file_tasks.file_task('t', {'train': 'nothing'}, [('{inputs}', '{targets}')],
                         data_dir=str(tmp_path), register=False)
  with pytest.raises(DataError, match=r"all be .jsonl/.json or all .csv/.tsv .*\['.arrow', "
                                      r"'.parquet'\]"):
    file_tasks.file_task('t', {'train': 'p.parquet', 'test': 'ds'},
                         [('{inputs}', '{targets}')], data_dir=str(tmp_path), register=False)
