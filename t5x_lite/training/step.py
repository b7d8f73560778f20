"""The train step: mixture-of-tasks loss, gradient (optionally accumulated over microbatches),
NaN/Inf guard, optimizer update. Compiled once with `jax.jit` over the mesh.

The guard has two halves. A non-finite loss or gradient norm skips the update (params and
optimizer state stay as they were; `bad_streak` counts such steps). A finite gradient can still
give a non-finite update (a learning rate of 1e30): the step reports `state_finite`, one
all-finite reduction over the new params and optimizer state, and the loop stops the run
before anything non-finite is saved (`guard.py`). That update is not rolled back: it ran in
place on the donated state buffers, and undoing it would need a second copy of the whole
state (or a select over old and new, ~0.3 s of a 4 s flan-t5-small CPU step), paid on every
step for a state that is already useless; the run resumes instead from its last checkpoint
with a lower learning rate. (optax.apply_if_finite, the nearest reference, checks the incoming
gradients the same way, then gives up after `max_consecutive_errors` and applies the
non-finite update; here the run stops instead.)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from t5x_lite import partitioning, validation
from t5x_lite.models import Model
from t5x_lite.peft import params as peft_params
from t5x_lite.training import guard, losses
from t5x_lite.training.state import StateLayout, TrainState

@dataclasses.dataclass(frozen=True)
class LossConfig:
  """T5X's loss options: z-loss, label smoothing and how the summed loss is normalised."""
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  normalization: str = 'per_real_token'   # per_real_token | per_total_token | per_sequence | constant
  constant: float | None = None

  def __post_init__(self):
    validation.check(self, {'z_loss': '>= 0', 'label_smoothing': '[0, 1)',
                            'normalization': losses.NORMALIZATIONS, 'constant': '> 0'})
    if self.normalization == 'constant' and self.constant is None:
      raise validation.ConfigError("step.LossConfig.normalization='constant' needs "
                                   'step.LossConfig.constant (the number to divide the loss by).')


def _microbatches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...], microbatch j = rows j, j+k, ...: every device keeps feeding
  every microbatch from its own rows (a contiguous split would idle most devices)."""
  return {name: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
          for name, x in batch.items()}


def make_train_step(model: Model, optimizer: optax.GradientTransformation,
                    task_loss_weights: np.ndarray, loss_config: LossConfig = LossConfig(),
                    microbatches: int = 1,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    priority: tuple[np.ndarray, np.ndarray] | None = None):
  """Returns `train_step(state, batch, rng, frozen, task_loss_weights) -> (state, metrics)`
  (not yet jitted). λ is `task_loss_weights` when the call passes none (a schedule passes
  each step's); `priority` (Mixture.priority_groups: group per task, floors) then raises
  the λ of prioritised groups for the batch (losses.prioritized_loss_weights).

  `metrics` holds scalars (loss, grad_norm, learning_rate, finite, bad_streak, state_finite:
  whether every new parameter and optimizer-state value is finite), the per-task sums of
  `losses.mixture_loss` (loss_sum, z_loss_sum, correct, tokens) and the λ applied
  (loss_weights, [num_tasks]).
  """
  default_weights = np.asarray(task_loss_weights, np.float32)

  def loss_fn(params, frozen, batch, normalizer, rng, weights):
    # Only `params` (the trainable leaves) is differentiated: a frozen base has no gradient.
    logits = model.logits(peft_params.combine(params, frozen), batch, enable_dropout=True,
                          rngs={'dropout': rng})
    return losses.mixture_loss(
        logits, batch, weights, z_loss=loss_config.z_loss,
        label_smoothing=loss_config.label_smoothing,
        normalization=loss_config.normalization, constant=loss_config.constant,
        normalizer_value=normalizer, kernels=model.ops)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict, rng: jax.Array, frozen=None,
                 task_loss_weights=None):
    frozen = {} if frozen is None else frozen
    weights = jnp.asarray(default_weights if task_loss_weights is None else task_loss_weights,
                          jnp.float32)
    if priority is not None:   # from the whole batch, like the normaliser
      weights = losses.prioritized_loss_weights(weights, batch, priority[0], priority[1],
                                                loss_config.normalization)
    # The normaliser of the whole batch: microbatch losses then add up to the full loss.
    normalizer = losses.normalizer(batch, loss_config.normalization, loss_config.constant)
    step_rng = jax.random.fold_in(rng, state.step)
    if microbatches == 1:
      (loss, aux), grads = grad_fn(state.params, frozen, batch, normalizer, step_rng, weights)
    else:
      micro = _microbatches(batch, microbatches)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
          grad_fn, state.params, frozen, jax.tree.map(lambda x: x[0], micro), normalizer,
          step_rng, weights))

      def accumulate(total, inputs):
        index, microbatch = inputs
        out = grad_fn(state.params, frozen, microbatch, normalizer,
                      jax.random.fold_in(step_rng, index), weights)
        return jax.tree.map(jnp.add, total, out), None
      ((loss, aux), grads), _ = jax.lax.scan(accumulate, zeros,
                                             (jnp.arange(microbatches), micro))
      aux = dict(aux, normalizer=normalizer)  # the only entry of aux that is not a sum
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return params, opt_state, guard.all_finite((params, opt_state))

    def skip(params, opt_state):
      return params, opt_state, guard.all_finite((params, opt_state))

    # A skipped (non-finite) step leaves params and optimizer state as they were. A `cond`
    # rather than a `where` per leaf: the update then runs in place on the donated buffers
    # (a select reads old and new state: ~0.3 s of a 4 s flan-t5-small CPU step). The finite
    # check of the new state reads it once and copies nothing (guard.all_finite).
    params, opt_state, state_finite = jax.lax.cond(finite, update, skip, state.params,
                                                   state.opt_state)
    # The schedule sees the updates applied so far (optax counts only the updates it ran):
    # this step's rate, which a skipped step leaves for the next update.
    applied = state.step - state.skipped_steps
    state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        bad_streak=jnp.where(finite, 0, state.bad_streak + 1))
    # bad_streak also in metrics: the loop reads it after `state`'s buffers were donated.
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, finite=finite,
                   bad_streak=state.bad_streak, state_finite=state_finite, loss_weights=weights)
    if learning_rate_fn is not None:
      metrics['learning_rate'] = learning_rate_fn(applied)
    return state, metrics

  train_step.task_loss_weights = default_weights
  return train_step


def jit_train_step(train_step, layout: StateLayout, mesh: jax.sharding.Mesh, rules):
  """jit with the state's shardings in and out (donated), batch split over data x fsdp,
  metrics replicated. Tracing happens under the mesh and the logical-axis rules so the
  model's activation constraints apply."""
  replicated = NamedSharding(mesh, P())
  frozen = jax.tree.map(lambda x: x.sharding, layout.frozen) if layout.frozen else {}
  jitted = jax.jit(train_step,
                   in_shardings=(layout.shardings, partitioning.batch_sharding(mesh), replicated,
                                 frozen, replicated),
                   out_shardings=(layout.shardings, replicated), donate_argnums=(0,))
  default_weights = getattr(train_step, 'task_loss_weights', None)

  def run(state, batch, rng, frozen=None, task_loss_weights=None):
    """`frozen`: an adapter run's base (never donated: the same buffers every step);
    `task_loss_weights`: this step's λ (default: the step's own)."""
    weights = default_weights if task_loss_weights is None else task_loss_weights
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch, rng, {} if frozen is None else frozen,
                    np.asarray(weights, np.float32))
  run.jitted = jitted
  run.task_loss_weights = default_weights   # the 5th argument of `jitted` (λ)
  return run
