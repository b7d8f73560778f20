"""Broadcast over the batch axis whose gradient XLA:CPU sums fast.

The relative position bias is computed once per batch as [1, H, Q, K] and broadcast to the
[B, H, Q, K] of the mask. Its gradient is a sum over that short leading axis of a large
array, and XLA:CPU hands such a reduce to YNNPACK, which runs it ~100x slower than a loop:
[8, 6, 256, 256] -> [6, 256, 256] takes 13-18 ms (any spelling of the reduce: jnp.sum,
lax.reduce, a transpose then a last-axis sum), B - 1 pairwise adds of slices 0.11 ms, which
XLA fuses into one loop. On other backends the plain reduce is right, and slices of a
batch-sharded array would move data between devices, so they keep it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_batch(x: jax.Array, batch: int) -> jax.Array:
  """x [1, ...] -> [batch, ...]."""
  return jnp.broadcast_to(x, (batch,) + x.shape[1:])


def _fwd(x, batch):
  return broadcast_batch(x, batch), None


def _bwd(batch, _, g):
  if jax.default_backend() != 'cpu':
    return (jnp.sum(g, axis=0, keepdims=True),)
  parts = [g[i:i + 1] for i in range(batch)]
  while len(parts) > 1:  # pairwise: rounding error grows with log2(batch), as in a reduce
    parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i]
             for i in range(0, len(parts), 2)]
  return (parts[0],)


broadcast_batch.defvjp(_fwd, _bwd)
