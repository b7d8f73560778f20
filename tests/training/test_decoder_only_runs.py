"""A decoder-only model (the tiny Llama preset, byte vocabulary) trains, resumes (after a
clean stop and after SIGKILL) and evaluates on the built-in mixture from gin alone: the
converter comes from the model (`Model.feature_kind`, T5X's FEATURE_CONVERTER_CLS), the
evaluator decodes from the decoder-only prompt, and nothing outside models/ names the family."""

import json
import os
import signal
import time

import gin
import numpy as np
import pytest

from t5x_lite import cli, models
from t5x_lite.data import feature_converters, mixtures, pipeline, vocab as vocab_lib
from t5x_lite.models import decoder_presets
from t5x_lite.rundir import writers
from t5x_lite.training import loop, losses
from tests.training import test_runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = [
    f'--gin_file={REPO}/gin_configs/models/llama/tiny.gin',
    f'--gin_file={REPO}/gin_configs/runs/finetune.gin',
    f'--gin_file={REPO}/gin_configs/mixtures/builtin.gin',
    '--gin.TASK_FEATURE_LENGTHS={"inputs": 64, "targets": 16}', '--gin.BATCH_SIZE=8',
    '--gin.LOG_PERIOD=1', '--gin.CHECKPOINT_PERIOD=10', '--gin.EVAL_PERIOD=0',
    '--gin.DROPOUT_RATE=0.1', '--gin.LEARNING_RATE=0.01',
    '--gin.loop.TrainConfig.progress_bar=False', '--gin.loop.TrainConfig.eval_max_examples=3',
    '--gin.loop.TrainConfig.eval_batch_size=8', '--gin.loop.TrainConfig.async_checkpointing=False',
]


def _train(*args):
  """`t5x-lite train` in this process (gin's state cleared as a fresh process has it)."""
  gin.clear_config()
  try:
    return cli.main(['train', *RUN, *args])
  finally:
    gin.clear_config()


def _losses(model_dir):
  return {r['step']: r['train/loss'] for r in writers.read_metrics(model_dir)
          if 'train/loss' in r}


@pytest.fixture(scope='module')
def whole_run(tmp_path_factory):
  """The model_dir of one uninterrupted 20-step run (eval at the end). Read it only."""
  model_dir = str(tmp_path_factory.mktemp('decoder_only') / 'whole')
  assert _train('--gin.TRAIN_STEPS=20', f'--model_dir={model_dir}') == 0
  return model_dir


def test_the_model_names_its_batch_form_and_the_loop_its_converter():
  llama = models.build(decoder_presets.preset('llama3', 'tiny'))
  assert llama.feature_kind == 'decoder_only'
  assert models.build(models.preset('flan_t5', 'tiny')).feature_kind == 'encoder_decoder'
  cfg = loop.TrainConfig(model_dir='/tmp/unused')
  assert loop.feature_converter(cfg, llama) == feature_converters.DecoderOnlyFeatureConverter()
  full = feature_converters.DecoderOnlyFeatureConverter(loss_on_targets_only=False)
  assert loop.feature_converter(loop.TrainConfig(model_dir='/tmp/unused',
                                                 feature_converter=full), llama) is full
  with pytest.raises(loop.TrainingError, match='reads decoder_only batches: use DecoderOnlyFeatureConverter'):
    loop.feature_converter(loop.TrainConfig(
        model_dir='/tmp/unused', feature_converter=feature_converters.EncDecFeatureConverter()),
        llama)


def test_per_task_sums_of_a_decoder_only_batch_count_only_loss_weighted_tokens():
  """Decoder-only task ids cover the inputs too: the per-task sums and the loss must not."""
  mixture = mixtures.get_mixture('builtin')
  data = pipeline.train_iterator(mixture, vocab_lib.ByteVocabulary(), pipeline.PipelineConfig(
      {'inputs': 64, 'targets': 16}, 4, feature_converter=(
          feature_converters.DecoderOnlyFeatureConverter())))
  batch = next(data)
  data.close()
  weights = batch['decoder_loss_weights']
  assert ((batch['decoder_task_ids'] >= 0) & (weights == 0)).any()   # inputs carry task ids
  logits = np.random.default_rng(0).normal(size=weights.shape + (384,)).astype(np.float32)
  n = len(mixture.tasks)
  loss, aux = losses.mixture_loss(logits, batch, np.ones(n, np.float32))
  masked = dict(batch, decoder_task_ids=np.where(weights > 0, batch['decoder_task_ids'], -1))
  loss2, aux2 = losses.mixture_loss(logits, masked, np.ones(n, np.float32))
  assert float(np.sum(aux['tokens'])) == float(weights.sum())
  np.testing.assert_allclose(aux['tokens'], aux2['tokens'])
  np.testing.assert_allclose(aux['loss_sum'], aux2['loss_sum'], rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-6)


def test_tiny_decoder_only_trains_resumes_exactly_and_evaluates(whole_run, tmp_path):
  whole, part = whole_run, str(tmp_path / 'part')
  # The same run stopped after its step-10 checkpoint, then started again to step 20.
  assert _train('--gin.TRAIN_STEPS=10', '--gin.loop.TrainConfig.eval_at_end=False',
                f'--model_dir={part}') == 0
  assert not os.path.exists(os.path.join(part, 'eval'))
  assert _train('--gin.TRAIN_STEPS=20', f'--model_dir={part}') == 0
  a, b = _losses(whole), _losses(part)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  assert np.mean([a[s] for s in range(16, 21)]) < np.mean([a[s] for s in range(1, 6)]) - 0.3
  for s in range(11, 21):   # after the resume: the step the uninterrupted run took
    assert b[s] == a[s], (s, a[s], b[s])
  for model_dir in (whole, part):
    metrics = json.load(open(os.path.join(model_dir, 'eval', '20', 'validation', 'metrics.json')))
    assert set(metrics['metrics']) >= {t.name for t in mixtures.get_mixture('builtin').tasks}
    predictions = os.path.join(model_dir, 'eval', '20', 'validation', 'predictions',
                               'builtin_sort.jsonl')
    rows = [json.loads(line) for line in open(predictions)]
    assert len(rows) == 3 and all(isinstance(r['prediction'], str) for r in rows)
  # t5x-lite infer: the run's converter (checkpoint meta) gives the prompt and the targets.
  inputs = tmp_path / 'in.jsonl'
  inputs.write_text(json.dumps({'inputs': 'Sort these words: b a c', 'targets': 'a b c'}) + '\n')
  for mode in ('predict', 'score'):
    out = tmp_path / f'{mode}.jsonl'
    assert cli.main(['infer', f'--model_dir={whole}', f'--input_file={inputs}',
                     f'--output_file={out}', f'--mode={mode}', '--max_input_length=64',
                     '--max_decode_length=16']) == 0
    row = json.loads(out.read_text())
    assert row['score'] is not None and row['score'] < 0
  keys = [k for r in writers.read_metrics(whole) for k in r if k.startswith('eval/')]
  assert any(k.endswith('/rank_accuracy') for k in keys), keys   # rank classification ran


def test_sigkill_then_restart_gives_the_same_losses(whole_run, tmp_path, caplog):
  """test_runs' SIGKILL test for the decoder-only family: a `t5x-lite train` process killed
  once its first checkpoint (step 5 of 10) is complete, then started again (here, in this
  process), logs the losses of the uninterrupted run exactly (same data, dropout and
  updates; the learning rate is constant, so the 20-step run's first 10 steps are a
  10-step run's)."""
  model_dir = str(tmp_path / 'killed')
  args = [f'--model_dir={model_dir}', '--gin.TRAIN_STEPS=10', '--gin.CHECKPOINT_PERIOD=5',
          '--gin.loop.TrainConfig.eval_at_end=False']
  proc = test_runs.cli(['train', *RUN, *args])
  ckpt_dir = os.path.join(model_dir, 'checkpoints')

  def checkpointed():
    return os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))

  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not checkpointed():
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL and checkpointed(), err[-3000:]
  assert max(_losses(model_dir)) < 10, 'the run finished before it could be killed'
  assert _train(*args) == 0
  assert 'Resuming from step 5' in caplog.text
  whole = _losses(whole_run)
  assert _losses(model_dir) == {s: whole[s] for s in range(1, 11)}   # exact
