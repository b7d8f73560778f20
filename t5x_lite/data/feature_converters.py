"""Feature converters: tokenized (inputs, targets) examples -> a model family's batch features.

T5X picks the conversion per model (its `FEATURE_CONVERTER_CLS`); here it is an object the
caller passes in (`pipeline.PipelineConfig.feature_converter`), and the pipeline calls its
four hooks without knowing the family:

  example(ex, vocab)          one tokenized example, before mixing and packing
  length_struct(lengths)      the per-token features packing/padding fills, and their length
  finish_row(lengths, packed) one packed or padded row (+ truncation stats)
  to_contract(vocab)          a batch of rows -> the model's features (vectorised)

`EncDecFeatureConverter` (the default) is seqio's EncDecFeatureConverter: DESIGN.md's
encoder-decoder batch, byte for byte what the pipeline always produced.

`DecoderOnlyFeatureConverter` is seqio's PrefixLMFeatureConverter (and, with
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

import abc
import dataclasses
from typing import Callable, Mapping

import numpy as np

from t5x_lite import validation
from t5x_lite.data.vocab import Vocabulary

ENC_DEC_FEATURES = ('encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions',
                    'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
                    'decoder_segment_ids', 'decoder_positions', 'decoder_task_ids')
DECODER_ONLY_FEATURES = ('decoder_input_tokens', 'decoder_target_tokens',
                         'decoder_loss_weights', 'decoder_segment_ids', 'decoder_positions',
                         'decoder_causal_attention', 'decoder_task_ids')
_META = ('inputs_truncated', 'targets_truncated', 'exemplars_dropped')


def _shift_within_segments(targets: np.ndarray, segment_ids: np.ndarray,
                           start_id: int | np.ndarray = 0) -> np.ndarray:
  """Decoder inputs: targets shifted right by one, with `start_id` (a scalar, or per
  position) at the start of every segment (and at the first padding position after one)."""
  shifted = np.zeros_like(targets)
  shifted[..., 1:] = targets[..., :-1]
  starts = np.ones_like(segment_ids, dtype=bool)
  starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
  shifted[starts] = start_id[starts] if isinstance(start_id, np.ndarray) else start_id
  return shifted


def _stats(out: dict, cut_in: np.ndarray, cut_out: np.ndarray, dropped: np.ndarray) -> dict:
  out['stats/examples'] = np.int32(len(cut_in))
  out['stats/inputs_truncated'] = np.int32(cut_in.sum())
  out['stats/targets_truncated'] = np.int32(cut_out.sum())
  out['stats/truncated_examples'] = np.int32(((cut_in + cut_out) > 0).sum())
  out['stats/exemplars_dropped'] = np.int32(dropped.sum())
  return out


def _cuts(row: dict, packed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  dropped = np.asarray(row.get('exemplars_dropped', 0))   # eval rows have none
  if packed:  # packing returns the per-example scalars as lists
    return np.asarray(row['inputs_truncated']), np.asarray(row['targets_truncated']), dropped
  return np.asarray([row['inputs_truncated']]), np.asarray([row['targets_truncated']]), dropped


class _FinishRow:
  """One packed or padded encoder-decoder row: fixed-length arrays plus scalar truncation
  stats."""

  def __init__(self, lengths: Mapping[str, int], packed: bool):
    self.lengths, self.packed = dict(lengths), packed

  def __call__(self, row: dict) -> dict:
    cut_in, cut_out, dropped = _cuts(row, self.packed)
    if self.packed:
      out = {k: row[k] for k in ('inputs', 'targets', 'task_ids', 'inputs_segment_ids',
                                 'inputs_positions', 'targets_segment_ids', 'targets_positions')}
    else:
      out = {}
      for key, feature in (('inputs', 'inputs'), ('targets', 'targets'), ('task_ids', 'targets')):
        padded = np.zeros(self.lengths[feature], np.int32)
        padded[:len(row[key])] = row[key]
        out[key] = padded
    return _stats(out, cut_in, cut_out, dropped)


def _to_contract(batch: dict) -> dict:
  """Batched encoder-decoder rows -> the batch contract of DESIGN.md (vectorised)."""
  if 'inputs_segment_ids' in batch:
    enc_seg, enc_pos = batch['inputs_segment_ids'], batch['inputs_positions']
    dec_seg, dec_pos = batch['targets_segment_ids'], batch['targets_positions']
  else:  # padded rows: one segment each (soft prompt ids are negative: not padding)
    enc_seg = (batch['inputs'] != 0).astype(np.int32)
    dec_seg = (batch['task_ids'] > 0).astype(np.int32)
    enc_pos = np.arange(enc_seg.shape[-1], dtype=np.int32) * enc_seg
    dec_pos = np.arange(dec_seg.shape[-1], dtype=np.int32) * dec_seg
  targets = batch['targets'].astype(np.int32)
  out = {
      'encoder_input_tokens': batch['inputs'].astype(np.int32),
      'encoder_segment_ids': enc_seg.astype(np.int32),
      'encoder_positions': enc_pos.astype(np.int32),
      'decoder_input_tokens': _shift_within_segments(targets, dec_seg),
      'decoder_target_tokens': targets,
      'decoder_loss_weights': (dec_seg > 0).astype(np.int32),
      'decoder_segment_ids': dec_seg.astype(np.int32),
      'decoder_positions': dec_pos.astype(np.int32),
      'decoder_task_ids': batch['task_ids'].astype(np.int32) - 1,
  }
  out.update({k: v for k, v in batch.items() if k.startswith('stats/')})
  return out


class FeatureConverter(abc.ABC):
  """A model family's conversion of tokenized examples (module docstring). Subclasses are
  frozen dataclasses: plain values a gin file can build and a run's config can record."""

  features: tuple[str, ...] = ()
  kind: str = ''   # the `Model.feature_kind` it makes batches for

  @abc.abstractmethod
  def example(self, ex: dict, vocab: Vocabulary) -> dict:
    """One tokenized example ({'inputs', 'targets', 'task_ids', *_truncated, ...}) -> what
    packing/padding takes."""

  @abc.abstractmethod
  def length_struct(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
    """The per-token features of `example`'s output and the row length of each."""

  @abc.abstractmethod
  def finish_row(self, feature_lengths: Mapping[str, int], packed: bool) -> Callable[[dict], dict]:
    """A function: one packed (grain FirstFit) or unpadded row -> fixed-length arrays + stats."""

  @abc.abstractmethod
  def to_contract(self, vocab: Vocabulary) -> Callable[[dict], dict]:
    """A function: a batch of finished rows -> the model's features (+ 'stats/...')."""

  def meta_features(self) -> tuple[str, ...]:
    """What grain's packing keeps per example instead of packing (and per-token features it
    packs without segment ids of their own)."""
    return ('task_ids',) + _META

  @abc.abstractmethod
  def model_lengths(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
    """Each model feature's length (seqio's get_model_feature_lengths)."""

  def for_eval(self) -> 'FeatureConverter':
    """The converter of eval rows (`eval_inputs.eval_batches`), whose `model_inputs` then
    finds each row's prompt."""
    return self

  @abc.abstractmethod
  def model_inputs(self, batch: Mapping[str, np.ndarray], targets_length: int) -> np.ndarray:
    """The `inputs` [batch, length] the model interface decodes from and scores against
    (`Model.init_decode`, `score_options`), right-padded, from an eval batch of `for_eval()`
    whose targets take `targets_length` positions."""

  @abc.abstractmethod
  def model_inputs_mask(self, batch: Mapping[str, np.ndarray], targets_length: int
                        ) -> np.ndarray:
    """Which positions of `model_inputs` hold tokens (the interface's `inputs_mask`): a
    vocabulary's id 0 may be a real token, so padding is never read from the ids."""

  @abc.abstractmethod
  def model_targets(self, batch: Mapping[str, np.ndarray], targets_length: int) -> np.ndarray:
    """The targets [batch, targets_length] (EOS included, 0 on padding) that `Model.score`
    scores after `model_inputs`, from the same eval batch."""

  @abc.abstractmethod
  def model_targets_mask(self, batch: Mapping[str, np.ndarray], targets_length: int
                         ) -> np.ndarray:
    """Which positions of `model_targets` are scored (the interface's `targets_mask`)."""

  def options(self) -> dict:
    """The converter as `for_kind(kind, **options)` rebuilds it (a checkpoint's meta)."""
    return {'kind': self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class EncDecFeatureConverter(FeatureConverter):
  """seqio's EncDecFeatureConverter: DESIGN.md's encoder-decoder batch contract."""

  features = ENC_DEC_FEATURES
  kind = 'encoder_decoder'

  def example(self, ex: dict, vocab: Vocabulary) -> dict:
    return ex

  def model_inputs(self, batch: Mapping[str, np.ndarray], targets_length: int) -> np.ndarray:
    return batch['encoder_input_tokens']

  def model_inputs_mask(self, batch: Mapping[str, np.ndarray], targets_length: int
                        ) -> np.ndarray:
    return batch['encoder_input_tokens'] != 0   # T5's vocabularies pad with 0

  def model_targets(self, batch: Mapping[str, np.ndarray], targets_length: int) -> np.ndarray:
    return batch['decoder_target_tokens']

  def model_targets_mask(self, batch: Mapping[str, np.ndarray], targets_length: int
                         ) -> np.ndarray:
    return batch['decoder_target_tokens'] > 0

  def length_struct(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
    return {'inputs': feature_lengths['inputs'], 'targets': feature_lengths['targets'],
            'task_ids': feature_lengths['targets']}

  def finish_row(self, feature_lengths: Mapping[str, int], packed: bool) -> Callable[[dict], dict]:
    return _FinishRow(feature_lengths, packed)

  def to_contract(self, vocab: Vocabulary) -> Callable[[dict], dict]:
    return _to_contract

  def model_lengths(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
    enc, dec = feature_lengths['inputs'], feature_lengths['targets']
    return {k: enc if k.startswith('encoder_') else dec for k in self.features}


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
    drops it, so a prompt runs straight into its answer as chat/instruction-tuned causal
    models expect; the only EOS is then the one after the targets.
  """

  loss_on_targets_only: bool = True
  prefix_lm: bool = True
  inputs_eos: bool = True
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

  def example(self, ex: dict, vocab: Vocabulary) -> dict:
    inputs = np.asarray(ex['inputs'], np.int32)
    if not self.inputs_eos and inputs.size and inputs[-1] == vocab.eos_id:
      inputs = inputs[:-1]
    seq = np.concatenate([inputs, np.asarray(ex['targets'], np.int32)])
    start, width = vocab.decoder_start_id, inputs.size
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


CONVERTERS = {'encoder_decoder': EncDecFeatureConverter,
              'decoder_only': DecoderOnlyFeatureConverter}


def for_kind(kind: str, **options) -> FeatureConverter:
  """The converter of a model's batch form (`Model.feature_kind`; T5X's
  FEATURE_CONVERTER_CLS), with `options` (e.g. decoder-only `loss_on_targets_only`,
  `prefix_lm`, `inputs_eos`)."""
  if kind not in CONVERTERS:
    raise ValueError(f'no feature converter for {kind!r}; known: {sorted(CONVERTERS)}')  # internal
  fields = {f.name for f in dataclasses.fields(CONVERTERS[kind])}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise validation.ConfigError(
        f'feature converter options {unknown} do not apply to a {kind} model'
        + (f' (its options: {sorted(fields)})' if fields else ' (it has none)'))
  return CONVERTERS[kind](**options)
