"""The decoder-only family's config: one dataclass that describes Llama, Qwen2/2.5, Qwen3 and
Gemma (v1) as switches over one pre-norm transformer (t5x_lite/models/decoder_only.py).

Field names follow Hugging Face's `LlamaConfig` where one exists. What the architectures
differ in, each a field here:
  Llama    RMSNorm `w * x`, RoPE (`rope_theta`, optional `llama3` scaling), GQA, SwiGLU;
           `attention_bias` (q/k/v/o biases) when a checkpoint sets it.
  Qwen2    q/k/v biases, none on the output projection (`qkv_bias`, not `out_bias`).
  Qwen3    per-head RMSNorm on queries and keys before RoPE (`qk_norm`).
  Gemma    RMSNorm `(1 + w) * x` (`norm_plus_one`), embeddings scaled by sqrt(hidden)
           (`scale_embeddings`), GeGLU with tanh-approximated GELU (`activation`), a
           `head_dim` independent of the width, tied embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np

from t5x_lite import validation
from t5x_lite.models import primitives

DTYPES = primitives.DTYPES
ACTIVATIONS = ('silu', 'gelu_tanh')
ARCHITECTURES = ('llama', 'qwen2', 'qwen3', 'gemma')
# llama3 RoPE scaling: (factor, low_freq_factor, high_freq_factor,
# original_max_position_embeddings), as Llama 3.1/3.2's config.json `rope_scaling`.
LLAMA3_SCALING_KEYS = ('factor', 'low_freq_factor', 'high_freq_factor',
                       'original_max_position_embeddings')


@dataclasses.dataclass(frozen=True)
class DecoderOnlyConfig(primitives.ConfigDtypes):
  """Architecture of one decoder-only model (see the module docstring)."""
  family: ClassVar[str] = 'decoder_only'   # models.build: DecoderOnlyModel
  architecture: str = 'llama'              # Hugging Face model_type it exports as
  vocab_size: int = 128256
  hidden_size: int = 2048
  intermediate_size: int = 8192
  num_layers: int = 16
  num_heads: int = 32
  num_kv_heads: int = 8                    # grouped-query attention: num_heads % this == 0
  head_dim: int = 64
  activation: str = 'silu'                 # 'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)
  rms_norm_eps: float = 1e-5
  norm_plus_one: bool = False              # Gemma: scale by (1 + w)
  scale_embeddings: bool = False           # Gemma: embeddings * sqrt(hidden_size)
  qkv_bias: bool = False                   # Qwen2 (and Llama/Qwen3 attention_bias)
  out_bias: bool = False                   # Llama/Qwen3 attention_bias
  qk_norm: bool = False                    # Qwen3
  tie_word_embeddings: bool = True
  rope_theta: float = 10000.0
  rope_scaling: tuple[float, ...] | None = None   # llama3 scaling (LLAMA3_SCALING_KEYS)
  max_position_embeddings: int = 8192      # recorded for export; positions are not capped
  # T5X's prefix LM (`DecoderOnlyModel(inputs_bidirectional_attention=True)`): positions a
  # batch's `decoder_causal_attention` marks attend to each other both ways.
  inputs_bidirectional_attention: bool = False
  bos_token_id: int | None = None          # recorded for export (vocabularies own their ids)
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dropout_rate: float = 0.0
  dtype: str = 'float32'                   # activations; params stay in param_dtype
  param_dtype: str = 'float32'
  remat: bool = False                      # rematerialise each layer in the backward pass

  def __post_init__(self):
    # JSON (checkpoint metas) turns tuples into lists; an int eos into a 1-tuple.
    if self.rope_scaling is not None:
      object.__setattr__(self, 'rope_scaling', tuple(float(x) for x in self.rope_scaling))
    eos = self.eos_token_id
    object.__setattr__(self, 'eos_token_id',
                       (eos,) if isinstance(eos, int) else tuple(eos or ()))
    positive = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
                'num_kv_heads', 'head_dim', 'rms_norm_eps', 'rope_theta',
                'max_position_embeddings')
    validation.check(self, {**dict.fromkeys(positive, '> 0'), 'dropout_rate': '[0, 1)',
                            'dtype': tuple(DTYPES), 'param_dtype': tuple(DTYPES),
                            'activation': ACTIVATIONS, 'architecture': ARCHITECTURES},
                     {'dropout_rate': 'DROPOUT_RATE', 'dtype': 'ACTIVATION_DTYPE'})
    if self.num_heads % self.num_kv_heads:
      raise validation.ConfigError(
          f'DecoderOnlyConfig: num_heads={self.num_heads} is not a multiple of '
          f'num_kv_heads={self.num_kv_heads} (grouped-query attention shares each key/value '
          'head among num_heads / num_kv_heads query heads).')
    if self.head_dim % 2:
      raise validation.ConfigError(f'DecoderOnlyConfig: head_dim={self.head_dim} must be even '
                                   '(RoPE rotates pairs).')
    if self.rope_scaling is not None and len(self.rope_scaling) != len(LLAMA3_SCALING_KEYS):
      raise validation.ConfigError(
          f'DecoderOnlyConfig: rope_scaling={self.rope_scaling} must be the llama3 scaling '
          f'({", ".join(LLAMA3_SCALING_KEYS)}) or None.')


def inverse_frequencies(c: DecoderOnlyConfig) -> np.ndarray:
  """RoPE's [head_dim / 2] inverse frequencies in float32, as transformers computes them
  (`modeling_rope_utils`: default, and `llama3` with its smooth band between the low- and
  high-frequency wavelengths)."""
  exponents = np.arange(0, c.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(
      c.head_dim)
  inv_freq = (1.0 / (np.float32(c.rope_theta) ** exponents)).astype(np.float32)
  if c.rope_scaling is None:
    return inv_freq
  factor, low, high, original = c.rope_scaling
  low_wavelen, high_wavelen = original / low, original / high
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def num_params(c: DecoderOnlyConfig) -> int:
  """Parameter count from the config alone (no tracing), for listings and memory plans."""
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  attention = 2 * c.hidden_size * q + 2 * c.hidden_size * kv
  attention += (q + 2 * kv) * c.qkv_bias + c.hidden_size * c.out_bias + 2 * c.head_dim * c.qk_norm
  layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
  embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
  return c.num_layers * layer + embeddings + c.hidden_size
