"""Chat templates (#33 part 1): for a Llama-3-style, a ChatML (Qwen) and a Gemma-style template,
written here as the models ship them, our prompt and conversation ids equal transformers'
`apply_chat_template`, and the loss sees exactly the answer and what follows it (its
end-of-turn token); few-shot exemplars are earlier turns; a template whose prompt is not a
prefix of its conversation is refused, naming the token."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip('transformers')

from t5x_lite.data import chat, pipeline, tasks, vocab as vocab_lib  # pylint: disable=wrong-import-position
from t5x_lite.data.feature_converters import DecoderOnlyFeatureConverter  # pylint: disable=wrong-import-position
from t5x_lite.data.sources import GeneratedSource  # pylint: disable=wrong-import-position
from t5x_lite.data.templates import Template  # pylint: disable=wrong-import-position
from tests.data.test_hf_tokenizer import SENTENCES, _bpe  # pylint: disable=wrong-import-position

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
STYLES = {   # template, special tokens, (bos, eos), the end-of-turn text after an answer
    'llama3': (LLAMA3, ['<|begin_of_text|>', '<|eot_id|>', '<|start_header_id|>',
                        '<|end_header_id|>'], ('<|begin_of_text|>', '<|eot_id|>'), '<|eot_id|>'),
    'chatml': (CHATML, ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], (None, '<|im_end|>'),
               '<|im_end|>\n'),
    'gemma': (GEMMA, ['<bos>', '<eos>', '<start_of_turn>', '<end_of_turn>'],
              ('<bos>', '<end_of_turn>'), '<end_of_turn>\n'),
}
QUESTION, ANSWER = 'What is 12 plus 30?', 'It is 42.'
SHOTS = [['Das Haus ist klein!', 'The house is small.'], ['quick fox', 'lazy dog']]


@pytest.fixture(scope='module', params=sorted(STYLES))
def style(request, tmp_path_factory):
  template, specials, (bos, eos), end = STYLES[request.param]
  tok = _bpe({'unk': None})
  tok.add_special_tokens(specials)
  path = tmp_path_factory.mktemp(request.param)
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos,
                                                eos_token=eos)
  theirs.chat_template = template
  theirs.save_pretrained(path)
  return request.param, vocab_lib.get_vocabulary(str(path)), theirs, end


def _ids(theirs, conversation, add_generation_prompt):
  out = theirs.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                   tokenize=True)
  return list(out['input_ids'] if hasattr(out, 'keys') else out)


def _conversation(turns, question, answer=None):
  out = []
  for user, assistant in turns:
    out += [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': assistant}]
  out.append({'role': 'user', 'content': question})
  return out + ([{'role': 'assistant', 'content': answer}] if answer is not None else [])


@pytest.mark.parametrize('turns', [[], SHOTS])
def test_ids_equal_apply_chat_template_and_the_loss_covers_the_answer(style, turns):
  name, vocab, theirs, end = style
  converter = DecoderOnlyFeatureConverter(chat_template='model')
  rendered = {'inputs': 'ignored: the query and turns are read', 'targets': ANSWER,
              'query': QUESTION, 'turns': turns}
  lengths = {'inputs': 256, 'targets': 48}
  got = converter.tokenize_example(vocab, rendered, lengths, 'error', 'x')
  prompt = _ids(theirs, _conversation(turns, QUESTION), True)
  whole = _ids(theirs, _conversation(turns, QUESTION, ANSWER), False)
  assert got['inputs'].tolist() == prompt
  assert got['inputs'].tolist() + got['targets'].tolist() == whole
  assert vocab.decode(got['targets']) == ANSWER   # decode stops at the end-of-turn EOS
  assert theirs.decode(got['targets']) == ANSWER + end
  if name != 'chatml':
    assert got['inputs'][0] == theirs.bos_token_id   # BOS from the template, once

  # The batch: no start id (the template's BOS, or the prompt's first token, is read first)
  # and loss weight 1 on exactly the answer and what follows it.
  example = converter.example({**got, 'task_ids': np.ones(len(got['targets']), np.int32),
                               'exemplars_dropped': 0}, vocab)
  row = converter.finish_row(lengths, packed=False)(example)
  batch = converter.to_contract(vocab)({k: np.asarray(v)[None] for k, v in row.items()})
  weights = batch['decoder_loss_weights'][0]
  inputs, targets = batch['decoder_input_tokens'][0], batch['decoder_target_tokens'][0]
  assert inputs[0] == whole[0] and targets[:len(whole) - 1].tolist() == whole[1:]
  assert targets[weights > 0].tolist() == got['targets'].tolist()
  assert weights.sum() == len(got['targets'])


def test_a_system_prompt_and_files_as_templates(style, tmp_path):
  name, vocab, theirs, _ = style
  if name == 'gemma':   # Gemma's template refuses a system turn: said in one line
    converter = DecoderOnlyFeatureConverter(chat_template='model', system_prompt='Be brief.')
    with pytest.raises(chat.ChatTemplateError, match='System role not supported'):
      converter.tokenize_example(vocab, {'inputs': QUESTION, 'targets': ANSWER},
                                 {'inputs': 256, 'targets': 48}, 'error', 'x')
    return
  path = tmp_path / 'template.jinja'
  path.write_text(STYLES[name][0])
  converter = DecoderOnlyFeatureConverter(chat_template=str(path), system_prompt='Be brief.')
  got = converter.tokenize_example(vocab, {'inputs': QUESTION, 'targets': ANSWER},
                                   {'inputs': 256, 'targets': 48}, 'error', 'x')
  conversation = [{'role': 'system', 'content': 'Be brief.'}] + _conversation([], QUESTION)
  assert got['inputs'].tolist() == _ids(theirs, conversation, True)
  # a checkpoint records the file's text, so eval and infer need not find the file
  assert converter.options()['chat_template'] == STYLES[name][0]


def test_a_prompt_that_is_not_a_prefix_is_refused_naming_the_token(style):
  _, vocab, _, _ = style
  broken = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>model\n'")
  converter = DecoderOnlyFeatureConverter(chat_template=broken)
  with pytest.raises(chat.ChatTemplateError, match=r'not a prefix .* at position \d+ the prompt '
                                                   r'has token \d+ '):
    converter.tokenize_example(vocab, {'inputs': QUESTION, 'targets': ANSWER},
                               {'inputs': 256, 'targets': 48}, 'error', 'x')


def test_truncation_keeps_the_generation_prompt_and_ends_answers_with_eos(style):
  _, vocab, theirs, _ = style
  converter = DecoderOnlyFeatureConverter(chat_template='model')
  long = {'inputs': '', 'query': ' '.join(SENTENCES), 'targets': ' '.join(SENTENCES[:4])}
  got = converter.tokenize_example(vocab, long, {'inputs': 40, 'targets': 12}, 'truncate', 'x')
  prompt = _ids(theirs, _conversation([], long['query']), True)
  assert got['inputs'].tolist() == prompt[-40:] and got['inputs_truncated'] == len(prompt) - 40
  assert len(got['targets']) == 12 and got['targets'][-1] == vocab.eos_id
  with pytest.raises(Exception, match='longer than the feature length 40'):
    converter.tokenize_example(vocab, long, {'inputs': 40, 'targets': 12}, 'error', 'x')


def test_the_pipeline_trains_on_chat_formatted_answers_only(style):
  _, vocab, theirs, _ = style

  def example(rng, split):
    return {'q': SENTENCES[int(rng.integers(6))], 'a': str(rng.integers(100))}
  task = tasks.Task('chat_task', GeneratedSource(example, {'train': 40}),
                    [Template('{q}', '{a}')])
  cfg = pipeline.PipelineConfig({'inputs': 64, 'targets': 8}, batch_size=4, prefetch=0,
                                feature_converter=DecoderOnlyFeatureConverter(
                                    chat_template='model'))
  it = pipeline.train_iterator(task, vocab, cfg, 0, 1)
  batch = next(it)
  it.close()
  seg, weights = batch['decoder_segment_ids'], batch['decoder_loss_weights']
  for r in range(4):
    for s in set(seg[r][seg[r] > 0]):
      m = seg[r] == s
      answer = batch['decoder_target_tokens'][r][m][weights[r][m] > 0]
      assert vocab.decode(answer).isdigit() and vocab.eos_id in answer.tolist()


def test_a_byte_vocabulary_gets_eos_after_the_template_and_answers_end_at_its_turn_end():
  """No special tokens: ChatML's markers are bytes, so the completion gets the EOS decoding
  stops at, and a decoded answer is cut where the template's end-of-turn text starts."""
  vocab = vocab_lib.get_vocabulary('byte')
  converter = DecoderOnlyFeatureConverter(chat_template=CHATML)
  got = converter.tokenize_example(vocab, {'inputs': QUESTION, 'targets': ANSWER},
                                   {'inputs': 256, 'targets': 48}, 'error', 'x')
  assert vocab.decode(got['inputs']).endswith('<|im_start|>assistant\n')
  assert got['targets'][-1] == vocab.eos_id and list(got['targets']).count(vocab.eos_id) == 1
  assert vocab.decode(got['targets']) == ANSWER + '<|im_end|>\n'
  assert converter.decode(vocab, got['targets']) == ANSWER
  assert DecoderOnlyFeatureConverter().decode(vocab, got['targets']) == ANSWER + '<|im_end|>\n'
