"""The decoder-only family's activation bytes for `plan`: what autodiff keeps for the
backward pass, per device, following `decoder_only.py` (notation as t5_memory.py's).

B rows per device, T tokens (inputs + targets), D hidden, H/G query/kv heads, K head_dim,
F mlp, V vocab, a the activation dtype's bytes, m = 1 with dropout else 0:

  layer   = (3a + 2m) BTD (residual stream, two norm outputs) + aBT(2HK + 2GK) (q, k, v,
            context) + (4 + m) BHT^2 (fp32 probabilities) + (3a + m) BTF (gate, up, product)
  shared  = 4BT^2 (the fp32 mask) + 8BTK (RoPE tables)
  output  = 8BTV (fp32 logits and the loss's softmax) + aBTD (final norm)
  working = max(4BTV, layer)

Tensor-sharded axes (heads, joined_kv_heads, mlp, vocab) divide their terms.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5x_lite import partitioning
from t5x_lite.models.decoder_only_config import DecoderOnlyConfig
from t5x_lite.models.interface import ActivationBytes, LayerStack


def activation_bytes(c: DecoderOnlyConfig, batch_size: int, feature_lengths: Mapping[str, int],
                     axis_sizes: Mapping[str, int], rules) -> ActivationBytes:
  b = batch_size
  t = feature_lengths.get('targets', 0) + feature_lengths.get('inputs', 0)
  a = np.dtype(c.activation_dtype).itemsize
  m = 1 if c.dropout_rate > 0 else 0
  rules = partitioning.rules_for(rules)

  def split(axis: str) -> int:
    mesh = dict(rules).get(axis)
    names = mesh if isinstance(mesh, (tuple, list)) else ((mesh,) if mesh else ())
    return int(np.prod([axis_sizes.get(x, 1) for x in names])) if names else 1

  rows = max(1, b // split('batch'))
  h = c.num_heads // max(1, min(split('heads'), c.num_heads))
  g = max(1, c.num_kv_heads // max(1, min(split('joined_kv_heads'), c.num_kv_heads)))
  f = c.intermediate_size // split('mlp')
  v = c.vocab_size // split('vocab')
  d, k = c.hidden_size, c.head_dim
  attention = a * rows * t * (2 * h * k + 2 * g * k) + (4 + m) * rows * h * t * t
  mlp = (3 * a + m) * rows * t * f
  layer = (3 * a + 2 * m) * rows * t * d + attention + mlp
  stack = LayerStack('decoder', c.num_layers, layer, a * rows * t * d)
  shared = 4 * rows * t * t + 8 * rows * t * k
  output = 8 * rows * t * v + a * rows * t * d
  return ActivationBytes((stack,), shared, output, max(4 * rows * t * v, layer), rows)
