"""Chat templates: a task's rendered (inputs, targets) as a causal LM's conversation, and which
of its tokens the loss sees.

The template is the model's own (`chat_template` in tokenizer_config.json, or the
chat_template.jinja file transformers 5 writes beside it, which wins) or one given as text or a
.jinja path; it is rendered with jinja2 as transformers' `apply_chat_template` renders it
(transformers/utils/chat_template_utils.py, `_cached_compile_jinja_template` and
`render_jinja_template`: a sandboxed environment with trim_blocks and lstrip_blocks, the loop
controls, `tojson` without HTML escaping, `raise_exception`, `strftime_now`, the tokenizer's
special tokens as variables; `{% generation %}` blocks render their body), then tokenized
without special tokens added, as `apply_chat_template(tokenize=True)` does.

The loss mask comes from two renders (not from `{% generation %}` tags, which few templates
have): the conversation up to the last user turn with `add_generation_prompt=True` (the
prompt, its assistant header included) and the whole conversation; the prompt's ids must be
a prefix of the whole's, and the rest (the answer, its end-of-turn token and whatever the
template writes after it; then EOS if none of it is the vocabulary's EOS) is the completion,
the only part with loss weight 1. Few-shot exemplars are earlier user/assistant turns. A
decoded answer ends where the template's end-of-turn text starts (`end_of_turn`).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Sequence

from t5x_lite import errors

MODEL_TEMPLATE = 'model'   # chat_template='model': the vocabulary's own
_SPECIAL_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                   'cls_token', 'mask_token')


class ChatTemplateError(errors.UserError, ValueError):
  """A chat template that cannot be used (none in the tokenizer, a render that fails, or a
  prompt render that is not a prefix of the whole conversation's)."""


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  return data if isinstance(data, dict) else {}


def _tokenizer_directory(vocab) -> str:
  spec = getattr(vocab, 'spec', '')
  directory = spec if os.path.isdir(spec) else os.path.dirname(spec)
  if not directory or not os.path.isdir(directory):
    raise ChatTemplateError(f'chat_template={MODEL_TEMPLATE!r} needs a Hugging Face tokenizer '
                            f'directory as the vocabulary; {vocab!r} has none: give the '
                            'template text or a .jinja file')
  return directory


def model_template(vocab) -> tuple[str, dict[str, str]]:
  """(the vocabulary's chat template, its special tokens as template variables)."""
  directory = _tokenizer_directory(vocab)
  config = _read_json(os.path.join(directory, 'tokenizer_config.json'))
  special_map = _read_json(os.path.join(directory, 'special_tokens_map.json'))
  template = config.get('chat_template')
  if isinstance(template, list):   # named templates: the default one
    template = next((t.get('template') for t in template if t.get('name') == 'default'), None)
  jinja_file = os.path.join(directory, 'chat_template.jinja')
  if os.path.isfile(jinja_file):
    with open(jinja_file, encoding='utf-8') as f:
      template = f.read()
  if not isinstance(template, str) or not template:
    raise ChatTemplateError(f'{directory} has no chat template (tokenizer_config.json '
                            '"chat_template" or chat_template.jinja): give one as text or a '
                            '.jinja file')
  tokens = {}
  for name in _SPECIAL_TOKENS:
    value = config.get(name, special_map.get(name))
    value = value.get('content') if isinstance(value, dict) else value
    if isinstance(value, str):
      tokens[name] = value
  return template, tokens


def is_file(chat_template: str) -> bool:
  """Whether a `chat_template` setting names a .jinja file (not the template's text)."""
  return chat_template.endswith('.jinja') and '{' not in chat_template


@functools.lru_cache(maxsize=16)
def resolve(chat_template: str, vocab) -> tuple[str, dict[str, str]]:
  """(template text, special-token variables) of a converter's `chat_template` setting:
  'model', a .jinja path, or the template text itself (read once per process)."""
  if chat_template == MODEL_TEMPLATE:
    return model_template(vocab)
  tokens = {}
  try:
    tokens = model_template(vocab)[1] if vocab is not None else {}
  except ChatTemplateError:
    pass   # a vocabulary without tokenizer files: no special-token variables
  if is_file(chat_template):
    try:
      with open(chat_template, encoding='utf-8') as f:
        return f.read(), tokens
    except OSError as e:
      raise ChatTemplateError(f'cannot read the chat template {chat_template}: {e}') from e
  return chat_template, tokens


@functools.lru_cache(maxsize=16)
def compile_template(text: str):
  """The template compiled as transformers compiles it (module docstring)."""
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import ext, nodes, sandbox  # pylint: disable=import-outside-toplevel

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}`: the body, rendered as it is."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
      return nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[Generation, ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals.update(raise_exception=raise_exception, dict=dict, namespace=jinja2.utils.Namespace,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  try:
    return env.from_string(text)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f'the chat template does not compile: {e}') from e


def messages(query: str, turns: Sequence[Sequence[str]] = (), system: str = '') -> list[dict]:
  """The conversation of a prompt: the system message, each exemplar as a user and an
  assistant turn, then the query as the last user turn."""
  out = [{'role': 'system', 'content': system}] if system else []
  for user, assistant in turns:
    out += [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': assistant}]
  return out + [{'role': 'user', 'content': query}]


def render(template_text: str, tokens: dict[str, str], conversation: list[dict],
           add_generation_prompt: bool) -> str:
  import jinja2  # pylint: disable=import-outside-toplevel
  try:
    return compile_template(template_text).render(
        messages=conversation, tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **tokens)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f'the chat template failed to render: {e}') from e


_ANSWER = '\x00answer\x00'


@functools.lru_cache(maxsize=16)
def end_of_turn(template_text: str, tokens: tuple[tuple[str, str], ...]) -> str:
  """The text a template writes after an assistant's answer (ChatML's '<|im_end|>'), without
  surrounding whitespace: where a decoded answer ends."""
  rendered = render(template_text, dict(tokens), [{'role': 'user', 'content': 'q'},
                                                  {'role': 'assistant', 'content': _ANSWER}],
                    False)
  return rendered[rendered.rindex(_ANSWER) + len(_ANSWER):].strip() if _ANSWER in rendered else ''


def encode(vocab, template_text: str, tokens: dict[str, str], query: str, answer: str,
           turns: Sequence[Sequence[str]] = (), system: str = '') -> tuple[list[int], list[int]]:
  """(prompt ids, completion ids) of one example (module docstring): the prompt render's
  ids, then the rest of the whole conversation's, and the vocabulary's EOS where that rest
  holds none (the template's end-of-turn is not the EOS, as with a byte vocabulary or a base
  model's tokenizer), so that decoding stops."""
  conversation = messages(query, turns, system)
  prompt = vocab.encode(render(template_text, tokens, conversation, True))
  whole = vocab.encode(render(template_text, tokens, conversation + [
      {'role': 'assistant', 'content': answer}], False))
  if whole[:len(prompt)] != prompt:
    at = next(i for i, (a, b) in enumerate(zip(prompt + [None], whole + [None])) if a != b)
    piece = lambda i: f'{i} {vocab.decode([i])!r}'
    theirs = 'its end' if at >= len(whole) else f'token {piece(whole[at])}'
    raise ChatTemplateError(
        f"the chat template's prompt (add_generation_prompt=True) is not a prefix of the whole "
        f'conversation: at position {at} the prompt has token {piece(prompt[at])}, the '
        f'conversation {theirs}; the loss mask needs a template whose answer follows its '
        'generation prompt')
  completion = whole[len(prompt):]
  return prompt, completion + ([] if vocab.eos_id in completion else [vocab.eos_id])
