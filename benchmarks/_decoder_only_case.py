"""The decoder-only rows of benchmarks/train_step.py and benchmarks/decode.py: a Llama model at
SmolLM-135M's shape (HuggingFaceTB/SmolLM-135M: hidden 576, 30 layers, 9 heads of 64, 3
key/value heads, MLP 1536, vocabulary 49152, tied embeddings, RoPE theta 10000), random
weights, batch 8 x 256 tokens.

Both sides run the same weights, written once by `write_hf_dir` through
`t5x_lite.hf_causal.save`: our workers read them back with `hf_causal.load`, HF's with
`transformers.AutoModelForCausalLM.from_pretrained`. They are drawn in numpy with our model's
initialisation (t5x_lite/models/decoder_only.py: normal with std fan_in**-0.5 for every
projection, hidden**-0.5 for the tied embedding, norm scales 1): seconds, where jax's
`init_params` compiles the whole model first (~40 s at 135M on this host). `tiny` is the
same architecture at llama3's tiny preset shape (the byte vocabulary's 384 ids) for `--quick`
runs.
"""

import numpy as np

BATCH, LENGTH = 8, 256
SIZES = {
    # HuggingFaceTB/SmolLM-135M's config.json (LlamaForCausalLM)
    '135m': dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                 num_kv_heads=3, head_dim=64, vocab_size=49152),
    'tiny': dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=384),
}
# train_step.py's case name -> (size, activation dtype)
TRAIN_CASES = {'llama_135m_fp32': ('135m', 'float32'), 'llama_tiny_fp32': ('tiny', 'float32')}
TRAIN_CASE_OF_SIZE = {size: case for case, (size, _) in TRAIN_CASES.items()}


NAMES = {'135m': 'Llama at SmolLM-135M shape', 'tiny': 'Llama tiny'}  # short, for tables


def describe(size):
  s = SIZES[size]
  shape = (f'hidden {s["hidden_size"]}, {s["num_layers"]} layers, {s["num_heads"]} heads x '
           f'{s["head_dim"]}, {s["num_kv_heads"]} kv heads, MLP {s["intermediate_size"]}, '
           f'vocab {s["vocab_size"]}, tied embeddings')
  return (f'llama, SmolLM-135M shape ({shape})' if size == '135m' else f'llama tiny ({shape})')


def config(size, dtype='float32'):
  """Our DecoderOnlyConfig for `size` (SmolLM-135M's settings at every size)."""
  from t5x_lite.models import DecoderOnlyConfig
  return DecoderOnlyConfig(architecture='llama', rms_norm_eps=1e-5, rope_theta=10000.0,
                           max_position_embeddings=2048, tie_word_embeddings=True, dtype=dtype,
                           **SIZES[size])


def random_params(c, seed=0):
  """Parameters of config `c` as our init draws them (module docstring), float32 numpy."""
  from t5x_lite import hf_causal
  rng = np.random.default_rng(seed)
  params = {}
  for t in hf_causal.tensor_names(c):
    if len(t.shape) == 1:
      x = np.ones(t.shape, np.float32)
    else:
      fan_in = c.hidden_size if t.ours == 'embedding' else t.shape[0]
      x = rng.standard_normal(t.shape, np.float32) * np.float32(fan_in ** -0.5)
    *path, leaf = t.ours.split('/')
    node = params
    for key in path:
      node = node.setdefault(key, {})
    node[leaf] = x
  return params


def write_hf_dir(size, path, seed=0):
  """Random weights of `size` (module docstring) saved as a Hugging Face directory at `path`."""
  from t5x_lite import hf_causal
  c = config(size)
  hf_causal.save(c, random_params(c, seed), path)


def train_batch(vocab_size, seed=0):
  """The decoder-only batch contract (DecoderOnlyFeatureConverter's features) with random ids:
  one segment per row, every position real and in the loss (full-sequence loss), plain
  causal attention (no prefix)."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, vocab_size, (BATCH, LENGTH), np.int32)
  ones = np.ones_like(targets)
  return {'decoder_target_tokens': targets,
          'decoder_input_tokens': np.concatenate([np.zeros((BATCH, 1), np.int32),
                                                  targets[:, :-1]], axis=1),
          'decoder_loss_weights': ones, 'decoder_segment_ids': ones,
          'decoder_positions': np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
          'decoder_causal_attention': np.zeros_like(targets),
          'decoder_task_ids': np.zeros_like(targets)}


def prompts(vocab_size, length=LENGTH, seed=0):
  """[BATCH, length] prompt ids, none of them 0 (a trailing 0 would read as padding)."""
  return np.random.default_rng(seed).integers(3, vocab_size, (BATCH, length), np.int32)
