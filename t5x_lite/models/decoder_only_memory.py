"""The decoder-only family's activation bytes for `plan`: what autodiff keeps for the
backward pass, per device, following `decoder_only.py` (notation as t5_memory.py's).

B rows per device per microbatch, T = inputs + targets (the converter's one sequence per
example), D hidden, H query heads, G key/value heads, K head_dim, F intermediate, V vocab,
a the activation dtype's bytes, m = 1 with dropout (a bool mask per element) else 0,
p = a when dropout is on or a != 4 (the probabilities cast to the activation dtype beside
the fp32 softmax), else 0, n = 1 with Qwen3's q/k norms. A tensor whose logical axis
(heads, joined_kv, joined_kv_heads, mlp, vocab) is sharded by the rules (tensor
parallelism) is divided by that mesh axis.

  attention  = aBT(HK + 2GK) (q and k after RoPE, v) + aBTHK (the context, the output
               projection's input) + n aBT(HK + GK) (q/k before their norms)
               + (4 + p + m) BHT^2 (fp32 probabilities, the probabilities fed to probs @ v,
               dropout mask). Grouped-query attention reads each key/value head for its
               H / G query heads by reshaping the queries: k and v are not repeated.
  mlp        = 3aBTF + mBTF (gate and up projections, the down projection's input: SwiGLU
               and GeGLU alike; dropout mask)
  layer      = 4aBTD (residual stream x2, norm outputs x2) + 2mBTD (the residual dropouts)
               + attention + mlp
  layer input = aBTD: all that `DecoderOnlyConfig.remat` keeps of a layer
  shared     = 4BT^2 (the fp32 additive mask [B, 1, 1, T, T] every layer reads)
               + 8BTK (RoPE's fp32 cos and sin [B, T, 1, K], read by every layer's backward)
  output     = 8BTV (fp32 logits and the loss's softmax) + 2aBTD (the last layer's output
               and the final norm's, the output projection's input)
  working    = max(4BTV (the logits' gradient), layer)
  peak       = shared + output + working + layers (interface.ActivationBytes)

RoPE is linear in q and k, so its backward needs cos and sin but not its input; the norms'
fp32 statistics ([B, T, 1]) and the embedding gather's indices are left out, as t5_memory.py
leaves out what fuses.

Measured against XLA:CPU (`t5x-lite plan --compile`): the growth of its temporaries over the
growth of this estimate from 1 to 8 rows per device (parameters, gradients and the update's
temporaries do not grow with the batch), the tiny presets (D 64, 4 query / 2 key-value heads,
K 16, F 128, V 384, 2 layers), T = 320, 8 devices: Llama 1.43 fp32 (dp; fsdp 1.43, 2-way
tensor parallelism 1.50), 1.47 with dropout 0.1, 1.23 bf16, 1.89 bf16 with dropout; Qwen3
(q/k norms) 1.49; Gemma (GeGLU) 1.43. Wider and shorter (D 256, F 1024, T = 40, 8 -> 64 rows
per device): 1.16 fp32, 1.89 bf16 with dropout. XLA:CPU keeps more than must be kept: a
transposed copy of each layer's probabilities for its matmuls (its buffer assignment has
six [B, H, T, T]-sized fp32 slots for 2 layers where this counts two plus the working layer),
dropout's random bits as u32 made before the forward pass (4 bytes per element, not a 1-byte
mask) and bf16 elementwise work in fp32. tests/training/test_plan.py checks Llama fp32
within 0.75-2.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import numpy as np

from t5x_lite import partitioning
from t5x_lite.models.decoder_only_config import DecoderOnlyConfig
from t5x_lite.models.interface import ActivationBytes, LayerStack


def activation_bytes(c: DecoderOnlyConfig, batch_size: int, feature_lengths: Mapping[str, int],
                     axis_sizes: Mapping[str, int], rules) -> ActivationBytes:
  """The formula of the module docstring for a `DecoderOnlyConfig` and a microbatch of
  `batch_size` rows of `feature_lengths['inputs'] + feature_lengths['targets']` tokens (the
  decoder-only feature converter's `model_lengths`)."""
  t = feature_lengths.get('inputs', 0) + feature_lengths['targets']
  a = np.dtype(c.activation_dtype).itemsize
  m = 1 if c.dropout_rate > 0 else 0
  p = a if (m or a != 4) else 0
  n = 1 if c.qk_norm else 0
  rules = partitioning.rules_for(rules)
  dims = {'batch': batch_size, 'length': t, 'embed': c.hidden_size, 'heads': c.num_heads,
          'joined_kv': c.num_heads * c.head_dim, 'joined_kv_heads': c.num_kv_heads * c.head_dim,
          'kv': c.head_dim, 'mlp': c.intermediate_size, 'vocab': c.vocab_size}

  def size(*axes) -> int:
    """Elements per device of an array with these logical axes (None: unsharded, 1)."""
    names = tuple(x if x not in axes[:i] else None for i, x in enumerate(axes))
    spec = nn.logical_to_mesh_axes(names, rules)
    return partitioning.shard_bytes([dims.get(x, 1) for x in axes], spec, 1, axis_sizes)

  q, kv = size('batch', 'length', 'joined_kv'), size('batch', 'length', 'joined_kv_heads')
  attention = (a * (2 * q + 2 * kv) + n * a * (q + kv)
               + (4 + p + m) * size('batch', 'heads', 'length', 'length'))
  mlp = (3 * a + m) * size('batch', 'length', 'mlp')
  residual = size('batch', 'length', 'embed')
  layer = (4 * a + 2 * m) * residual + attention + mlp
  shared = 4 * size('batch', 'length', 'length') + 8 * size('batch', 'length', 'kv')
  logits = 4 * size('batch', 'length', 'vocab')
  return ActivationBytes(
      stacks=(LayerStack('decoder', c.num_layers, layer, a * residual),),
      shared=shared, output=2 * logits + 2 * a * residual, working=max(logits, layer),
      rows_per_device=-(-batch_size // partitioning.axis_product(partitioning.BATCH_AXES,
                                                                 axis_sizes)))
