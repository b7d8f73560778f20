"""gin_configs/runs/demo_decoder_cpu.gin (`t5x-lite demo --gin_file=...`: an overlay of
demo_cpu.gin, which the demo command reads first) parses and builds what the demo trains
(a Llama-architecture model, the decoder-only converter with the ChatML template of
gin_configs/chat/chatml.jinja, the built-in mixture and the three eval sets), without
training: shapes only, a few examples tokenized."""

import os

import gin
import numpy as np
import pytest

from t5x_lite import config, models
from t5x_lite.commands import train as train_command
from t5x_lite.data import chat, mixtures, vocab as vocab_lib
from t5x_lite.data.decoder_only_converter import DecoderOnlyFeatureConverter
from t5x_lite.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIN = 'gin_configs/runs/demo_decoder_cpu.gin'
TEMPLATE = 'gin_configs/chat/chatml.jinja'


@pytest.fixture()
def demo(monkeypatch, tmp_path):
  """(model config, TrainConfig) as `t5x-lite demo --gin_file=GIN` parses them."""
  monkeypatch.chdir(REPO)   # the template path is relative to the repository root
  gin.clear_config()
  try:
    config.parse_gin([train_command.DEMO_GIN, GIN], [], fixed=[f'MODEL_DIR={tmp_path}'],
                     reads=('MODEL_CONFIG', 'TRAIN'))
    yield config.model_config(), config.macro('TRAIN')
  finally:
    gin.clear_config()


def test_the_demo_builds_a_llama_with_the_byte_vocabulary(demo):
  model_config, train = demo
  assert isinstance(model_config, models.DecoderOnlyConfig)
  assert model_config.architecture == 'llama'
  assert isinstance(train, loop.TrainConfig)
  vocab = vocab_lib.get_vocabulary(train.vocabulary)
  assert isinstance(vocab, vocab_lib.ByteVocabulary)
  assert model_config.vocab_size == vocab.vocab_size
  model = models.build(model_config)
  assert model.feature_kind == 'decoder_only'
  assert 1e5 < model.param_count() < 3e6   # sized for a 2-core CPU
  assert train.mixture == 'builtin' and train.train_steps > 0
  assert set(train.eval_mixtures) == {'seen', 'heldout_tasks', 'heldout_templates'}


def test_the_converter_renders_chatml_with_the_loss_on_the_answer_only(demo):
  model_config, train = demo
  converter = loop.feature_converter(train, models.build(model_config))
  assert isinstance(converter, DecoderOnlyFeatureConverter)
  assert converter.chat_template == TEMPLATE and converter.system_prompt == ''
  assert converter.loss_on_targets_only
  vocab = vocab_lib.get_vocabulary(train.vocabulary)
  lengths = train.feature_lengths
  out = converter.tokenize_example(vocab, {'inputs': 'Sort: 3, 1', 'targets': '1, 3'},
                                   lengths, 'error', 'x')
  assert vocab.decode(out['inputs']) == '<|im_start|>user\nSort: 3, 1<|im_end|>\n<|im_start|>assistant\n'
  assert list(out['targets'][-1:]) == [vocab.eos_id]
  assert vocab.decode(out['targets'][:-1]) == '1, 3<|im_end|>\n'
  text, tokens = chat.resolve(TEMPLATE, vocab)
  assert chat.end_of_turn(text, tuple(sorted(tokens.items()))) == '<|im_end|>'
  assert converter.decode(vocab, vocab.encode('1, 3<|im_end|>\n<|im_start|>')) == '1, 3'
  # Few-shot exemplars are earlier turns; a system prompt is a first turn.
  shots = converter.tokenize_example(
      vocab, {'inputs': '', 'query': 'q', 'turns': [('u', 'a')], 'targets': 't'},
      lengths, 'error', 'x')
  assert vocab.decode(shots['inputs']).count('<|im_start|>user\n') == 2
  system = DecoderOnlyFeatureConverter(chat_template=TEMPLATE, system_prompt='Be brief.')
  assert vocab.decode(system.tokenize_example(vocab, {'inputs': 'q', 'targets': 't'}, lengths,
                                              'error', 'x')['inputs']).startswith(
      '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n')


def test_every_seen_task_answer_fits_and_zero_shot_prompts_fit(demo):
  """The answers (with end-of-turn and EOS) are never cut; zero-shot prompts are not either
  (few-shot ones may lose their first exemplar bytes)."""
  model_config, train = demo
  converter = loop.feature_converter(train, models.build(model_config))
  vocab = vocab_lib.get_vocabulary(train.vocabulary)
  mixture = mixtures.get_mixture(train.mixture)
  assert len(mixture.tasks) == 10
  big = {'inputs': 10_000, 'targets': 10_000}
  for task in mixture.tasks:
    for i in range(5):
      rendered = task.render('train', i, np.random.default_rng(i))
      out = converter.tokenize_example(vocab, rendered, big, 'error', task.name)
      assert len(out['targets']) <= train.feature_lengths['targets'], task.name
      if not rendered.get('turns'):
        assert len(out['inputs']) <= train.feature_lengths['inputs'], task.name
