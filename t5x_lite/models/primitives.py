"""The two primitives every layer is built from: a parameter with logical axes, and a 2-D
matmul on the platform's kernel. A leaf of models/: layers.py and lora.py both build on it
(and lora.py's adapted projections are used by layers.py, so neither imports the other back).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from t5x_lite import kernels as kernels_lib

Dtype = Any


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
