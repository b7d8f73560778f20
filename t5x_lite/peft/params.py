"""Trainable vs frozen parameters of an adapter run, routing to one task, the base's identity.

The train step differentiates the trainable tree only (`split`): a frozen parameter gets no
gradient buffer and no optimizer state, which is what lets an xxl LoRA run fit where a full
fine-tune does not (optax.multi_transform with `set_to_zero` would still materialise every
gradient). The frozen base is passed to the step beside the state, never donated, never
checkpointed; a checkpoint records the base's identity instead (`base_identity`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5x_lite.peft.spec import ATTENTION, MLP, AdapterSpec

ROUTED = 'routed'   # the one task of a routed spec
# The kernels LoRA can adapt, in every family's params tree: T5's
# `<stack>/layers_<i>/<attention module>/<projection>`, and the decoder-only family's
# `layers_<i>/{attention,mlp}/<projection>`, whose one stack is 'decoder'.
_PROJECTION = re.compile(
    r'(?:(?P<stack>encoder|decoder)/)?layers_\d+/'
    r'(?:attention|self_attention|encoder_decoder_attention|mlp)/'
    rf'(?P<proj>{"|".join(ATTENTION + MLP)})')
# (soft prompt leaf, token embedding whose rows initialise it), per family's params tree.
PROMPT_EMBEDDERS = (('encoder/prompt_embedding', 'token_embedder/embedding'),   # T5
                    ('prompt_embedding', 'embedding'))                          # decoder-only


def flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/') if tree else {}


def nest(leaves: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict(leaves, sep='/') if leaves else {}


def is_adapter(path: str) -> bool:
  """Leaves that exist only with adapters: LoRA matrices and the soft prompt."""
  name = path.rsplit('/', 1)[-1]
  return '_lora_' in name or name == 'prompt_embedding'


def projection_of(path: str) -> tuple[str, str] | None:
  """(stack, projection) of a kernel LoRA can adapt ('/'-joined path), else None."""
  m = _PROJECTION.fullmatch(path)
  return (m['stack'] or 'decoder', m['proj']) if m else None


def is_trainable(path: str, spec: AdapterSpec | None) -> bool:
  if spec is None:
    return True
  return is_adapter(path) or any(re.search(p, path) for p in spec.train)


def split(params: Any, spec: AdapterSpec | None) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts with the same paths as `params`; no spec: all trainable."""
  if spec is None:
    return params, {}
  leaves = flat(params)
  return (nest({k: v for k, v in leaves.items() if is_trainable(k, spec)}),
          nest({k: v for k, v in leaves.items() if not is_trainable(k, spec)}))


def combine(trainable: Any, frozen: Any) -> Any:
  """The model's whole params tree from its two halves (identity when nothing is frozen)."""
  if not frozen:
    return trainable
  return nest({**flat(frozen), **flat(trainable)})


def check_against_base(spec: AdapterSpec, params: Any) -> None:
  """Every `train` pattern must match a base parameter and every LoRA target a projection
  of the model (e.g. 'wi_0' exists only in gated models): a typo would train nothing."""
  from t5x_lite import validation  # pylint: disable=import-outside-toplevel
  paths = [k for k in flat(params) if not is_adapter(k)]
  for pattern in spec.train:
    if not any(re.search(pattern, k) for k in paths):
      raise validation.ConfigError(
          f'peft train pattern {pattern!r} matches no base parameter; examples of paths: '
          f'{", ".join(paths[:4])} (regular expressions, searched anywhere in the path).')
  lora = spec.lora
  projections = [p for p in map(projection_of, paths) if p is not None]
  for target in (lora.targets if lora else ()):
    if not any(dataclasses.replace(lora, targets=(target,)).adapts(stack, proj)
               for stack, proj in projections):
      names = sorted({proj for _, proj in projections})
      raise validation.ConfigError(
          f'peft LoRA target {target!r} is no projection of this model in '
          f'{" or ".join(lora.stacks)}; its projections: {", ".join(names)}.')


def init_prompt(params: dict, spec: AdapterSpec, rng: jax.Array, vocab_size: int) -> dict:
  """Soft prompt initialised from the embeddings of tokens drawn from the first 5,000 ids
  (Lester et al. 2021's 'sampled vocab' init, their best), traceable."""
  if not spec.prompt_length:
    return params
  leaves = flat(params)
  prompt, embedding = next(((p, e) for p, e in PROMPT_EMBEDDERS
                            if p in leaves and e in leaves), (None, None))
  if prompt is None:
    return params
  ids = jax.random.randint(rng, (spec.prompt_length,), 3, max(4, min(5000, vocab_size)))
  leaves[prompt] = jnp.take(leaves[embedding], ids, axis=0).astype(leaves[prompt].dtype)
  return nest(leaves)


def routed_spec(spec: AdapterSpec) -> AdapterSpec:
  """The spec of a model serving one task: every bank one slot (the same for all tasks, so
  one compiled decoder serves every task; `route` picks each task's slots)."""
  if not spec.per_task:
    return spec
  return dataclasses.replace(spec, tasks=(ROUTED,), groups=((ROUTED, (ROUTED,)),))


def route(params: Any, task: str | None, spec: AdapterSpec) -> Any:
  """`params` (full tree, banks of S slots) -> the routed model's params for `task`: each
  bank reduced to the task's slot, zeros where the task has none (the base alone there)."""
  if not spec.per_task:
    return params
  slots = spec.slots(task)
  out = {}
  for path, leaf in flat(params).items():
    bank = next((b for b in ('task', 'group') if f'_lora_{b}_' in path), None)
    if bank is None:
      out[path] = leaf
    elif slots.get(bank) is None:
      out[path] = jnp.zeros((1,) + leaf.shape[1:], leaf.dtype)
    else:
      out[path] = leaf[slots[bank]:slots[bank] + 1]
  return nest(out)


def base_identity(frozen: Any, source: str) -> dict[str, str]:
  """Where the frozen base came from and a digest of its contents (one checksum per tensor,
  `training.checksums`, hashed together): a resume, eval or export on another base fails
  instead of silently pairing the adapters with the wrong weights."""
  from t5x_lite.training import checksums  # pylint: disable=import-outside-toplevel
  record = checksums.record(frozen) if frozen else {}
  text = json.dumps(record, sort_keys=True, default=str)
  return {'source': source, 'digest': hashlib.sha256(text.encode()).hexdigest()[:16],
          'tensors': str(len(record))}


def count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
