"""Published T5-family architectures: `preset('flan_t5', 'base')`.

Sizes match the released checkpoints (Hugging Face configs of google/t5-*, google/t5-v1_1-*,
google/flan-t5-*, google/mt5-*, google/byt5-*). `tiny` is ours: a few hundred thousand
parameters for tests and the CPU demo, with the 384-entry byte vocabulary so it needs no
SentencePiece file (override `vocab_size` to pair it with one).
"""

from __future__ import annotations

import difflib

from t5x_lite.models.t5 import T5Config

SIZES = ('tiny', 'small', 'base', 'large', 'xl', 'xxl')

# (d_model, num_heads, d_kv, d_ff, num_encoder_layers, num_decoder_layers)
_V1_0 = {
    'tiny': (64, 4, 16, 256, 2, 2),
    'small': (512, 8, 64, 2048, 6, 6),
    'base': (768, 12, 64, 3072, 12, 12),
    'large': (1024, 16, 64, 4096, 24, 24),
    'xl': (1024, 32, 128, 16384, 24, 24),      # "t5-3b"
    'xxl': (1024, 128, 128, 65536, 24, 24),    # "t5-11b"
}
_V1_1 = {  # also Flan-T5 and mT5
    'tiny': (64, 4, 16, 128, 2, 2),
    'small': (512, 6, 64, 1024, 8, 8),
    'base': (768, 12, 64, 2048, 12, 12),
    'large': (1024, 16, 64, 2816, 24, 24),
    'xl': (2048, 32, 64, 5120, 24, 24),
    'xxl': (4096, 64, 64, 10240, 24, 24),
}
_BYT5 = {  # deeper encoder than decoder (3:1)
    'tiny': (64, 4, 16, 128, 3, 1),
    'small': (1472, 6, 64, 3584, 12, 4),
    'base': (1536, 12, 64, 3968, 18, 6),
    'large': (1536, 16, 64, 3840, 36, 12),
    'xl': (2560, 32, 64, 6720, 36, 12),
    'xxl': (4672, 64, 64, 12352, 36, 12),
}
TINY_VOCAB_SIZE = 384  # the byte vocabulary: 256 bytes + PAD/EOS/UNK, padded to 3 * 128

# family -> (size table, vocab_size, feed_forward_proj, tie_word_embeddings)
FAMILIES = {
    't5_1_0': (_V1_0, 32128, 'relu', True),
    't5_1_1': (_V1_1, 32128, 'gated-gelu', False),
    'flan_t5': (_V1_1, 32128, 'gated-gelu', False),
    'mt5': (_V1_1, 250112, 'gated-gelu', False),
    'byt5': (_BYT5, 384, 'gated-gelu', False),
}


def _unknown(kind: str, name: str, known) -> ValueError:
  close = difflib.get_close_matches(name, list(known), n=3)
  hint = f' Did you mean {close}?' if close else ''
  return ValueError(f'Unknown model {kind} {name!r}.{hint} Known: {sorted(known)}')


def preset(family: str, size: str, **overrides) -> T5Config:
  """The architecture of `family` at `size`, with any T5Config field overridden."""
  if family not in FAMILIES:
    raise _unknown('family', family, FAMILIES)
  table, vocab_size, ffn, tied = FAMILIES[family]
  if size not in table:
    raise _unknown('size', size, table)
  d_model, heads, d_kv, d_ff, enc, dec = table[size]
  fields = dict(vocab_size=TINY_VOCAB_SIZE if size == 'tiny' else vocab_size, d_model=d_model,
                num_heads=heads, d_kv=d_kv, d_ff=d_ff, num_encoder_layers=enc,
                num_decoder_layers=dec, feed_forward_proj=ffn, tie_word_embeddings=tied)
  fields.update(overrides)
  return T5Config(**fields)


def all_presets() -> dict[str, T5Config]:
  return {f'{family}/{size}': preset(family, size) for family in FAMILIES for size in SIZES}


def num_params(c: T5Config) -> int:
  """Parameter count from the config alone (no tracing), for listings and memory plans."""
  attention = 4 * c.d_model * c.num_heads * c.d_kv
  mlp = (3 if c.feed_forward_proj.startswith('gated-') else 2) * c.d_model * c.d_ff
  relpos = c.relative_attention_num_buckets * c.num_heads
  encoder = c.num_encoder_layers * (attention + mlp + 2 * c.d_model) + relpos + c.d_model
  decoder = c.num_decoder_layers * (2 * attention + mlp + 3 * c.d_model) + relpos + c.d_model
  embeddings = c.vocab_size * c.d_model * (1 if c.tie_word_embeddings else 2)
  return encoder + decoder + embeddings
