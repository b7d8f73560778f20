"""Published decoder-only architectures: `preset('llama3', '1b')`.

Shapes, vocabularies and RoPE settings of the released Hugging Face configs
(meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B; Qwen/Qwen2.5-0.5B, -1.5B, -7B; Qwen/Qwen3-0.6B,
-1.7B; google/gemma-2b, -7b). `PUBLISHED` holds each one's published parameter count
(tests/models/test_decoder_only.py checks `num_params` against it and against transformers'
model built on the meta device). `tiny` is ours: a few tens of
thousands of parameters for CPU tests, with the byte vocabulary's 384 entries.
"""

from __future__ import annotations

from t5x_lite.models.decoder_only_config import DecoderOnlyConfig, num_params
from t5x_lite.models.presets import TINY_VOCAB_SIZE, _unknown

_LLAMA3 = dict(architecture='llama', vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=131072, bos_token_id=128000, eos_token_id=(128001,))
_QWEN25 = dict(architecture='qwen2', vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
               qkv_bias=True, max_position_embeddings=32768, bos_token_id=151643,
               eos_token_id=(151643,))
_QWEN3 = dict(architecture='qwen3', vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
              qk_norm=True, head_dim=128, max_position_embeddings=40960, bos_token_id=151643,
              eos_token_id=(151645,))
_GEMMA = dict(architecture='gemma', vocab_size=256000, rms_norm_eps=1e-6, rope_theta=10000.0,
              activation='gelu_tanh', norm_plus_one=True, scale_embeddings=True, head_dim=256,
              tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=2,
              eos_token_id=(1,), pad_token_id=0)


def _shape(d, f, layers, heads, kv_heads, **more):
  return dict(hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
              num_kv_heads=kv_heads, **more)


_TINY = _shape(64, 128, 2, 4, 2, head_dim=16, vocab_size=TINY_VOCAB_SIZE)

# family -> (base fields, size -> fields)
FAMILIES = {
    'llama3': (_LLAMA3, {
        'tiny': {**_TINY},
        '1b': _shape(2048, 8192, 16, 32, 8, head_dim=64, tie_word_embeddings=True,
                     rope_scaling=(32.0, 1.0, 4.0, 8192.0)),          # Llama-3.2-1B
        '3b': _shape(3072, 8192, 28, 24, 8, head_dim=128, tie_word_embeddings=True,
                     rope_scaling=(32.0, 1.0, 4.0, 8192.0)),          # Llama-3.2-3B
        '8b': _shape(4096, 14336, 32, 32, 8, head_dim=128, tie_word_embeddings=False,
                     rope_scaling=(8.0, 1.0, 4.0, 8192.0)),           # Llama-3.1-8B
    }),
    'qwen2_5': (_QWEN25, {
        'tiny': {**_TINY, 'tie_word_embeddings': True},
        '0.5b': _shape(896, 4864, 24, 14, 2, head_dim=64, tie_word_embeddings=True),
        '1.5b': _shape(1536, 8960, 28, 12, 2, head_dim=128, tie_word_embeddings=True),
        '7b': _shape(3584, 18944, 28, 28, 4, head_dim=128, tie_word_embeddings=False,
                     vocab_size=152064, max_position_embeddings=131072),
    }),
    'qwen3': (_QWEN3, {
        'tiny': {**_TINY, 'tie_word_embeddings': True},
        '0.6b': _shape(1024, 3072, 28, 16, 8, tie_word_embeddings=True),
        '1.7b': _shape(2048, 6144, 28, 16, 8, tie_word_embeddings=True),
    }),
    'gemma': (_GEMMA, {
        'tiny': {**_TINY},
        '2b': _shape(2048, 16384, 18, 8, 1),
        '7b': _shape(3072, 24576, 28, 16, 16),
    }),
}

# Parameter counts of the released models (a tied embedding counted once).
PUBLISHED = {
    'llama3/1b': 1_235_814_400, 'llama3/3b': 3_212_749_824, 'llama3/8b': 8_030_261_248,
    'qwen2_5/0.5b': 494_032_768, 'qwen2_5/1.5b': 1_543_714_304, 'qwen2_5/7b': 7_615_616_512,
    # Qwen3's model cards: 0.6B (0.44B non-embedding), 1.7B (1.4B non-embedding). The hub's
    # Qwen3-1.7B safetensors hold 2,031,739,904 elements: they store a copy of the tied
    # lm_head (hf_causal.load accepts it when equal to the embedding).
    'qwen3/0.6b': 596_049_920, 'qwen3/1.7b': 1_720_574_976,
    'gemma/2b': 2_506_172_416, 'gemma/7b': 8_537_680_896,
}


def preset(family: str, size: str, **overrides) -> DecoderOnlyConfig:
  """The architecture of `family` at `size`, with any DecoderOnlyConfig field overridden."""
  if family not in FAMILIES:
    raise _unknown('family', family, FAMILIES)
  base, sizes = FAMILIES[family]
  if size not in sizes:
    raise _unknown('size', size, sizes)
  return DecoderOnlyConfig(**{**base, **sizes[size], **overrides})


def all_presets() -> dict[str, DecoderOnlyConfig]:
  return {f'{family}/{size}': preset(family, size)
          for family, (_, sizes) in FAMILIES.items() for size in sizes}


__all__ = ['FAMILIES', 'PUBLISHED', 'all_presets', 'num_params', 'preset']
