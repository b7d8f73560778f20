"""Decoding through the model interface: greedy and sampling (sampling.py), beam search
with T5X's semantics (beam_search.py), and `predict`, which picks one by `DecodingConfig`."""

from t5x_lite.decoding import beam_search
from t5x_lite.decoding.predict import DecodingConfig, predict
from t5x_lite.decoding.sampling import (EOS_ID, NEG_INF, SamplingConfig, decode, greedy_decode,
                                        jit, truncate_logits)

__all__ = ['DecodingConfig', 'EOS_ID', 'NEG_INF', 'SamplingConfig', 'beam_search', 'decode',
           'greedy_decode', 'jit', 'predict', 'truncate_logits']
