"""T5's activation bytes for `plan`: what autodiff keeps for the backward pass, per device,
following `t5.py` and `layers.py`.

Notation: B rows per device per microbatch (global batch / microbatches / (data x fsdp)),
L and T the input and target lengths, D d_model, H heads, K d_kv, F d_ff, V vocab, a the
activation dtype's bytes, m = 1 with dropout (a bool mask per element) else 0, p = a when
dropout is on or a != 4 (probabilities kept in the activation dtype beside fp32), else 0,
g = 1 for a gated MLP. A tensor whose logical axis (heads, mlp, vocab) is sharded by the
rules (tensor parallelism) is divided by that mesh axis.

  attention(Q, S)  = 2aBQHK (q, context) + 2aBSHK (k, v) + (4 + p + m) BHQS (probs fp32,
                     the probs fed to probs @ v, dropout mask)
  mlp(N)           = (2 + g) aBNF + mBNF (wi outputs, the wo input, dropout mask)
  encoder layer    = 4aBLD (residual stream x2, norm outputs x2) + 2mBLD + attention(L, L)
                     + mlp(L)
  decoder layer    = 6aBTD + 3mBTD + attention(T, T) + attention(T, L) + mlp(T)
  layer input      = aBLD / aBTD: all that `T5Config.remat` keeps of a layer
  shared           = 4BHL^2 + 4BHT^2 + 4BTL (the fp32 bias+mask arrays every layer reads)
                     + (2a + m) BLD (encoder output before/after its final norm)
  output           = 8BTV (fp32 logits and the loss's softmax) + (2a + m) BTD (final norm)
  working          = max(4BTV (the logits' gradient), the largest layer): live at the start
                     of the backward pass
  peak             = shared + output + working + sum over layers of (layer, or layer input
                     plus one layer recomputed when remat is on)  (interface.ActivationBytes)

This is what a compiler must keep once elementwise chains fuse (the norm's rsqrt, scalar
broadcasts and the like are left out). XLA:CPU (`t5x-lite plan --compile`) keeps more: with
the batch its temporaries grow 1.1-1.7x as fast as this estimate (flan-t5 tiny, 256/64,
1 -> 8 rows per device, dp/fsdp, fp32/bf16, dropout on/off), and it schedules remat's
recomputation early (loss gradient of flan-t5-small, batch 16, 256/64: 3.99 GiB of
temporaries without remat, 3.86 GiB with).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import numpy as np

from t5x_lite import partitioning
from t5x_lite.models import layers
from t5x_lite.models.interface import ActivationBytes, LayerStack


def activation_bytes(cfg, batch_size: int, feature_lengths: Mapping[str, int],
                     axis_sizes: Mapping[str, int], rules) -> ActivationBytes:
  """The formula of the module docstring for a `T5Config` and a microbatch of `batch_size`."""
  b = batch_size
  length, targets = feature_lengths['inputs'], feature_lengths['targets']
  a = np.dtype(cfg.activation_dtype).itemsize
  m = 1 if cfg.dropout_rate > 0 else 0
  p = a if (m or a != 4) else 0
  g = 1 if layers.parse_feed_forward_proj(cfg.feed_forward_proj)[1] else 0
  dims = {'batch': b, 'heads': cfg.num_heads, 'kv': cfg.d_kv, 'embed': cfg.d_model,
          'mlp': cfg.d_ff, 'vocab': cfg.vocab_size}

  def size(*axes) -> int:
    """Elements per device of an array with these logical axes ('L'/'T' = the lengths)."""
    names = tuple({'L': 'length', 'T': 'length'}.get(x, x) for x in axes)
    names = tuple(n if n not in names[:i] else None for i, n in enumerate(names))
    spec = nn.logical_to_mesh_axes(names, rules)
    shape = [{'L': length, 'T': targets}.get(x, dims.get(x, 1)) for x in axes]
    return partitioning.shard_bytes(shape, spec, 1, axis_sizes)

  def attention(q, s):
    return (2 * a * size('batch', q, 'heads', 'kv') + 2 * a * size('batch', s, 'heads', 'kv')
            + (4 + p + m) * size('batch', 'heads', q, s))

  def mlp(n):
    return (2 + g) * a * size('batch', n, 'mlp') + m * size('batch', n, 'mlp')

  encoder_layer = (4 * a + 2 * m) * size('batch', 'L', 'embed') + attention('L', 'L') + mlp('L')
  decoder_layer = ((6 * a + 3 * m) * size('batch', 'T', 'embed') + attention('T', 'T')
                   + attention('T', 'L') + mlp('T'))
  shared = (4 * size('batch', 'heads', 'L', 'L') + 4 * size('batch', 'heads', 'T', 'T')
            + 4 * size('batch', None, 'T', 'L') + (2 * a + m) * size('batch', 'L', 'embed'))
  logits = 4 * size('batch', 'T', 'vocab')
  output = 2 * logits + (2 * a + m) * size('batch', 'T', 'embed')
  return ActivationBytes(
      stacks=(LayerStack('encoder', cfg.num_encoder_layers, encoder_layer,
                         a * size('batch', 'L', 'embed')),
              LayerStack('decoder', cfg.num_decoder_layers, decoder_layer,
                         a * size('batch', 'T', 'embed'))),
      shared=shared, output=output, working=max(logits, encoder_layer, decoder_layer),
      rows_per_device=-(-b // partitioning.axis_product(partitioning.BATCH_AXES, axis_sizes)))
