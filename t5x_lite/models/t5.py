"""The T5 encoder-decoder (v1.0, v1.1, Flan-T5, mT5, ByT5) as one configurable flax.linen model.

Inputs follow the batch contract of DESIGN.md: token ids with PAD=0, optional
`*_segment_ids` for packed rows (no attention across segments). The relative position bias
is computed from token indices, once per batch as [1, heads, q, k] (as T5X does): inside a
segment index differences equal position differences, and pairs across segments are
masked, so `*_positions` need not be read (a per-row bias would cost B times more). `decode=True` runs the decoder one token at a time over a
KV cache (see `encoder_decoder.EncoderDecoderModel.init_decode`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import kernels as kernels_lib, validation
from t5x_lite.models import layers, lora, primitives
from t5x_lite.models.layers import (Embed, MlpBlock, MultiHeadAttention, RMSNorm,
                                    RelativePositionBias, constrain, mask_to_bias)

DTYPES = primitives.DTYPES


@dataclasses.dataclass(frozen=True)
class T5Config(primitives.ConfigDtypes):
  """Architecture of one T5-family model. Field names follow Hugging Face's `T5Config`."""
  family: ClassVar[str] = 't5'         # models.build: the encoder-decoder model interface
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  d_kv: int = 64
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  feed_forward_proj: str = 'relu'      # 'relu' (v1.0) or 'gated-gelu' (v1.1, Flan, mT5, ByT5)
  tie_word_embeddings: bool = True     # logits through the shared embedding (no lm_head)
  # logits from x * d_model**-0.5: T5 v1.0 (tied), and any model transformers >= 5 saves with
  # this key. None: as tie_word_embeddings (transformers' default without the key; checkpoint
  # metas written before this field).
  scale_decoder_outputs: bool | None = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: str = 'float32'               # activations; params stay in param_dtype
  param_dtype: str = 'float32'
  remat: bool = False                  # rematerialise each layer in the backward pass

  def __post_init__(self):
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, 'scale_decoder_outputs', self.tie_word_embeddings)
    positive = ('vocab_size', 'd_model', 'num_heads', 'd_kv', 'd_ff', 'num_encoder_layers',
                'num_decoder_layers', 'relative_attention_num_buckets',
                'relative_attention_max_distance', 'layer_norm_epsilon')
    validation.check(self, {**dict.fromkeys(positive, '> 0'), 'dropout_rate': '[0, 1)',
                            'dtype': tuple(DTYPES), 'param_dtype': tuple(DTYPES)},
                     {'dropout_rate': 'DROPOUT_RATE', 'dtype': 'ACTIVATION_DTYPE'})
    try:
      layers.parse_feed_forward_proj(self.feed_forward_proj)
    except ValueError as e:
      raise validation.ConfigError(f't5.T5Config.{e}') from None


def _attention(cfg: T5Config, kernels: kernels_lib.Kernels, name: str, adapters: Any,
               stack: str, cross: bool = False) -> MultiHeadAttention:
  return MultiHeadAttention(cfg.num_heads, cfg.d_kv, is_cross_attention=cross,
                            dropout_rate=cfg.dropout_rate, dtype=cfg.activation_dtype,
                            param_dtype=cfg.parameter_dtype, kernels=kernels,
                            adapters=adapters, stack=stack, name=name)


def _norm(cfg: T5Config, name: str) -> RMSNorm:
  return RMSNorm(cfg.layer_norm_epsilon, dtype=cfg.activation_dtype,
                 param_dtype=cfg.parameter_dtype, name=name)


def _mlp(cfg: T5Config, kernels: kernels_lib.Kernels, adapters: Any, stack: str) -> MlpBlock:
  return MlpBlock(cfg.d_ff, cfg.feed_forward_proj, cfg.dropout_rate, dtype=cfg.activation_dtype,
                  param_dtype=cfg.parameter_dtype, kernels=kernels, adapters=adapters,
                  stack=stack, name='mlp')


def _relpos(cfg: T5Config, bidirectional: bool) -> RelativePositionBias:
  return RelativePositionBias(cfg.relative_attention_num_buckets,
                              cfg.relative_attention_max_distance, cfg.num_heads, bidirectional,
                              dtype=jnp.float32, param_dtype=cfg.parameter_dtype,
                              embedding_init=layers.normal(cfg.d_model ** -0.5),
                              name='relpos_bias')


class EncoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None

  @nn.compact
  def __call__(self, x, bias, routes=None):
    cfg, det, ad = self.config, self.deterministic, self.adapters
    dropout = nn.Dropout(cfg.dropout_rate)
    h = _norm(cfg, 'pre_attention_layer_norm')(x)
    h = _attention(cfg, self.kernels, 'attention', ad, 'encoder')(
        h, h, bias, deterministic=det, routes_q=routes, routes_kv=routes)
    x = x + dropout(h, deterministic=det)
    h = _norm(cfg, 'pre_mlp_layer_norm')(x)
    h = _mlp(cfg, self.kernels, ad, 'encoder')(h, deterministic=det, routes=routes)
    x = x + dropout(h, deterministic=det)
    return constrain(x, ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True
  decode: bool = False
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None

  @nn.compact
  def __call__(self, x, encoded, self_bias, cross_bias, decode_position, routes=None,
               encoder_routes=None):
    cfg, det, ad = self.config, self.deterministic, self.adapters
    dropout = nn.Dropout(cfg.dropout_rate)
    h = _norm(cfg, 'pre_self_attention_layer_norm')(x)
    h = _attention(cfg, self.kernels, 'self_attention', ad, 'decoder')(
        h, h, self_bias, deterministic=det, decode=self.decode, decode_position=decode_position,
        rows_per_input=x.shape[0] // encoded.shape[0], routes_q=routes, routes_kv=routes)
    x = x + dropout(h, deterministic=det)
    h = _norm(cfg, 'pre_cross_attention_layer_norm')(x)
    h = _attention(cfg, self.kernels, 'encoder_decoder_attention', ad, 'decoder', cross=True)(
        h, encoded, cross_bias, deterministic=det, decode=self.decode, routes_q=routes,
        routes_kv=encoder_routes)
    x = x + dropout(h, deterministic=det)
    h = _norm(cfg, 'pre_mlp_layer_norm')(x)
    h = _mlp(cfg, self.kernels, ad, 'decoder')(h, deterministic=det, routes=routes)
    x = x + dropout(h, deterministic=det)
    return constrain(x, ('batch', 'length', 'embed'))


def _own_history_bias(slot_history: Any, position: jax.Array, length: int) -> jax.Array:
  """Self-attention mask of a decode step over the n rows' shared cache [B, H, L * n, K].

  `slot_history` [B, n, L]: for row r of an input and each earlier position t, the slot
  whose cache holds the key/value of r's token t. Each step writes its own slot at
  `position` (so a row without beam reordering only ever sees itself); beam search
  reorders the rows of this table with their beams. Returns a bias [B, 1, n, L * n] that
  lets row r see exactly cache entry (t, slot_history[r, t]) for t <= position.
  """
  batch, n, _ = slot_history.value.shape
  slots = jnp.arange(n, dtype=jnp.int32)
  history = jax.lax.dynamic_update_slice(
      slot_history.value, jnp.broadcast_to(slots[None, :, None], (batch, n, 1)), (0, 0, position))
  slot_history.value = history
  visible = ((history[:, :, :, None] == slots[None, None, None, :])
             & (jnp.arange(length) <= position)[:, None])  # [B, row, t, slot]
  return mask_to_bias(visible.reshape(batch, 1, n, length * n))


def _maybe_remat(cls, cfg: T5Config):
  return nn.remat(cls) if cfg.remat else cls


def _indices(tokens):
  return jnp.arange(tokens.shape[-1])[None, :]


def _segment_mask(q_segments, k_segments):
  return q_segments[:, None, :, None] == k_segments[:, None, None, :]


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: Embed
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None

  def _embed(self, tokens):
    """Token embeddings; with prompt tuning, id -(k+1) is soft prompt token k (the data
    pipeline prepends -1..-n to every example: see `pipeline.PipelineConfig.prompt_length`)."""
    n = self.adapters.prompt_length if self.adapters is not None else 0
    if not n:
      return self.shared_embedding(tokens)
    cfg = self.config
    prompt = layers._param(self, 'prompt_embedding', layers.normal(1.0), (n, cfg.d_model),
                           ('prompt', 'embed'), cfg.parameter_dtype)
    soft = jnp.take(prompt.astype(cfg.activation_dtype), jnp.clip(-tokens - 1, 0, n - 1), axis=0)
    return jnp.where((tokens < 0)[..., None], soft,
                     self.shared_embedding(jnp.maximum(tokens, 0)))

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, *, deterministic=True,
               routes=None):
    cfg = self.config
    x = nn.Dropout(cfg.dropout_rate)(self._embed(tokens), deterministic=deterministic)
    x = constrain(x, ('batch', 'length', 'embed'))
    del positions  # see the module docstring
    bias = _relpos(cfg, bidirectional=True)(_indices(tokens), _indices(tokens))
    mask = (tokens != 0)[:, None, None, :]   # negative ids: soft prompt tokens
    if segment_ids is not None:
      mask = mask & _segment_mask(segment_ids, segment_ids)
    bias = bias + mask_to_bias(mask)
    layer_cls = _maybe_remat(EncoderLayer, cfg)
    for i in range(cfg.num_encoder_layers):
      x = layer_cls(cfg, deterministic, kernels=self.kernels, adapters=self.adapters,
                    name=f'layers_{i}')(x, bias, routes)
    x = _norm(cfg, 'encoder_norm')(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: Embed
  kernels: kernels_lib.Kernels = kernels_lib.PLAIN
  adapters: Any = None

  @nn.compact
  def __call__(self, encoded, encoder_tokens, tokens, encoder_segment_ids=None,
               segment_ids=None, positions=None, *, deterministic=True, decode=False,
               routes=None, encoder_routes=None):
    del positions  # see the module docstring
    cfg = self.config
    x = nn.Dropout(cfg.dropout_rate)(self.shared_embedding(tokens), deterministic=deterministic)
    x = constrain(x, ('batch', 'length', 'embed'))
    relpos = _relpos(cfg, bidirectional=False)
    cross_mask = (encoder_tokens != 0)[:, None, None, :]
    decode_position = None
    inputs, rows_per_input = encoded.shape[0], tokens.shape[0] // encoded.shape[0]
    if decode and self.has_variable('cache', 'position'):
      # One new token at `position`, attending to the cached keys 0..position.
      position = self.variable('cache', 'position', jnp.zeros, (), jnp.int32)
      key_positions = self.variable('cache', 'key_positions', jnp.arange, 0).value[None, :]
      decode_position = position.value
      self_bias = _own_history_bias(self.variable('cache', 'slot_history'),
                                    decode_position, key_positions.shape[1])
      rel = relpos(decode_position[None, None], key_positions)  # [1, H, 1, L]
      self_bias = jnp.repeat(rel, rows_per_input, axis=3) + self_bias
      position.value = decode_position + 1
    else:
      if decode:  # cache creation: the dummy input's length is max_decode_length
        self.variable('cache', 'position', jnp.zeros, (), jnp.int32)
        self.variable('cache', 'key_positions', jnp.arange, tokens.shape[1], dtype=jnp.int32)
        self.variable('cache', 'slot_history', jnp.zeros,
                      (inputs, rows_per_input, tokens.shape[1]), jnp.int32)
      idx = jnp.arange(tokens.shape[1])
      mask = (idx[:, None] >= idx[None, :])[None, None]
      if segment_ids is not None:
        mask = mask & _segment_mask(segment_ids, segment_ids)
        cross_mask = cross_mask & _segment_mask(segment_ids, encoder_segment_ids)
      self_bias = relpos(_indices(tokens), _indices(tokens)) + mask_to_bias(mask)
    cross_bias = mask_to_bias(cross_mask)

    layer_cls = _maybe_remat(DecoderLayer, cfg)
    for i in range(cfg.num_decoder_layers):
      x = layer_cls(cfg, deterministic, decode, kernels=self.kernels, adapters=self.adapters,
                    name=f'layers_{i}')(x, encoded, self_bias, cross_bias, decode_position,
                                        routes, encoder_routes)
    x = _norm(cfg, 'decoder_norm')(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)

    if cfg.scale_decoder_outputs:
      x = x * (cfg.d_model ** -0.5)
    if cfg.tie_word_embeddings:
      logits = self.shared_embedding.attend(x)
    else:
      w = layers._param(self, 'logits_dense', layers.normal(cfg.d_model ** -0.5),
                        (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg.parameter_dtype)
      logits = layers.dense(x, w.astype(cfg.activation_dtype), self.kernels)
    return constrain(logits, ('batch', 'length', 'vocab')).astype(jnp.float32)


class Transformer(nn.Module):
  """T5 encoder-decoder. `__call__` takes the batch features of DESIGN.md and returns
  float32 logits [batch, target_length, vocab].

  `kernels`: the platform's kernels (`t5x_lite.kernels.for_mesh(mesh)`); None = those of
  the default devices. Both paths compute the same function."""
  config: T5Config
  kernels: kernels_lib.Kernels | None = None
  adapters: Any = None   # peft.AdapterSpec: LoRA banks / soft prompt beside the base

  @property
  def ops(self) -> kernels_lib.Kernels:
    """The kernels this model runs (decoding and the loss use the same)."""
    return self.kernels or kernels_lib.default()

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.activation_dtype,
                                param_dtype=cfg.parameter_dtype, kernels=self.ops,
                                name='token_embedder')
    self.encoder = Encoder(cfg, self.token_embedder, self.ops, self.adapters)
    self.decoder = Decoder(cfg, self.token_embedder, self.ops, self.adapters)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
             enable_dropout=False, encoder_routes=None):
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        deterministic=not enable_dropout, routes=encoder_routes)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
             enable_dropout=False, decode=False, routes=None, encoder_routes=None):
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                        decoder_segment_ids, decoder_positions,
                        deterministic=not enable_dropout, decode=decode, routes=routes,
                        encoder_routes=encoder_routes)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None,
               enable_dropout=False, decoder_task_ids=None, **unused_features):
    """`decoder_task_ids` (-1 on padding) route per-task/group adapters: a task id is its
    slot (adapters.tasks = the mixture's tasks); without them, params routed to one task."""
    del unused_features  # decoder_target_tokens, loss weights: used by the loss only
    routes = encoder_routes = None
    if self.adapters is not None and self.adapters.per_task and decoder_task_ids is not None:
      enc_ids = lora.task_ids_of_encoder(encoder_input_tokens, encoder_segment_ids,
                                    decoder_segment_ids, decoder_task_ids)
      routes, encoder_routes = (lora.adapter_routes(self.adapters, ids)
                                for ids in (decoder_task_ids, enc_ids))
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout, encoder_routes)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions, enable_dropout,
                       routes=routes, encoder_routes=encoder_routes)
