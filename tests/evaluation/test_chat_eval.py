"""The evaluator with a chat template (#33 part 1: used identically by train, eval and infer):
rank classification scores each option's chat completion after the chat prompt, and decoding
starts from the chat prompt and reads the answer up to the template's end-of-turn."""

from __future__ import annotations

import jax
import numpy as np

from t5x_lite import decoding, evaluation, models, partitioning
from t5x_lite.data import chat, mixtures, vocab as vocab_lib
from t5x_lite.data.feature_converters import DecoderOnlyFeatureConverter
from t5x_lite.models.decoder_only_config import DecoderOnlyConfig
from tests.data.test_chat import CHATML

CONFIG = DecoderOnlyConfig(architecture='llama', vocab_size=384, hidden_size=32,
                           intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=8)


def test_rank_scores_and_predictions_read_the_chat_prompt():
  vocab, model = vocab_lib.get_vocabulary('byte'), models.build(CONFIG)
  params = model.init_params(jax.random.key(0))
  mesh = partitioning.make_mesh({'data': -1})
  rules = partitioning.rules_for('dp')
  shardings = partitioning.to_shardings(
      partitioning.param_specs(model.logical_axes(), rules), mesh)
  converter = DecoderOnlyFeatureConverter(chat_template=CHATML)
  evaluator = evaluation.Evaluator(
      model, mixtures.Mixture('chat_eval', ['builtin_sentiment']), vocab,
      evaluation.EvalConfig({'inputs': 640, 'targets': 32}, batch_size=8, max_examples=4,
                            length_buckets=False),
      mesh, shardings, rules, feature_converter=converter)
  task = evaluator.tasks[0]
  examples = evaluator.examples[task.name]
  scores = evaluator.rank_scores(params, task)
  predictions = evaluator.predict(params, task)
  prompts, completions, owners = [], [], []
  for k, example in enumerate(examples):
    prompt, _ = chat.encode(vocab, CHATML, {}, example['query'], '', example['turns'])
    assert vocab.decode(prompt).endswith('<|im_start|>assistant\n') and len(prompt) <= 640
    prompts.append(prompt)
    for option in example['options']:
      _, completion = chat.encode(vocab, CHATML, {}, example['query'], option, example['turns'])
      assert completion[-1] == vocab.eos_id   # bytes: EOS after '<|im_end|>\n'
      completions.append(completion)
      owners.append(k)

  def padded(rows, width):
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):
      ids[r, :len(row)], mask[r, :len(row)] = row, True
    return ids, mask
  inputs, inputs_mask = padded(prompts, 640)
  targets, targets_mask = padded(completions, 32)
  total, _ = jax.jit(lambda p, i, im, t, tm: model.score(p, i, t, inputs_mask=im,
                                                         targets_mask=tm))(
      params, inputs[owners], inputs_mask[owners], targets, targets_mask)
  np.testing.assert_allclose(np.concatenate(scores), total, rtol=1e-5, atol=1e-4)
  tokens, _ = decoding.predict(model, params, inputs, evaluator.decode_length(task),
                               eos_id=vocab.eos_id, inputs_mask=inputs_mask)
  assert predictions == [converter.decode(vocab, t[0]) for t in np.asarray(tokens)]
