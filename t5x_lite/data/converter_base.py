"""The feature-converter interface: tokenized (inputs, targets) examples -> a model family's
batch features (feature_converters.py lists the implementations), plus the tokenization
every converter starts from (`tokenize`: seqio's EOS after truncation).

T5X picks the conversion per model (its `FEATURE_CONVERTER_CLS`); here it is an object the
caller passes in (`pipeline.PipelineConfig.feature_converter`), and the pipeline calls its
hooks without knowing the family:

  tokenize_example(...)       a rendered example's text -> its inputs and targets ids
  example(ex, vocab)          one tokenized example, before mixing and packing
  length_struct(lengths)      the per-token features packing/padding fills, and their length
  finish_row(lengths, packed) one packed or padded row (+ truncation stats)
  to_contract(vocab)          a batch of rows -> the model's features (vectorised)
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Mapping

import numpy as np

from t5x_lite.data.sources import DataError
from t5x_lite.data.vocab import Vocabulary, prompt_ids

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


def tokenize(vocab: Vocabulary, text: str, length: int, overflow: str,
             where: str, prompt_length: int = 0) -> tuple[np.ndarray, int]:
  """Token ids cut to `length - 1`, then EOS, so a truncated sequence still ends with EOS:
  seqio's `append_eos_after_trim` (seqio/preprocessors.py, `append_eos_after_trim_impl`:
  `value[..., :max_length - 1]`, then EOS appended). With `prompt_length` n the text gets
  `length - n` of the `length` positions and `prompt_ids(n)` go first. Returns the ids and
  the number of text tokens cut."""
  ids, room = vocab.encode(text), length - prompt_length
  cut = max(0, len(ids) + 1 - room)
  if cut and overflow == 'error':
    budget = (f'the feature length {length}' if not prompt_length else
              f'the {room} positions the feature length {length} leaves beside the '
              f'{prompt_length}-token prompt')
    raise DataError(f'{where}: {len(ids) + 1} tokens (with EOS), longer than {budget}. '
                    'Raise TASK_FEATURE_LENGTHS or use overflow="truncate".')
  text_ids = np.asarray(ids[:max(0, room - 1)] + [vocab.eos_id], np.int32)
  if prompt_length:
    text_ids = np.concatenate([prompt_ids(prompt_length), text_ids])
  return text_ids, cut



class FeatureConverter(abc.ABC):
  """A model family's conversion of tokenized examples (module docstring). Subclasses are
  frozen dataclasses: plain values a gin file can build and a run's config can record."""

  features: tuple[str, ...] = ()
  kind: str = ''   # the `Model.feature_kind` it makes batches for

  def tokenize_example(self, vocab: Vocabulary, rendered: Mapping, lengths: Mapping[str, int],
                       overflow: str, where: str, prompt_length: int = 0,
                       features: tuple[str, ...] = ('inputs', 'targets')) -> dict:
    """{feature: ids, f'{feature}_truncated': tokens cut} of a rendered example's
    `features` (its 'inputs' and 'targets' text; a chat template also reads its 'turns' and
    'query'): each text tokenized with EOS after truncation (`tokenize`), the soft prompt's
    `prompt_length` ids first in the inputs."""
    out = {}
    for feature in features:
      out[feature], out[f'{feature}_truncated'] = tokenize(
          vocab, rendered[feature], lengths[feature], overflow, f'{where} {feature}',
          prompt_length if feature == 'inputs' else 0)
    return out

  def decode(self, vocab: Vocabulary, ids) -> str:
    """The text of decoded ids (a prediction): the vocabulary's decode, up to EOS."""
    return vocab.decode(ids)

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
