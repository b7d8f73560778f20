"""Feature converters: the model families' implementations of the converter interface
(converter_base.py), and `for_kind`, which picks one by a model's `feature_kind`.

`EncDecFeatureConverter` (the default) is seqio's EncDecFeatureConverter: DESIGN.md's
encoder-decoder batch, byte for byte what the pipeline always produced.
`DecoderOnlyFeatureConverter` (decoder_only_converter.py) is seqio's PrefixLMFeatureConverter.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from t5x_lite import validation
from t5x_lite.data.converter_base import (  # pylint: disable=unused-import
    _META, DECODER_ONLY_FEATURES, ENC_DEC_FEATURES, FeatureConverter, _cuts,
    _shift_within_segments, _stats, tokenize)
from t5x_lite.data.decoder_only_converter import DecoderOnlyFeatureConverter
from t5x_lite.data.vocab import Vocabulary


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
