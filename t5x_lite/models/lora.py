"""LoRA on a projection, with banks of per-task or per-group adapters routed per token.

y = x W + (alpha / r) * dropout(x) A[s] B[s] (Hu et al. 2021, peft's `LoraLayer` scaling),
B zero at init so step 0 is exactly the base model. A bank holds S slots ([S, d_in, r] and
[S, r, d_out]): 'shared' has one, 'task'/'group' one per task/group. A token uses the slot
its `routes` id names (-1: none, e.g. padding or a task with no adapter), so a packed row
mixing tasks gives every segment its own task's adapter. All S slots are computed as one
matmul with x [N, d_in] @ A [d_in, S*r] and the other slots' columns zeroed: S*r is small
(8 tasks x r 8 = 64 columns beside a 512 x 512 projection), and there is no gather.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import kernels as kernels_lib
from t5x_lite.models import primitives


def adapted_dense(module: nn.Module, name: str, x: jax.Array, w: jax.Array,
                  axes: tuple[str, str], adapters: Any, stack: str,
                  routes: Mapping[str, jax.Array] | None, deterministic: bool,
                  kernels: kernels_lib.Kernels, param_dtype: Any = None) -> jax.Array:
  """`primitives.dense(x, w)` plus the LoRA banks of `adapters` (a `peft.AdapterSpec`) that
  target projection `name` in `stack`. `axes`: w's logical axes, which the adapter's
  matrices take on their d_in / d_out dimensions (so they shard with the mesh rules).
  `param_dtype`: the adapters' (default `module.param_dtype`)."""
  dtype = x.dtype
  y = primitives.dense(x, w.astype(dtype), kernels)
  lora = adapters.lora if adapters is not None else None
  if lora is None or not lora.adapts(stack, name):
    return y
  d_in, d_out = w.shape
  param_dtype = module.param_dtype if param_dtype is None else param_dtype
  h_in = nn.Dropout(lora.dropout, name=f'{name}_lora_dropout')(x, deterministic=deterministic)
  for bank in lora.banks:
    slots = adapters.bank_size(bank)
    a = primitives.param(module, f'{name}_lora_{bank}_a', nn.initializers.variance_scaling(
        1.0 / 3.0, 'fan_in', 'uniform', in_axis=1, out_axis=2, batch_axis=(0,)),  # torch's kaiming_uniform(a=sqrt 5)
        (slots, d_in, lora.rank), ('adapters', axes[0], 'lora_rank'), param_dtype)
    b = primitives.param(module, f'{name}_lora_{bank}_b', nn.initializers.zeros,
                         (slots, lora.rank, d_out), ('adapters', 'lora_rank', axes[1]),
                         param_dtype)
    a_cat = jnp.swapaxes(a, 0, 1).reshape(d_in, slots * lora.rank).astype(dtype)
    h = primitives.dense(h_in, a_cat, kernels)                          # [..., S*r]
    ids = None if bank == 'shared' or routes is None else routes[bank]
    if ids is None and slots > 1:
      raise ValueError(  # internal
          f'LoRA bank {bank!r} has {slots} slots: the model needs per-token task ids (or '
          'params routed to one task: peft.params.route)')
    if ids is not None:
      ids = jnp.broadcast_to(ids, h.shape[:-1])
      mask = jnp.repeat(jax.nn.one_hot(ids, slots, dtype=dtype), lora.rank, axis=-1)
      h = h * mask
    y = y + primitives.dense(h, b.reshape(slots * lora.rank, d_out).astype(dtype),
                             kernels) * jnp.asarray(lora.scale, dtype)
  return y


def task_ids_of_encoder(encoder_tokens, encoder_segment_ids, decoder_segment_ids,
                        decoder_task_ids):
  """Each encoder token's task id: that of the decoder tokens of its segment (-1 on padding).
  Unpacked rows (no segment ids) hold one example: its task is the row's."""
  if encoder_segment_ids is None or decoder_segment_ids is None:
    row = jnp.max(decoder_task_ids, axis=-1, keepdims=True)
    return jnp.where(encoder_tokens != 0, row, -1)
  same = ((encoder_segment_ids[:, :, None] == decoder_segment_ids[:, None, :])
          & (decoder_segment_ids[:, None, :] > 0))
  ids = jnp.max(jnp.where(same, decoder_task_ids[:, None, :], -1), axis=-1)
  return jnp.where(encoder_segment_ids > 0, ids, -1)


def adapter_routes(adapters: Any, task_ids: jax.Array) -> dict[str, jax.Array]:
  """Bank -> slot of every token: a task id is its task slot; its group slot comes from
  the spec's static table (-1: no adapter in that bank)."""
  table = [adapters.slots(t).get('group') for t in adapters.tasks]
  group_of = jnp.asarray([-1 if g is None else g for g in table] or [-1], jnp.int32)
  groups = jnp.where(task_ids >= 0, group_of[jnp.clip(task_ids, 0, len(group_of) - 1)], -1)
  return {'task': task_ids, 'group': groups}
