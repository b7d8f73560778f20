"""The published collections as runnable recipes (gin_configs/recipes/, issue #31 part 2).

Fixture files with exactly the published layouts and column schemas (Flan 2022's five
Parquet sub-mixtures, xP3's per-language JSONL directories, a raw-text corpus); each recipe
trains a few steps through the CLI and is evaluated; the sampling proportions realised by the
pipeline over 20,000 draws match the published rates within 4 binomial sigmas; the per-value
cap (Flan's per-task example caps) by hand.
"""

import json
import zlib

import gin
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t5x_lite import cli, config, models
from t5x_lite.commands import convert
from t5x_lite.data import arrow_sources, file_tasks, pipeline, table_rows, unimax
from t5x_lite.data.arrow_sources import ArrowSource, ParquetSource
from t5x_lite.data.sources import DataError
from t5x_lite.data.vocab import ByteVocabulary
from t5x_lite.rundir import run_config, writers
from t5x_lite.training import losses

RECIPES = 'gin_configs/recipes'
TINY_RUN = ['--gin_file=gin_configs/models/flan_t5/tiny.gin',
            '--gin_file=gin_configs/runs/finetune.gin']
SHORT = ['--gin.TASK_FEATURE_LENGTHS={"inputs": 64, "targets": 16}', '--gin.BATCH_SIZE=8',
         '--gin.TRAIN_STEPS=2', '--gin.LOG_PERIOD=1', '--gin.CHECKPOINT_PERIOD=2',
         '--gin.EVAL_PERIOD=0', '--gin.loop.TrainConfig.progress_bar=False',
         '--gin.loop.TrainConfig.eval_max_examples=1', '--gin.loop.TrainConfig.eval_batch_size=8']
DRAWS = 20_000

# --- Flan 2022 ------------------------------------------------------------------------------
# The Hub's DataProvenanceInitiative/<name>_submix_original: data/train-*.parquet, five string
# columns (their dataset cards' `dataset_info.features`).
FLAN_COLUMNS = ('inputs', 'targets', 'task_source', 'task_name', 'template_type')
ALL4, OPT2 = ('zs_opt', 'fs_opt', 'zs_noopt', 'fs_noopt'), ('zs_opt', 'fs_opt')
COT = ['cot_gsm8k', 'cot_strategyqa', 'cot_creak', 'cot_qasc', 'cot_esnli', 'cot_ecqa',
       'cot_sensemaking', 'stream_aqua', 'stream_qed']
# collection -> (task_source, template types, rows of each task_name per template type)
FLAN = {
    'flan2021': ('Flan2021', ALL4, {'anli_r1:0.1.0': 400, 'cosmos_qa:1.0.0': 150,
                                    'glue_sst2:2.0.0': 60, 'trec:1.0.0': 20}),
    't0': ('T0', ALL4, {'adversarial_qa_dbert_answer_the_following_q': 150,
                        'cos_e_v1.11_generate_explanation_given_text': 120}),
    'niv2': ('NIv2', OPT2, {'task1389_hellaswag_completion': 150,
                            'task228_arc_answer_generation_easy': 120}),
    'cot': ('CoT', OPT2, {n: 30 for n in COT + [c + '_ii' for c in COT]}),
    'dialog': ('Dialog', OPT2, {'wiki_dialog': 130, 'qrecc': 120, 'wiki_dialog_ii': 130,
                                'qrecc_ii': 120}),
}
# flan/v2/run_example.py (FLAN e9e4ec6): the sub-mixtures' rates, template types at 1 each;
# CoT and Dialog: the tasks at 1, their input inversions (_ii) at 0.3 (flan/v2/mixtures.py).
COLLECTION_RATES = {'flan2021': 0.4, 't0': 0.32, 'niv2': 0.2, 'cot': 0.05, 'dialog': 0.03}


def _flan_expected() -> dict:
  rates = {}
  for collection, (_, types, _) in FLAN.items():
    share = COLLECTION_RATES[collection] / len(types)
    for t in types:
      if collection in ('cot', 'dialog'):
        rates[f'{collection}_{t}'] = share * 1 / 1.3
        rates[f'{collection}_ii_{t}'] = share * 0.3 / 1.3
      else:
        rates[f'{collection}_{t}'] = share
  return rates


def _flan_rows(collection: str) -> list[dict]:
  source, types, counts = FLAN[collection]
  rows = [{'inputs': f'{name} {t} question {i}', 'targets': f'answer {i}',
           'task_source': source, 'task_name': name, 'template_type': t}
          for t in types for name, n in counts.items() for i in range(n)]
  order = np.random.default_rng(zlib.crc32(collection.encode())).permutation(len(rows))
  return [rows[i] for i in order]   # the published files interleave tasks and templates


@pytest.fixture(scope='module')
def flan_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('flan')
  schema = pa.schema([(c, pa.string()) for c in FLAN_COLUMNS])
  for collection in FLAN:
    rows = _flan_rows(collection)
    data = root / f'{collection}_submix_original' / 'data'
    data.mkdir(parents=True)
    shards = 2 if collection == 'flan2021' else 1   # flan2021: train-0000{0,1}-of-00002-*
    for k, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
      table = pa.Table.from_pylist([rows[i] for i in part], schema=schema)
      pq.write_table(table, str(data / f'train-{k:05d}-of-{shards:05d}-{k:016x}.parquet'),
                     row_group_size=500)
  return root


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _recipe_mixture(name: str, bindings: list[str]):
  config.parse_gin([f'{RECIPES}/{name}'], bindings)
  return config.mixture_name_or_object()


def _realised(mixture) -> np.ndarray:
  """Each task's share of DRAWS unpacked examples drawn by the training pipeline."""
  it = pipeline.train_iterator(mixture, ByteVocabulary(), pipeline.PipelineConfig(
      {'inputs': 16, 'targets': 4}, batch_size=1000, pack=False, prefetch=0), 0, 1)
  counts = np.zeros(len(mixture.tasks))
  for _ in range(DRAWS // 1000):
    counts += np.bincount(next(it)['decoder_task_ids'][:, 0], minlength=len(counts))
  it.close()
  assert counts.sum() == DRAWS
  return counts / DRAWS


def _within_binomial(realised, expected, names):
  p = np.asarray(expected)
  sigma = np.sqrt(p * (1 - p) / DRAWS)
  bad = {n: (float(r), float(e)) for n, r, e, s in zip(names, realised, p, sigma)
         if abs(r - e) > 4 * s}
  assert not bad, bad


def test_flan2022_realised_proportions_match_the_published_rates(flan_dir, clean_gin):
  mixture = _recipe_mixture('flan2022.gin', [f'FLAN_DIR={flan_dir}'])
  names = [t.name for t in mixture.tasks]
  expected = _flan_expected()
  assert sorted(names) == sorted(expected)
  rates = dict((t.name, r) for t, r in mixture.tasks_and_rates())
  assert rates == pytest.approx(expected)
  realised = _realised(mixture)
  _within_binomial(realised, [expected[n] for n in names], names)
  by_collection = {c: sum(r for n, r in zip(names, realised) if n.startswith(c + '_'))
                   for c in COLLECTION_RATES}
  _within_binomial(list(by_collection.values()), list(COLLECTION_RATES.values()),
                   list(by_collection))
  print('realised vs published:', {c: (round(by_collection[c], 4), COLLECTION_RATES[c])
                                   for c in COLLECTION_RATES})
  # Each task reads its template type (and, for CoT/Dialog, its task names) only.
  task = {t.name: t for t in mixture.tasks}
  for name in ('flan2021_fs_noopt', 'cot_ii_zs_opt', 'dialog_fs_opt'):
    rows = [task[name].example(s, i) for s in ('train', 'validation')
            for i in range(task[name].num_examples(s))]
    assert {r['template_type'] for r in rows} == {'_'.join(name.split('_')[-2:])}
    assert all(r['task_name'].endswith('_ii') == ('_ii_' in name) for r in rows)


def _task_name_counts(task) -> dict:
  counts: dict = {}
  for split in ('train', 'validation'):
    for i in range(task.num_examples(split)):
      name = task.example(split, i)['task_name']
      counts[name] = counts.get(name, 0) + 1
  return counts


def test_flan2022_caps_each_task_name_at_its_collection_cap(flan_dir, clean_gin):
  """min(cap, rows) rows of every task_name (register_mixture's rate), over train +
  validation; at the published caps (30000, ...) the fixture's tasks are all under them."""
  full = FLAN['flan2021'][2]
  mixture = _recipe_mixture('flan2022.gin', [f'FLAN_DIR={flan_dir}'])
  zs = next(t for t in mixture.tasks if t.name == 'flan2021_zs_opt')
  assert _task_name_counts(zs) == full
  gin.clear_config()
  mixture = _recipe_mixture('flan2022.gin', [f'FLAN_DIR={flan_dir}', 'FLAN2021_CAP=100'])
  for t in mixture.tasks:
    if t.name.startswith('flan2021_'):
      assert _task_name_counts(t) == {n: min(100, c) for n, c in full.items()}, t.name
      # 100 + 100 + 60 + 20 rows kept: the first 200 validate, 80 train. Sampled uniformly,
      # each task_name's share is min(cap, n) / sum: seqio's capped examples-proportional rate.
      assert (t.num_examples('validation'), t.num_examples('train')) == (200, 80)


def test_flan2022_recipe_trains_and_evaluates_through_the_cli(flan_dir, tmp_path, clean_gin):
  model_dir = tmp_path / 'run'
  assert cli.main(['train', *TINY_RUN, f'--gin_file={RECIPES}/flan2022.gin',
                   f'--gin.FLAN_DIR={flan_dir}', *SHORT, f'--model_dir={model_dir}']) == 0
  records = writers.read_metrics(str(model_dir))
  keys = {k for r in records for k in r}
  expected = _flan_expected()
  for name, rate in expected.items():
    assert f'eval/{name}/exact_match' in keys or any(
        k.startswith('eval/') and k.endswith(f'/{name}/exact_match') for k in keys), name
    logged = [r[f'train/{name}/rate'] for r in records if f'train/{name}/rate' in r]
    assert logged and logged[-1] == pytest.approx(rate)
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2]
  # eval can rebuild the run from its config.gin (builders it allows only).
  run_config.check('config.gin', (model_dir / 'config.gin').read_text())


# --- the per-value cap by hand ----------------------------------------------------------------

def _cap_rows():
  counts = {'a': 50, 'b': 7, 'c': 20}
  rows = [{'inputs': f'{name} {i}', 'targets': 't', 'task_name': name,
           'template_type': ('zs_opt', 'fs_opt')[i % 2]}
          for name, n in counts.items() for i in range(2 * n)]   # half of them zs_opt
  order = np.random.default_rng(0).permutation(len(rows))
  return [rows[i] for i in order]


def test_cap_keeps_at_most_cap_rows_per_value_after_where_before_the_slice(tmp_path):
  rows = _cap_rows()
  path = str(tmp_path / 'c.parquet')
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=13)
  where = {'template_type': 'zs_opt'}
  source = ParquetSource({'train': path}, where=where, cap={'task_name': 10})
  kept = list(source.split('train'))
  counts = {n: sum(r['task_name'] == n for r in kept) for n in 'abc'}
  assert counts == {'a': 10, 'b': 7, 'c': 10}          # min(10, 50), min(10, 7), min(10, 20)
  assert {r['template_type'] for r in kept} == {'zs_opt'}
  assert len({r['inputs'] for r in kept}) == 27        # distinct rows, no repeats
  file_order = {r['inputs']: i for i, r in enumerate(rows)}
  assert [file_order[r['inputs']] for r in kept] == sorted(file_order[r['inputs']] for r in kept)
  # Deterministic: rebuilt (cache cleared) or in another file format, the same rows.
  arrow_sources._filters.items.clear()
  again = ParquetSource({'train': path}, where=where, cap={'task_name': 10})
  assert list(again.split('train')) == kept
  with pa.OSFile(str(tmp_path / 'c.arrow'), 'wb') as sink:
    with pa.ipc.new_file(sink, pa.Table.from_pylist(rows).schema) as writer:
      writer.write_table(pa.Table.from_pylist(rows), max_chunksize=11)
  arrow = ArrowSource({'train': str(tmp_path / 'c.arrow')}, where=where, cap={'task_name': 10})
  assert list(arrow.split('train')) == kept
  # The slice applies to the capped rows; a cap above every count keeps everything.
  assert list(ParquetSource({'train': path + '[:5]'}, where=where,
                            cap={'task_name': 10}).split('train')) == kept[:5]
  assert len(ParquetSource({'train': path}, where=where, cap={'task_name': 50}).split('train')) \
      == 77
  # Through file_task, with the pipeline's view of the task.
  task = file_tasks.file_task('capped', {'train': path}, [('{inputs}', '{targets}')],
                              where=where, cap={'task_name': 3}, register=False)
  assert task.num_examples('train') == 9


def test_capped_rows_is_a_uniform_sample_without_replacement():
  """Over 2,000 seeds, each of a value's 100 rows is kept with probability 10/100 (4 sigma);
  a value under the cap keeps all its rows."""
  codes = np.array([0] * 100 + [1] * 5, np.int32)[np.random.default_rng(1).permutation(105)]
  hits = np.zeros(105)
  for seed in range(2000):
    kept = table_rows.capped_rows(codes, 10, seed)
    assert np.all(np.diff(kept) > 0)
    assert np.bincount(codes[kept], minlength=2).tolist() == [10, 5]
    hits[kept] += 1
  over = hits[codes == 0] / 2000
  assert np.all(np.abs(over - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 2000)), over
  assert np.all(hits[codes == 1] == 2000)


def test_cap_errors_are_one_line(tmp_path):
  path = str(tmp_path / 'c.parquet')
  pq.write_table(pa.Table.from_pylist(_cap_rows()), path)
  for bad in ({'task_name': 0}, {'task_name': True}, {'a': 1, 'b': 2}, ['task_name', 3]):
    with pytest.raises(DataError, match='cap maps one column to the most rows kept per value'):
      ParquetSource({'train': path}, cap=bad)
  with pytest.raises(DataError, match=r"c.parquet: cap= column 'task' is not in the file"):
    ParquetSource({'train': path}, cap={'task': 3})
  (tmp_path / 'c.jsonl').write_text('{"inputs": "a", "targets": "b", "task_name": "x"}\n')
  with pytest.raises(DataError, match=r"task j: cap= needs Parquet or Arrow files"):
    file_tasks.file_task('j', {'train': str(tmp_path / 'c.jsonl')}, [('{inputs}', '{targets}')],
                         cap={'task_name': 1}, register=False)


# --- xP3 --------------------------------------------------------------------------------------
# bigscience/xP3: one directory per language code, JSONL files of {"inputs", "targets"}.
XP3_LANGS = ['ak', 'ar', 'as', 'bm', 'bn', 'ca', 'code', 'en', 'es', 'eu', 'fon', 'fr', 'gu',
             'hi', 'id', 'ig', 'ki', 'kn', 'lg', 'ln', 'ml', 'mr', 'ne', 'nso', 'ny', 'or', 'pa',
             'pt', 'rn', 'rw', 'sn', 'st', 'sw', 'ta', 'te', 'tn', 'ts', 'tum', 'tw', 'ur', 'vi',
             'wo', 'xh', 'yo', 'zh', 'zu']
XP3_TRAIN = {lang: 10 + 13 * i for i, lang in enumerate(XP3_LANGS)}   # 10 .. 595 train lines
XP3_BUDGET, XP3_EPOCHS = 9000, 2


@pytest.fixture(scope='module')
def xp3_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('xp3')
  for lang, n in XP3_TRAIN.items():
    (root / lang).mkdir()
    lines = [json.dumps({'inputs': f'{lang} prompt {i}?', 'targets': f'{lang} {i}'},
                        ensure_ascii=False) for i in range(100 + n)]   # 100: validation
    half = len(lines) // 2   # two files, read in name order as one split
    (root / lang / f'xp3_{lang}_a_prompt.jsonl').write_text('\n'.join(lines[:half]) + '\n')
    (root / lang / f'xp3_{lang}_b_prompt.jsonl').write_text('\n'.join(lines[half:]) + '\n')
  return root


def test_jsonl_globs_and_directories_read_their_files_in_name_order(tmp_path):
  from t5x_lite.data.sources import JsonlSource  # pylint: disable=import-outside-toplevel
  (tmp_path / 'd').mkdir()
  for name, start in (('b.jsonl', 3), ('a.jsonl', 0), ('c.jsonl', 6)):
    (tmp_path / 'd' / name).write_text(''.join(
        json.dumps({'inputs': str(i), 'targets': 'x', 'k': i % 2}) + '\n'
        for i in range(start, start + 3)))
  (tmp_path / 'd' / 'notes.txt').write_text('not read')
  for spec in ('d', 'd/*.jsonl'):
    source = JsonlSource({'train': str(tmp_path / spec) + '[2:7]'})
    assert [r['inputs'] for r in source.split('train')] == ['2', '3', '4', '5', '6']
    assert source.files['train'] == [str(tmp_path / 'd' / n) for n in ('a.jsonl', 'b.jsonl',
                                                                       'c.jsonl')]
  odd = JsonlSource({'train': str(tmp_path / 'd')}, where={'k': 1})
  assert [r['inputs'] for r in odd.split('train')] == ['1', '3', '5', '7']
  one = JsonlSource({'train': str(tmp_path / 'd' / 'a.jsonl')})
  assert one.files['train'] == str(tmp_path / 'd' / 'a.jsonl')   # one file: its path
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='is a directory with no .jsonl file'):
    JsonlSource({'train': str(tmp_path / 'empty')})
  with pytest.raises(DataError, match=r"d/c.jsonl:2: missing field\(s\) \['label'\]"):
    JsonlSource({'train': str(tmp_path / 'd')}, required_fields=['label'],
                where={'inputs': '7'})


def test_xp3_tasks_per_language_and_unimax_proportions(xp3_dir, clean_gin):
  mixture = _recipe_mixture('xp3.gin', [f'XP3_DIR={xp3_dir}', f'XP3_UNIMAX_BUDGET={XP3_BUDGET}',
                                        f'XP3_UNIMAX_EPOCHS={XP3_EPOCHS}'])
  tasks = mixture.tasks
  assert [(t.name, t.language) for t in tasks] == [(f'xp3_{l}', l) for l in XP3_LANGS]
  assert [t.num_examples('train') for t in tasks] == list(XP3_TRAIN.values())
  assert all(t.num_examples('validation') == 100 for t in tasks)
  fr = next(t for t in tasks if t.name == 'xp3_fr')
  assert fr.example('validation', 0)['inputs'] == 'fr prompt 0?'
  assert fr.example('train', fr.num_examples('train') - 1)['targets'] == f'fr {99 + XP3_TRAIN["fr"]}'
  # UniMax over the train sizes: the smallest languages (2 epochs < a uniform share) take
  # 2 x their size, the others share the rest of the budget equally.
  sizes = np.array(list(XP3_TRAIN.values()), float)
  allocation = unimax.allocate(sizes, XP3_BUDGET, XP3_EPOCHS)
  capped = allocation < allocation.max() - 1e-9
  assert capped.any() and (~capped).any()
  np.testing.assert_allclose(allocation[capped], 2 * sizes[capped])
  np.testing.assert_allclose(allocation[~capped], (XP3_BUDGET - 2 * sizes[capped].sum())
                             / (~capped).sum())
  expected = allocation / allocation.sum()
  np.testing.assert_allclose(mixture.rates_at(0), expected)
  _within_binomial(_realised(mixture), expected, [t.name for t in tasks])
  gin.clear_config()
  by_size = _recipe_mixture('xp3.gin', [f'XP3_DIR={xp3_dir}', 'MIXTURE_OR_TASK_NAME='
                                        '@xp3_by_size/file_tasks.file_mixture()'])
  np.testing.assert_allclose(by_size.rates_at(0), sizes / sizes.sum())


def test_xp3_recipe_trains_and_evaluates_per_language(xp3_dir, tmp_path, clean_gin):
  model_dir = tmp_path / 'run'
  assert cli.main(['train', *TINY_RUN, f'--gin_file={RECIPES}/xp3.gin',
                   f'--gin.XP3_DIR={xp3_dir}', *SHORT, f'--model_dir={model_dir}']) == 0
  keys = {k for r in writers.read_metrics(str(model_dir)) for k in r}
  for lang in ('en', 'zh', 'code', 'tum'):
    assert f'train/xp3_{lang}/loss' in keys or f'train/xp3_{lang}/rate' in keys
    assert any(k.startswith('eval/') and f'/xp3_{lang}/' in k for k in keys), lang
  run_config.check('config.gin', (model_dir / 'config.gin').read_text())


# --- LM adaptation ----------------------------------------------------------------------------

def _documents(n, seed):
  rng = np.random.default_rng(seed)
  words = ['the', 'model', 'reads', 'a', 'long', 'text', 'and', 'writes', 'its', 'end']
  return [' '.join(rng.choice(words, size=int(rng.integers(20, 60)))) for _ in range(n)]


def _heldout_loss(params, model_config, heldout) -> float:
  task = file_tasks.file_task('lm_heldout', {'train': heldout}, objective='prefix_lm',
                              register=False)
  it = pipeline.train_iterator(task, ByteVocabulary(), pipeline.PipelineConfig(
      {'inputs': 64, 'targets': 64}, batch_size=32, pack=False, prefetch=0), 0, 1)
  batch = next(it)
  it.close()
  logits = models.build(model_config).logits(params, batch)
  loss, _ = losses.token_losses(logits, batch['decoder_target_tokens'])
  weights = batch['decoder_loss_weights']
  return float((loss * weights).sum() / weights.sum())


def test_lm_adapt_recipe_trains_prefix_lm_on_text_files(tmp_path, clean_gin):
  text_dir = tmp_path / 'corpus'
  text_dir.mkdir()
  for k in range(2):   # e.g. gunzipped mC4 shards: one {"text": ...} document a line
    (text_dir / f'c4-train.{k:05d}-of-00002.jsonl').write_text(''.join(
        json.dumps({'text': d, 'url': 'https://example.com', 'timestamp': '2020'}) + '\n'
        for d in _documents(200, k)))
  heldout = tmp_path / 'heldout.jsonl'
  heldout.write_text(''.join(json.dumps({'text': d}) + '\n' for d in _documents(40, 7)))
  model_dir = tmp_path / 'run'
  assert cli.main(['train', *TINY_RUN, f'--gin_file={RECIPES}/mt5_lm_adapt.gin',
                   f'--gin.TEXT_DIR={text_dir}',
                   '--gin.TASK_FEATURE_LENGTHS={"inputs": 64, "targets": 64}',
                   '--gin.BATCH_SIZE=8', '--gin.TRAIN_STEPS=6', '--gin.LOG_PERIOD=1',
                   '--gin.CHECKPOINT_PERIOD=6', '--gin.LEARNING_RATE=0.01',
                   '--gin.loop.TrainConfig.progress_bar=False',
                   f'--model_dir={model_dir}']) == 0
  records = writers.read_metrics(str(model_dir))
  assert [r['step'] for r in records if 'train/lm_adapt_prefix_lm/loss' in r] == list(
      range(1, 7))
  assert not (model_dir / 'eval').exists()   # prefix LM has no metric: no decode eval
  run_config.check('config.gin', (model_dir / 'config.gin').read_text())
  # The eval: prefix-LM loss on held-out documents, trained vs freshly initialised.
  model_config, params, _ = convert.load_params(str(model_dir))
  fresh = models.build(model_config).init_params(jax.random.key(0))
  trained_loss = _heldout_loss(params, model_config, str(heldout))
  fresh_loss = _heldout_loss(fresh, model_config, str(heldout))
  print(f'held-out prefix-LM loss: fresh {fresh_loss:.3f}, after 6 steps {trained_loss:.3f}')
  assert trained_loss < fresh_loss - 0.5
