"""Small random-weight `transformers` models written with `save_pretrained`, for parity tests."""

from __future__ import annotations

import torch
import transformers

T5 = (transformers.T5Config, transformers.T5ForConditionalGeneration)
_V1_0 = dict(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
             num_heads=4, feed_forward_proj='relu')
_FLAN = dict(vocab_size=160, d_model=48, d_kv=12, d_ff=80, num_layers=3, num_decoder_layers=2,
             num_heads=4, feed_forward_proj='gated-gelu')

# name -> (config class, model class, config kwargs, lm_head is `shared`, logits scaled by
# d_model**-0.5). transformers 5 writes `tie_word_embeddings` and `scale_decoder_outputs`.
STYLES = {
    # T5 v1.0: ReLU MLP, tied input/output embedding with d_model**-0.5 logit scaling.
    't5_v1_0': (*T5, _V1_0, True, True),
    # Flan-T5 / T5 v1.1: gated-GELU MLP, separate lm_head, asymmetric depth.
    'flan_t5': (*T5, _FLAN, False, False),
    # The other two output layers transformers 5 can hold and save.
    'untied_scaled': (*T5, _FLAN, False, True),
    'tied_unscaled': (*T5, _V1_0, True, False),
    # mT5: its own model class and config, another vocab size and head count.
    'mt5': (transformers.MT5Config, transformers.MT5ForConditionalGeneration,
            dict(vocab_size=300, d_model=40, d_kv=10, d_ff=72, num_layers=2,
                 num_decoder_layers=3, num_heads=6, feed_forward_proj='gated-gelu',
                 relative_attention_num_buckets=16, relative_attention_max_distance=20),
            False, False),
    # ByT5: the byt5 preset's tiny shape (byte vocabulary 384, encoder 3x deeper).
    'byt5': (*T5, dict(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=3,
                       num_decoder_layers=1, num_heads=4, feed_forward_proj='gated-gelu'),
             False, False),
}


def make_hf_model(style: str, seed: int = 0):
  """A random-weight model in eval mode. Untied styles get a separate lm_head, with the
  encoder/decoder input embeddings tied to `shared` as in released checkpoints (transformers
  5 forces `tie_word_embeddings=True` at construction, see DESIGN.md)."""
  config_cls, model_cls, kwargs, tied, scaled = STYLES[style]
  torch.manual_seed(seed)
  if config_cls is transformers.T5Config:
    kwargs = dict(kwargs, scale_decoder_outputs=scaled)
  config = config_cls(dropout_rate=0.0, **kwargs)
  config.tie_word_embeddings = tied
  model = model_cls(config).eval()
  if not tied:
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    with torch.no_grad():  # independent lm_head, fan-in scale (no denormals)
      model.lm_head.weight.normal_(0.0, config.d_model ** -0.5)
  return model


def save_hf_model(style: str, path, seed: int = 0, dtype=None, **save_kwargs):
  """`make_hf_model` saved to `path` (cast to the torch `dtype` first when given)."""
  model = make_hf_model(style, seed)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(str(path), **save_kwargs)
  return model
