"""Values are checked where they enter (issue #18 item 11): every bad value is a one-line
`error: ...` (exit 2) naming the flag or gin macro and its valid range, before anything runs."""

from __future__ import annotations

import json
import re

import gin
import pytest

from t5x_lite import cli, decoding, validation
from t5x_lite.data import file_tasks, sources
from t5x_lite.models import t5
from t5x_lite.training import loop, optimizers, step
from tests.training.test_runs import TINY_RUN


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


# --gin.BINDING -> the error line's text. Each fails while the configs are built.
GIN_CASES = [
    ('TRAIN_STEPS=0', r'TRAIN_STEPS \(loop.TrainConfig.train_steps\) must be > 0, got 0'),
    ('TRAIN_STEPS=-5', r'TRAIN_STEPS \(loop.TrainConfig.train_steps\) must be > 0, got -5'),
    ('TRAIN_STEPS=1O', r"TRAIN_STEPS \(loop.TrainConfig.train_steps\) must be an integer, got "
                       r"'1O' \(gin takes a value that is not a Python literal as a string"),
    ('CHECKPOINT_PERIOD=0', r'CHECKPOINT_PERIOD \(loop.TrainConfig.checkpoint_period\) must be '
                            r'> 0, got 0'),
    ('LOG_PERIOD=-1', r'LOG_PERIOD \(loop.TrainConfig.log_period\) must be > 0, got -1'),
    ('EVAL_PERIOD=-1', r'EVAL_PERIOD \(loop.TrainConfig.eval_period\) must be >= 0'),
    ('BATCH_SIZE=0', r'BATCH_SIZE \(loop.TrainConfig.batch_size\) must be > 0'),
    ('BATCH_SIZE=8.5', r'BATCH_SIZE \(loop.TrainConfig.batch_size\) must be an integer, got 8.5'),
    ('TASK_FEATURE_LENGTHS={"inputs": 0, "targets": 16}',
     r'every value of TASK_FEATURE_LENGTHS \(loop.TrainConfig.feature_lengths\) must be > 0'),
    ('LEARNING_RATE=0', r'LEARNING_RATE \(optimizers.OptimizerConfig.learning_rate\) must be > 0'),
    ('LEARNING_RATE=-1e-3', r'LEARNING_RATE \(optimizers.OptimizerConfig.learning_rate\) must '
                            r'be > 0, got -0.001'),
    ('LEARNING_RATE=1e400', r'LEARNING_RATE \(optimizers.OptimizerConfig.learning_rate\) must '
                            r'be finite, got inf'),
    ('LEARNING_RATE=1e-3x', r"LEARNING_RATE \(optimizers.OptimizerConfig.learning_rate\) must be "
                            r"a number, got '1e-3x'"),
    ('DROPOUT_RATE=1.5', r'DROPOUT_RATE \(t5.T5Config.dropout_rate\) must be in \[0, 1\)'),
    ('ACTIVATION_DTYPE="fp16"', r"ACTIVATION_DTYPE \(t5.T5Config.dtype\) must be one of "
                                r"'float32', 'bfloat16', 'float16', got 'fp16'"),
    ('t5.T5Config.d_model=6four', r"t5.T5Config.d_model must be an integer, got '6four'"),
    ('loop.TrainConfig.microbatches=0', r'loop.TrainConfig.microbatches must be >= 1'),
    ('loop.TrainConfig.max_to_keep=0', r'loop.TrainConfig.max_to_keep must be >= 1'),
    ('loop.TrainConfig.pack=yes', r"loop.TrainConfig.pack must be True or False, got 'yes'"),
    ("optimizers.OptimizerConfig.name='sgd'",
     r"optimizers.OptimizerConfig.name must be one of 'adafactor', 'adamw', got 'sgd'"),
    ("optimizers.OptimizerConfig.schedule='cosine'",
     r"schedule 'cosine' needs total_steps > warmup_steps"),
    ('step.LossConfig.label_smoothing=1.0', r'step.LossConfig.label_smoothing must be in \[0, 1\)'),
]


@pytest.mark.parametrize('binding,message', GIN_CASES, ids=[c[0] for c in GIN_CASES])
def test_bad_gin_values_are_one_line_errors(binding, message, tmp_path, capsys):
  rc = cli.main(['train', f'--model_dir={tmp_path}'] + TINY_RUN + [f'--gin.{binding}'])
  err = capsys.readouterr().err
  assert rc == 2, err[-2000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err[-2000:]
  assert re.search(message, lines[0]) and 'In call to configurable' not in lines[0], lines[0]
  assert not (tmp_path / 'checkpoints').exists()


# Dataclasses built without gin (the library's own entry) check the same way.
DATACLASS_CASES = [
    (lambda: loop.TrainConfig('d', num_data_shards=0), 'num_data_shards must be >= 1'),
    (lambda: loop.TrainConfig('d', eval_batch_size=0), 'eval_batch_size must be > 0'),
    (lambda: loop.TrainConfig('d', max_bad_steps=0), 'max_bad_steps must be >= 1'),
    (lambda: loop.TrainConfig('d', init_from_partial='no'), 'must be True or False'),
    (lambda: optimizers.OptimizerConfig(learning_rate=float('nan')), 'must be finite, got nan'),
    (lambda: optimizers.OptimizerConfig(warmup_steps=-1), 'warmup_steps must be >= 0'),
    (lambda: optimizers.OptimizerConfig(clip_grad_norm=0.0), 'clip_grad_norm must be > 0'),
    (lambda: step.LossConfig(normalization='per_token'), "one of 'per_real_token'"),
    (lambda: step.LossConfig(normalization='constant'), 'needs step.LossConfig.constant'),
    (lambda: step.LossConfig(z_loss=-1.0), 'z_loss must be >= 0'),
    (lambda: decoding.DecodingConfig(num_beams=0), 'num_beams must be >= 1, got 0'),
    (lambda: decoding.DecodingConfig(num_samples=0), 'num_samples must be >= 1'),
    (lambda: decoding.DecodingConfig(temperature=-0.5), 'temperature must be >= 0'),
    (lambda: decoding.DecodingConfig(top_k=-1), 'top_k must be >= 0'),
    (lambda: decoding.DecodingConfig(top_p=0.0), r'top_p must be in \(0, 1\], got 0.0'),
    (lambda: decoding.DecodingConfig(top_p=1.5), r'top_p must be in \(0, 1\]'),
    (lambda: decoding.DecodingConfig(method='beams'), "method must be one of 'greedy'"),
    (lambda: decoding.DecodingConfig(num_beams='4'), "num_beams must be an integer, got '4'"),
    (lambda: t5.T5Config(num_heads=0), 'num_heads must be > 0'),
    (lambda: t5.T5Config(layer_norm_epsilon=0.0), 'layer_norm_epsilon must be > 0'),
    (lambda: t5.T5Config(feed_forward_proj='gated-foo'), "unknown activation 'foo'"),
]


@pytest.mark.parametrize('make,message', DATACLASS_CASES)
def test_bad_dataclass_values_raise_config_errors(make, message):
  with pytest.raises(validation.ConfigError, match=message) as info:
    make()
  assert '\n' not in str(info.value)


def test_good_values_pass_and_ints_are_numbers():
  assert loop.TrainConfig('d', train_steps=1, eval_period=0, max_to_keep=None).train_steps == 1
  assert optimizers.OptimizerConfig(learning_rate=1).learning_rate == 1   # an int is a number
  assert optimizers.OptimizerConfig(learning_rate=1e30).learning_rate == 1e30  # large, finite
  assert decoding.DecodingConfig(method='sample', temperature=0.0, top_p=1.0).top_p == 1.0
  assert t5.T5Config(scale_decoder_outputs=None).scale_decoder_outputs is True


# `infer` flags: argparse's error, one line as every other (exit 2) naming the flag, before anything loads.
@pytest.mark.parametrize('flag,message', [
    ('--batch_size=0', 'argument --batch_size: must be an integer >= 1, got 0'),
    ('--batch_size=-8', 'argument --batch_size: must be an integer >= 1, got -8'),
    ('--max_decode_length=0', 'argument --max_decode_length: must be an integer >= 1, got 0'),
    ('--max_input_length=-1', 'argument --max_input_length: must be an integer >= 1, got -1'),
    ('--max_input_length=lots', "argument --max_input_length: must be an integer >= 1, got "
                                "'lots'"),
    ('--checkpoint_step=-1', 'argument --checkpoint_step: must be an integer >= 0, got -1'),
])
def test_bad_infer_flags_are_errors_naming_the_flag(flag, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(['infer', f'--model_dir={tmp_path}', f'--input_file={tmp_path / "in.txt"}',
              f'--output_file={tmp_path / "out.jsonl"}', flag])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: t5x-lite infer: ') and message in err[0]


def test_export_checkpoint_step_is_checked(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(['export', f'--model_dir={tmp_path}', f'--hf_dir={tmp_path / "hf"}',
              '--checkpoint_step=-2'])
  assert info.value.code == 2 and capsys.readouterr().err.strip() == (
      'error: t5x-lite export: argument --checkpoint_step: must be an integer >= 0, got -2 '
      '(see t5x-lite export --help)')


def test_jsonl_null_fields_are_errors_naming_file_line_and_field(tmp_path):
  rows = [{'question': 'a?', 'answer': 'b'}, {'question': None, 'answer': 'c'}]
  path = tmp_path / 'train.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  with pytest.raises(sources.DataError,
                     match=rf"{path}:2: field\(s\) \['question'\] are null"):
    file_tasks.file_task('nulls', {'train': str(path)}, [('Q: {question}', '{answer}')],
                         ['exact_match'], register=False)
  # through a field_map too, and a null in a field no template reads is no error
  rows = [{'q': 'a?', 'answer': 'b', 'note': None}, {'q': 'c?', 'answer': None, 'note': None}]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  with pytest.raises(sources.DataError, match=r":2: field\(s\) \['answer'\] are null"):
    file_tasks.file_task('nulls', {'train': str(path)}, [('Q: {question}', '{answer}')],
                         ['exact_match'], field_map={'question': 'q'}, register=False)
  rows[1]['answer'] = 'd'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  task = file_tasks.file_task('nulls', {'train': str(path)}, [('Q: {question}', '{answer}')],
                              ['exact_match'], field_map={'question': 'q'}, register=False)
  assert task.render('train', 1, task.eval_rng(1))['targets'] == 'd'


def test_csv_short_rows_are_errors_not_none(tmp_path):
  (tmp_path / 'train.csv').write_text('question,answer\nwhat?,yes\nwhy?\n')
  with pytest.raises(sources.DataError,
                     match=r"train.csv:3: the row has no value for column\(s\) \['answer'\]"):
    file_tasks.file_task('short', {'train': str(tmp_path / 'train.csv')},
                         [('{question}', '{answer}')], ['exact_match'], register=False)
