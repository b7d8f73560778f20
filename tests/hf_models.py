"""Small random-weight `transformers` models written with `save_pretrained`, for parity tests."""

from __future__ import annotations

import torch
import transformers

# name -> (config class, model class, config kwargs)
STYLES = {
    # T5 v1.0: ReLU MLP, tied input/output embedding with d_model**-0.5 logit scaling.
    't5_v1_0': (transformers.T5Config, transformers.T5ForConditionalGeneration,
                dict(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                     num_decoder_layers=2, num_heads=4, feed_forward_proj='relu',
                     tie_word_embeddings=True)),
    # Flan-T5 / T5 v1.1: gated-GELU MLP, separate lm_head, asymmetric depth.
    'flan_t5': (transformers.T5Config, transformers.T5ForConditionalGeneration,
                dict(vocab_size=160, d_model=48, d_kv=12, d_ff=80, num_layers=3,
                     num_decoder_layers=2, num_heads=4, feed_forward_proj='gated-gelu',
                     tie_word_embeddings=False)),
    # mT5: its own model class and config, another vocab size and head count.
    'mt5': (transformers.MT5Config, transformers.MT5ForConditionalGeneration,
            dict(vocab_size=300, d_model=40, d_kv=10, d_ff=72, num_layers=2,
                 num_decoder_layers=3, num_heads=6, feed_forward_proj='gated-gelu',
                 relative_attention_num_buckets=16, relative_attention_max_distance=20)),
}


def make_hf_model(style: str, seed: int = 0):
  """A random-weight model in eval mode. Untied styles get a separate lm_head, with the
  encoder/decoder input embeddings tied to `shared` as in released checkpoints (transformers
  5 forces `tie_word_embeddings=True` at construction, see DESIGN.md)."""
  config_cls, model_cls, kwargs = STYLES[style]
  torch.manual_seed(seed)
  config = config_cls(dropout_rate=0.0, **kwargs)
  tied = kwargs.get('tie_word_embeddings', style != 'mt5')
  config.tie_word_embeddings = tied
  model = model_cls(config).eval()
  if not tied:
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    with torch.no_grad():  # independent lm_head, fan-in scale (no denormals)
      model.lm_head.weight.normal_(0.0, config.d_model ** -0.5)
  return model


def save_hf_model(style: str, path, seed: int = 0, **save_kwargs):
  model = make_hf_model(style, seed)
  model.save_pretrained(str(path), **save_kwargs)
  return model
