"""`DecoderOnlyFeatureConverter` is seqio's PrefixLMFeatureConverter (and, with
`prefix_lm=False`, a plain causal mask over the same sequence), google/seqio
seqio/feature_converters.py at commit b898b9f992877cea2cda40dbc03597ea5cd4b08f:

- one sequence per example, `inputs + targets` (`_concat_and_add_masks`), packed or padded
  as a whole to `inputs + targets` positions (`_concat_task_feature_lengths`);
- `decoder_input_tokens` = the sequence shifted right by one inside each segment, the
  segment's first position holding the start id (seqio's `utils.make_autoregressive_inputs`
  with `sequence_id` and `bos_id`): the vocabulary's `decoder_start_id` (its BOS where the
  tokenizer's template prepends one, e.g. Llama's; else its PAD, which is seqio's default
  bos_id=0 for T5's vocabulary). So BOS is never a target: the model reads it first and
  predicts the first prompt token, as Hugging Face's causal LMs do with `labels=input_ids`.
  A Hugging Face vocabulary without BOS (Qwen: `decoder_start_id` None) has no start id:
  the sequence's own first token is read first and never predicted, as in Hugging Face
  (the row holds `inputs + targets` without its first token, and that token as the start);
- `decoder_loss_weights`: 1 on the targets' positions only (`loss_on_targets_only=True`,
  seqio's default: `positions >= inputs_width` on real tokens), or on every real token;
- `decoder_causal_attention` (prefix LM): 1 where `positions < inputs_width + 1`: the
  inputs AND the first target position, where the last input token is read and the first
  target predicted (seqio's `inputs_width_add_pos`, following mesh_tensorflow). An example
  with no inputs (causal LM) still has 1 at its position 0, as seqio's -1 swap gives;
- `decoder_segment_ids` / `decoder_positions` always present (one segment per unpacked row);
- `decoder_task_ids`: the mixture index on every real position, -1 on padding.

Where we differ from seqio: padding positions hold the vocabulary's PAD in
`decoder_target_tokens` and `decoder_input_tokens` (seqio's unpacked rows carry the last
target token shifted into the first padding position, and its packed rows the BOS id there);
padding has segment 0 and loss weight 0, so no model reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from t5x_lite import validation
from t5x_lite.data import chat
from t5x_lite.data.converter_base import (_META, DECODER_ONLY_FEATURES, FeatureConverter, _cuts,
                                          _shift_within_segments, _stats)
from t5x_lite.data.sources import DataError
from t5x_lite.data.vocab import Vocabulary


class _DecoderFinishRow:
  """One packed or padded decoder-only row: 'targets' (the whole sequence), 'task_ids',
  'inputs_width' and 'start_ids' (per token), the packing's segment ids and positions, and
  the stats."""

  def __init__(self, length: int, packed: bool):
    self.length, self.packed = length, packed

  def __call__(self, row: dict) -> dict:
    cut_in, cut_out, dropped = _cuts(row, self.packed)
    keys = ('targets', 'task_ids', 'inputs_width', 'start_ids')
    if self.packed:
      out = {k: row[k] for k in keys + ('targets_segment_ids', 'targets_positions')}
    else:
      out = {}
      for key in keys:
        padded = np.zeros(self.length, np.int32)
        padded[:len(row[key])] = row[key]
        out[key] = padded
    return _stats(out, cut_in, cut_out, dropped)


class _DecoderContract:
  """Batched decoder-only rows -> DECODER_ONLY_FEATURES (the module docstring's rules)."""

  def __init__(self, converter: 'DecoderOnlyFeatureConverter', vocab: Vocabulary):
    self.converter, self.pad_id = converter, int(vocab.pad_id)

  def __call__(self, batch: dict) -> dict:
    task_ids = batch['task_ids'].astype(np.int32)
    if 'targets_segment_ids' in batch:
      seg = batch['targets_segment_ids'].astype(np.int32)
      pos = batch['targets_positions'].astype(np.int32)
    else:  # padded rows: one segment each, marked by the task ids (token ids may be 0)
      seg = (task_ids > 0).astype(np.int32)
      pos = np.arange(seg.shape[-1], dtype=np.int32) * seg
    real = seg > 0
    width = batch['inputs_width'].astype(np.int32)
    targets = np.where(real, batch['targets'], self.pad_id).astype(np.int32)
    starts = batch['start_ids'].astype(np.int32)
    inputs = np.where(real, _shift_within_segments(targets, seg, starts), self.pad_id)
    loss = real & (pos >= width) if self.converter.loss_on_targets_only else real
    loss = loss & (targets >= 0)   # soft prompt ids are read, never predicted
    causal = real & (pos < width + 1) if self.converter.prefix_lm else np.zeros_like(real)
    out = {
        'decoder_input_tokens': inputs.astype(np.int32),
        'decoder_target_tokens': targets,
        'decoder_loss_weights': loss.astype(np.int32),
        'decoder_segment_ids': seg,
        'decoder_positions': pos,
        'decoder_causal_attention': causal.astype(np.int32),
        'decoder_task_ids': task_ids - 1,
    }
    out.update({k: v for k, v in batch.items() if k.startswith('stats/')})
    return out


@dataclasses.dataclass(frozen=True)
class DecoderOnlyFeatureConverter(FeatureConverter):
  """seqio's PrefixLMFeatureConverter for decoder-only models (module docstring).

  loss_on_targets_only: seqio's flag: loss on the targets only (True), or on every token of
    `inputs + targets` (full-sequence loss).
  prefix_lm: `decoder_causal_attention` marks the inputs (+1 position) for a prefix-LM model
    to attend bidirectionally; False: all zeros (a plain causal model: seqio says a fully
    causal model may ignore the feature; here it says so explicitly).
  inputs_eos: keep the EOS the pipeline ends the inputs with (seqio's tasks do: True). False
    drops it, so a prompt runs straight into its answer (a plain `prompt + completion`); the
    only EOS is then the one after the targets.
  chat_template: '' (none: the rules above), 'model' (the vocabulary's own chat template),
    a .jinja file or the template's text: each example is a conversation (chat.py: the
    exemplars as earlier turns, the query as the last user turn, the target as the
    assistant's answer), its prompt the render with the generation prompt and its targets
    the rest of the whole conversation's ids; no EOS is added (the template writes its
    end-of-turn token) and no start id (the template writes BOS where the model has one).
    Over-long prompts lose their first tokens (overflow='truncate'; the generation prompt is
    kept), over-long answers their last, the EOS put last as seqio does.
  system_prompt: with a chat template, a system message first ('' = none).
  """

  loss_on_targets_only: bool = True
  prefix_lm: bool = True
  inputs_eos: bool = True
  chat_template: str = ''
  system_prompt: str = ''
  features = DECODER_ONLY_FEATURES
  kind = 'decoder_only'

  def for_eval(self) -> 'DecoderOnlyFeatureConverter':
    """prefix_lm on (its mask marks the prompt: `model_inputs`), loss on the targets only
    (`model_targets`); inputs_eos kept."""
    return dataclasses.replace(self, prefix_lm=True, loss_on_targets_only=True)

  def model_inputs(self, batch: Mapping[str, np.ndarray], targets_length: int) -> np.ndarray:
    """T5X's DecoderOnlyModel.predict_batch prompt, `decoder_input_tokens *
    decoder_causal_attention`: the start id then the inputs (no start id: the inputs), as
    training read them (so the model predicts the first target after the last input). Cut
    to the inputs' width + 1: the targets' positions hold no prompt."""
    prompt = batch['decoder_input_tokens'] * batch['decoder_causal_attention']
    return prompt[:, :prompt.shape[1] - targets_length + 1]

  def model_inputs_mask(self, batch: Mapping[str, np.ndarray], targets_length: int
                        ) -> np.ndarray:
    """`decoder_causal_attention` (T5X's DecoderOnlyModel reads the prompt's extent there)."""
    mask = batch['decoder_causal_attention'] > 0
    return mask[:, :mask.shape[1] - targets_length + 1]

  def _targets_at_start(self, batch: Mapping[str, np.ndarray], targets_length: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    weights = batch['decoder_loss_weights']
    start = np.argmax(weights > 0, axis=1)
    idx = np.minimum(start[:, None] + np.arange(targets_length), weights.shape[1] - 1)
    picked = np.take_along_axis(batch['decoder_target_tokens'], idx, axis=1)
    return picked, np.take_along_axis(weights, idx, axis=1) > 0

  def model_targets(self, batch: Mapping[str, np.ndarray], targets_length: int) -> np.ndarray:
    """Each row's loss-weighted tokens (its targets), moved to the row's start."""
    picked, real = self._targets_at_start(batch, targets_length)
    return np.where(real, picked, 0).astype(np.int32)

  def model_targets_mask(self, batch: Mapping[str, np.ndarray], targets_length: int
                         ) -> np.ndarray:
    return self._targets_at_start(batch, targets_length)[1]

  def tokenize_example(self, vocab: Vocabulary, rendered: Mapping, lengths: Mapping[str, int],
                       overflow: str, where: str, prompt_length: int = 0,
                       features: tuple[str, ...] = ('inputs', 'targets')) -> dict:
    """The base's tokenization, or with `chat_template` the conversation's (class
    docstring)."""
    if not self.chat_template:
      return super().tokenize_example(vocab, rendered, lengths, overflow, where, prompt_length,
                                      features)
    if prompt_length:
      raise validation.ConfigError('prompt tuning (prompt_length) and a chat template do not '
                                   'go together: train the soft prompt without chat_template')
    text, tokens = chat.resolve(self.chat_template, vocab)
    prompt, completion = chat.encode(vocab, text, tokens,
                                     rendered.get('query', rendered['inputs']),
                                     rendered['targets'], rendered.get('turns', ()),
                                     self.system_prompt)
    out = {}
    for feature, ids in (('inputs', prompt), ('targets', completion)):
      length, cut = lengths[feature], max(0, len(ids) - lengths[feature])
      if cut and overflow == 'error':
        raise DataError(f'{where} {feature}: {len(ids)} tokens of the chat template\'s '
                        f'{"prompt" if feature == "inputs" else "answer"}, longer than the '
                        f'feature length {length}. Raise TASK_FEATURE_LENGTHS or use '
                        'overflow="truncate".')
      if cut:
        ids = ids[cut:] if feature == 'inputs' else ids[:length - 1] + [vocab.eos_id]
      out[feature], out[f'{feature}_truncated'] = np.asarray(ids, np.int32), cut
    return {k: v for k, v in out.items() if k.split('_')[0] in features}

  def options(self) -> dict:
    """As the base records them, a chat template file inlined as its text: the checkpoint's
    eval and infer then render it wherever they run."""
    options = super().options()
    if self.chat_template != chat.MODEL_TEMPLATE and chat.is_file(self.chat_template):
      options['chat_template'] = chat.resolve(self.chat_template, None)[0]
    return options

  def decode(self, vocab: Vocabulary, ids) -> str:
    """With a chat template, the text up to the template's end-of-turn (chat.end_of_turn)."""
    text = vocab.decode(ids)
    if self.chat_template:
      template, tokens = chat.resolve(self.chat_template, vocab)
      end = chat.end_of_turn(template, tuple(sorted(tokens.items())))
      text = text.split(end)[0] if end else text
    return text

  def example(self, ex: dict, vocab: Vocabulary) -> dict:
    inputs = np.asarray(ex['inputs'], np.int32)
    if not self.inputs_eos and not self.chat_template and inputs.size and (
        inputs[-1] == vocab.eos_id):
      inputs = inputs[:-1]
    seq = np.concatenate([inputs, np.asarray(ex['targets'], np.int32)])
    # a chat template writes its own BOS: its first token starts the sequence
    start, width = None if self.chat_template else vocab.decoder_start_id, inputs.size
    prompt = int(np.argmin(np.append(inputs, 0) < 0))   # soft prompt ids -1..-n first
    if prompt and start is not None and start == vocab.bos_id:   # peft's: prompt, BOS, text
      seq = np.concatenate([inputs[:prompt], [start], seq[prompt:]]).astype(np.int32)
      start, width = None, width + 1
    if start is None and seq.size:   # the first token starts the sequence (module docstring)
      start, seq, width = seq[0], seq[1:], max(width - 1, 0)
    task = np.asarray(ex['task_ids'])
    out = {'targets': seq,
           'task_ids': np.full(seq.size, task[0] if task.size else 0, np.int32),
           'inputs_width': np.full(seq.size, width, np.int32),
           'start_ids': np.full(seq.size, 0 if start is None else start, np.int32)}
    out.update({k: ex[k] for k in _META if k in ex})
    return out

  def length_struct(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
    n = feature_lengths['inputs'] + feature_lengths['targets']
    return {'targets': n, 'task_ids': n, 'inputs_width': n, 'start_ids': n}

  def meta_features(self) -> tuple[str, ...]:
    return ('task_ids', 'inputs_width', 'start_ids') + _META

  def finish_row(self, feature_lengths: Mapping[str, int], packed: bool) -> Callable[[dict], dict]:
    return _DecoderFinishRow(feature_lengths['inputs'] + feature_lengths['targets'], packed)

  def to_contract(self, vocab: Vocabulary) -> Callable[[dict], dict]:
    return _DecoderContract(self, vocab)

  def model_lengths(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
    n = feature_lengths['inputs'] + feature_lengths['targets']
    return {k: n for k in self.features}
