"""The two primitives every layer is built from: a parameter with logical axes, and a 2-D
matmul on the platform's kernel. A leaf of models/: layers.py and lora.py both build on it
(and lora.py's adapted projections are used by layers.py, so neither imports the other back).
"""

from __future__ import annotations

from typing import Any, Callable

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import kernels as kernels_lib

Dtype = Any
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class ConfigDtypes:
  """What every family's frozen config dataclass answers beside its fields: its `dtype` and
  `param_dtype` names as jnp dtypes, and `replace` (a copy with some fields changed)."""

  @property
  def activation_dtype(self):
    return DTYPES[self.dtype]

  @property
  def parameter_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


def param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
          axes: tuple[str, ...], dtype: Dtype) -> jax.Array:
  """`module.param` annotated with its logical axes (DESIGN.md: Parameters)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def dense(x: jax.Array, w: jax.Array, kernels: kernels_lib.Kernels = kernels_lib.PLAIN
          ) -> jax.Array:
  """x [..., D] @ w [D, N] as one 2-D matmul over the flattened leading axes.

  A contraction over several axes (x [B, L, D] straight into `einsum`) makes the weight
  gradient a dot over (B, L), which XLA:CPU lays out by transposing the [B*L, N] gradient
  first: ~8% of a flan-t5-small train step. Flattened, the weight gradient is one
  x^T @ dy, on the platform's matmul kernel (`t5x_lite.kernels`).
  """
  x2 = x.reshape(-1, x.shape[-1])
  y = kernels.matmul(x2, w)
  return y.reshape(x.shape[:-1] + w.shape[1:])
