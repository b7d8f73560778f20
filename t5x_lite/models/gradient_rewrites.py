"""Two ops of the relative position bias whose default gradients XLA runs badly, with the
same gradients computed another way. Timed in a flan-t5-small fp32 train step on a 2-core
CPU, where together they cost ~60 ms (2-3%) before.

`broadcast_batch`: the bias, computed once as [1, H, Q, K], is broadcast to the mask's
[B, H, Q, K]. Its gradient sums that short leading axis of a large array; XLA:CPU hands such
a reduce to YNNPACK, which runs it ~100x slower than a loop: [8, 6, 256, 256] -> [6, 256,
256] takes 13-18 ms (any spelling: jnp.sum, lax.reduce, a transpose then a last-axis sum),
B - 1 pairwise adds of slices 0.11 ms, which XLA fuses into one loop. On other backends the
plain reduce is right, and slices of a batch-sharded array would move data between devices.

`take_buckets`: the bias is a gather from the [H, num_buckets] table at the bucket of every
(query, key) pair. The gather's gradient, a scatter-add, is laid out by XLA as [Q * K, H]:
a transposing copy of the [H, Q, K] gradient that XLA:CPU fuses with the sum over layers and
batch into a strided loop, ~50 ms for [8 layers x 8 rows, 6, 256, 256]. As a matmul with the
buckets' one-hot ([H, Q * K] @ [Q * K, num_buckets]) it takes ~5 ms. The one-hot costs
Q * K * num_buckets floats, so beyond `MAX_ONE_HOT` elements (32 MB; a 512 x 512 bias with 32
buckets) the scatter-add is kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MAX_ONE_HOT = 2 ** 23


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_batch(x: jax.Array, batch: int) -> jax.Array:
  """x [1, ...] -> [batch, ...]."""
  return jnp.broadcast_to(x, (batch,) + x.shape[1:])


def _broadcast_fwd(x, batch):
  return broadcast_batch(x, batch), None


def _broadcast_bwd(batch, _, g):
  if jax.default_backend() != 'cpu':
    return (jnp.sum(g, axis=0, keepdims=True),)
  parts = [g[i:i + 1] for i in range(batch)]
  while len(parts) > 1:  # pairwise: rounding error grows with log2(batch), as in a reduce
    parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i]
             for i in range(0, len(parts), 2)]
  return (parts[0],)


broadcast_batch.defvjp(_broadcast_fwd, _broadcast_bwd)


@jax.custom_vjp
def take_buckets(table: jax.Array, buckets: jax.Array) -> jax.Array:
  """table [H, num_buckets] at int `buckets` [...] -> [H, ...] (jnp.take along axis 1)."""
  return jnp.take(table, buckets, axis=1)


def _take_fwd(table, buckets):
  return take_buckets(table, buckets), (table, buckets)


def _take_bwd(residuals, g):
  table, buckets = residuals
  num_buckets = table.shape[1]
  if buckets.size * num_buckets > MAX_ONE_HOT:
    _, scatter = jax.vjp(lambda t: jnp.take(t, buckets, axis=1), table)
    return scatter(g)[0], None
  g = g.reshape(g.shape[0], -1)
  one_hot = (buckets.reshape(-1, 1) == jnp.arange(num_buckets)).astype(g.dtype)
  return jnp.matmul(g, one_hot, preferred_element_type=jnp.float32).astype(table.dtype), None


take_buckets.defvjp(_take_fwd, _take_bwd)
