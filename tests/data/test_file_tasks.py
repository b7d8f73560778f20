"""Bring-your-own-data tasks from gin: the real_example mixture over ../shared/data."""

import json

import gin
import numpy as np
import pytest

from t5x_lite import cli, config
from t5x_lite.data import file_tasks, pipeline, registry, vocab


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_real_example_mixture_on_shared_data(shared_data, clean_gin):
  config.parse_gin(['gin_configs/mixtures/real_example.gin'], [f'DATA_DIR={shared_data}'])
  mixture = config.mixture_name_or_object()
  assert registry.get('real_example') is mixture
  rates = {t.name: r for t, r in mixture.tasks_and_rates()}
  assert set(rates) == {'sst2', 'multi30k_en_de', 'multi30k_en_fr', 'xsum'}
  # examples-proportional with the cap: 2000, 2000, 2000 and 900 training examples
  assert rates['xsum'] == pytest.approx(900 / 6900)
  sst2 = registry.get('sst2')
  assert sst2.num_examples('validation') == 872 and sst2.metric_names == ('accuracy',)
  assert 40 < sst2.baseline_score('validation')['accuracy'] < 60   # 444 / 428 labels
  xsum = registry.get('xsum')
  assert xsum.num_examples('validation') == 100 and xsum.num_examples('train') == 900
  rendered = sst2.render('validation', 0, np.random.default_rng(0), fmt='zs_opt')
  assert "it 's a charming and often affecting journey ." in rendered['inputs']
  assert rendered['inputs'].endswith('OPTIONS:\n- negative\n- positive')
  assert rendered['targets'] == 'positive'
  # the real T5 vocabulary feeds the packed pipeline
  spiece = vocab.SentencePieceVocabulary(shared_data / 't5_spiece' / 'spiece.model')
  cfg = pipeline.PipelineConfig({'inputs': 256, 'targets': 64}, batch_size=4, prefetch=0)
  it = pipeline.train_iterator(mixture, spiece, cfg, 0, 1)
  batch = next(it)
  it.close()
  assert set(batch['decoder_task_ids'][batch['decoder_segment_ids'] > 0]) <= {0, 1, 2, 3}
  text = spiece.decode(batch['encoder_input_tokens'][0][batch['encoder_segment_ids'][0] == 1])
  assert len(text) > 10


def test_file_task_over_csv_and_jsonl(tmp_path):
  (tmp_path / 'train.csv').write_text('question,answer\nwhat is 1+1?,2\nwhat is 2+2?,4\n')
  (tmp_path / 'val.csv').write_text('question,answer\nwhat is 3+3?,6\n')
  task = file_tasks.file_task('csv_math', {'train': 'train.csv', 'validation': 'val.csv'},
                              [('Q: {question}', '{answer}')], ['exact_match'],
                              data_dir=str(tmp_path), register=False)
  assert task.render('validation', 0, task.eval_rng(0))['inputs'] == 'Q: what is 3+3?'
  (tmp_path / 'x.jsonl').write_text(json.dumps({'a': 'b'}) + '\n')
  with pytest.raises(ValueError, match='all be .jsonl/.json or all .csv/.tsv'):
    file_tasks.file_task('mixed', {'train': 'train.csv', 'validation': 'x.jsonl'},
                         [('{a}', '{a}')], ['exact_match'], data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"missing field\(s\) \['targets'\]"):
    file_tasks.file_task('bad', {'train': 'x.jsonl'}, [('{sentence}', '{answer}')],
                         ['exact_match'], data_dir=str(tmp_path),
                         field_map={'sentence': 'a', 'answer': 'targets'})


def test_file_mixture_of_a_mixture_and_a_file_task(tmp_path):
  """file_mixture('all', ['builtin', 'mine']): examples-proportional over the sub-mixture's
  total (10 tasks x 3000 train examples) and the file task's 2 examples."""
  (tmp_path / 'train.jsonl').write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": "4"}\n')
  file_tasks.file_task('mine', {'train': 'train.jsonl'}, [('{q}', '{a}')], ['exact_match'],
                       data_dir=str(tmp_path))
  try:
    mixture = file_tasks.file_mixture('all', ['builtin', 'mine'], register=False)
    rates = {t.name: r for t, r in mixture.tasks_and_rates()}
    assert len(rates) == 11
    assert rates['mine'] == pytest.approx(2 / 30_002)
    assert rates['builtin_qa'] == pytest.approx(30_000 / 30_002 / 10)
  finally:
    registry.remove('mine')


def test_cli_tasks_lists_counts_rates_and_an_example(shared_data, clean_gin, capsys):
  assert cli.main(['tasks', '--gin_file=gin_configs/mixtures/real_example.gin',
                   f'--gin.DATA_DIR={shared_data}', '--mixture=real_example']) == 0
  out = capsys.readouterr().out
  assert 'mixture real_example: 4 tasks' in out
  assert 'sst2' in out and 'train 2,000, validation 872, test 1,821' in out
  assert 'OPTIONS:' in out and 'metrics: rouge1, rouge2, rougeL' in out


def test_list_targets_train_on_the_first_and_score_all(tmp_path):
  """A JSONL `answers` list (SQuAD style): the target trained on is the first answer, the
  references hold every answer (as the metrics see them); a CSV column holds a JSON array."""
  (tmp_path / 'train.jsonl').write_text(
      '{"q": "capital of France?", "answers": ["Paris", "paris, France", "the city of Paris"]}\n'
      '{"q": "2+2?", "answers": ["4"]}\n', encoding='utf-8')
  task = file_tasks.file_task('multi_ref', {'train': 'train.jsonl'}, [('{q}', 'A: {a}')],
                              ['exact_match', 'f1'], data_dir=str(tmp_path),
                              field_map={'a': 'answers'}, register=False)
  out = task.render('train', 0, np.random.default_rng(0), fmt='zs_noopt')
  assert out['targets'] == 'A: Paris'
  assert out['references'] == ['A: Paris', 'A: paris, France', 'A: the city of Paris']
  assert task.render('train', 1, np.random.default_rng(0))['references'] == ['A: 4']
  stream = pipeline.train_iterator(task, vocab.ByteVocabulary(), pipeline.PipelineConfig(
      {'inputs': 32, 'targets': 32}, batch_size=2, pack=False, prefetch=0), 0, 1)
  byte_vocab = vocab.ByteVocabulary()
  targets = {byte_vocab.decode(r) for r in next(iter(stream))['decoder_target_tokens']}
  assert targets and targets <= {'A: Paris', 'A: 4'}
  (tmp_path / 'train.csv').write_text('q,answers\nwhere?,"[""here"", ""there""]"\n')
  csv_task = file_tasks.file_task('multi_csv', {'train': 'train.csv'}, [('{q}', '{answers}')],
                                  ['exact_match'], data_dir=str(tmp_path),
                                  list_fields=['answers'], register=False)
  assert csv_task.render('train', 0, np.random.default_rng(0))['references'] == ['here', 'there']
  (tmp_path / 'bad.csv').write_text('q,answers\nwhere?,here\n')
  with pytest.raises(ValueError, match=r'bad.csv row 1 field .answers.: expected a JSON array'):
    file_tasks.file_task('bad_csv', {'train': 'bad.csv'}, [('{q}', '{answers}')],
                         ['exact_match'], data_dir=str(tmp_path), list_fields=['answers'],
                         register=False)
  (tmp_path / 'empty.jsonl').write_text('{"q": "x", "answers": []}\n')
  empty = file_tasks.file_task('empty', {'train': 'empty.jsonl'}, [('{q}', '{answers}')],
                               ['exact_match'], data_dir=str(tmp_path), register=False)
  with pytest.raises(ValueError, match='must be non-empty'):
    empty.render('train', 0, np.random.default_rng(0))


def test_file_task_labels_from_gin_are_the_class_metrics_label_set(tmp_path, clean_gin):
  """`labels` reaches Task from gin; class_f1 then averages over it as T5 mean_multiclass_f1
  (references a a b b, predictions a c b b: 55.56 over a, b, c; 83.33 over the references')."""
  from t5x_lite.evaluation import report as eval_report  # pylint: disable=import-outside-toplevel
  (tmp_path / 'v.jsonl').write_text(''.join(json.dumps({'s': f'x{i}', 'a': a}) + '\n'
                                            for i, a in enumerate('aabb')))
  (tmp_path / 'labels.gin').write_text(f"""
from __gin__ import dynamic_registration
from t5x_lite.data import file_tasks
MIXTURE_OR_TASK_NAME = @file_tasks.file_task()
file_tasks.file_task:
  name = 'gin_labels'
  files = {{'validation': 'v.jsonl'}}
  data_dir = '{tmp_path}'
  templates = [('{{s}}', '{{a}}')]
  metric_names = ['class_f1']
  labels = ['a', 'b', 'c']
  register = False
""")
  config.parse_gin([str(tmp_path / 'labels.gin')])
  task = config.mixture_name_or_object()
  assert task.labels == ['a', 'b', 'c'] and task.label_set() == ('a', 'b', 'c')
  examples = [task.render('validation', i, task.eval_rng(i)) for i in range(4)]
  scores, _ = eval_report.score_task(task, examples, ['a', 'c', 'b', 'b'])
  assert round(scores['class_f1'], 2) == 55.56
  with pytest.raises(ValueError, match=r"task bad: labels must be a list of str"):
    file_tasks.file_task('bad', {'validation': 'v.jsonl'}, [('{s}', '{a}')],
                         data_dir=str(tmp_path), labels='a', register=False)
