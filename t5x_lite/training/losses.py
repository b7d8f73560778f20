"""T5X's training objective, extended to a weighted mixture of tasks.

The objective is L = sum_i lambda_i * L_i, where L_i sums the (weighted) token losses of
task i's tokens and divides by ONE normalizer shared by all tasks. With every lambda = 1
this is exactly T5X's `compute_weighted_cross_entropy` with its `loss_normalizing_factor`.

The normalizer is computed apart from the losses (`normalizer`) so that gradient
accumulation can compute it once on the full batch and pass it to every microbatch: then
the microbatch losses add up to the full-batch loss. For the same reason the metrics come
back as SUMS (`aux`), which microbatches add up (`accumulate_aux`) before `summarize`
divides them.

Everything here is pure jnp with static shapes, so it runs under jit.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import kernels as kernels_lib, validation

NORMALIZATIONS = ('per_real_token', 'per_total_token', 'per_sequence', 'constant')

Batch = Mapping[str, jax.Array]


def token_losses(logits: jax.Array, targets: jax.Array, z_loss: float = 1e-4,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Per-token cross entropy (z-loss included) and the z-loss term, both [batch, length].

  With label smoothing ls over V classes, the soft target q puts 1 - ls on the target and
  ls / (V - 1) on every other class (T5X). Without materialising q:
    -sum_v q_v log p_v = -(conf - low) * log p_target - low * sum_v log p_v,
  minus the entropy H(q), a constant, so that predicting q exactly costs 0.
  The z-loss z_loss * logsumexp(logits)**2 keeps the softmax normalizer near 1 (PaLM, T5X);
  like T5X the returned loss includes it.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise validation.ConfigError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                         axis=-1)[..., 0]
  if label_smoothing > 0.0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
    loss = (-(confidence - low) * target_log_probs - low * jnp.sum(log_probs, axis=-1)
            - entropy)
  else:
    loss = -target_log_probs
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term


def _check_normalization(normalization: str) -> None:
  if normalization not in NORMALIZATIONS:
    raise validation.ConfigError(f'Unknown normalization {normalization!r}; known: '
                                 f'{", ".join(NORMALIZATIONS)}')


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, and 0 where the denominator is 0 (no NaN, no NaN grads)."""
  ok = denominator > 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


def token_weights(batch: Batch, normalization: str = 'per_real_token') -> jax.Array:
  """Weight of each target token in the loss numerator, [batch, length] float32.

  `decoder_loss_weights`, except for 'per_sequence' (T5X's AVERAGE_PER_SEQUENCE), where
  each example's tokens get 1 / (its number of real tokens) so that every example counts
  the same however long. In packed rows an example is a segment of
  `decoder_segment_ids`; without segment ids each row is one example.
  """
  _check_normalization(normalization)
  weights = jnp.asarray(batch['decoder_loss_weights'], jnp.float32)
  if normalization != 'per_sequence':
    return weights
  segment_ids = batch.get('decoder_segment_ids')
  if segment_ids is None:
    counts = jnp.sum(weights, axis=-1, keepdims=True)
  else:
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    # Ids are 0 (padding) .. length at most: length + 1 buckets per row.
    num_segments = weights.shape[-1] + 1
    per_segment = jax.vmap(
        lambda w, s: jax.ops.segment_sum(w, s, num_segments=num_segments))(weights, segment_ids)
    counts = jnp.take_along_axis(per_segment, segment_ids, axis=-1)
  return _safe_divide(weights, counts)


def normalizer(batch: Batch, normalization: str = 'per_real_token',
               constant: float | None = None) -> jax.Array:
  """The loss divisor (T5X's loss_normalizing_factor) of a batch, a float32 scalar.

  'per_real_token': number of real target tokens (sum of decoder_loss_weights);
  'per_total_token': batch * length; 'per_sequence': number of examples (segments) with at
  least one real token; 'constant': `constant`.
  """
  _check_normalization(normalization)
  if normalization == 'constant':
    if constant is None:
      raise validation.ConfigError("normalization='constant' needs a `constant`")
    return jnp.asarray(constant, jnp.float32)
  if normalization == 'per_total_token':
    return jnp.asarray(float(np.prod(batch['decoder_loss_weights'].shape)), jnp.float32)
  # per_real_token, per_sequence: the token weights sum to the divisor.
  return jnp.sum(token_weights(batch, normalization))


def task_sums(values: jax.Array, task_ids: jax.Array, num_tasks: int) -> jax.Array:
  """Sum of `values` over the tokens of each task, [num_tasks]; ids outside [0, num_tasks)
  (the -1 of padding) are ignored.

  A segment sum rather than a one-hot: FLAN-size mixtures have thousands of tasks.
  """
  task_ids = jnp.asarray(task_ids, jnp.int32).reshape(-1)
  valid = (task_ids >= 0) & (task_ids < num_tasks)
  # Route ignored tokens to an extra bucket that is dropped.
  task_ids = jnp.where(valid, task_ids, num_tasks)
  sums = jax.ops.segment_sum(values.reshape(-1), task_ids, num_segments=num_tasks + 1)
  return sums[:num_tasks]


def _task_ids(batch: Batch) -> jax.Array:
  """decoder_task_ids; a batch without them is one task (0) on its real tokens."""
  if 'decoder_task_ids' in batch:
    return jnp.asarray(batch['decoder_task_ids'], jnp.int32)
  return jnp.where(jnp.asarray(batch['decoder_loss_weights']) > 0, 0, -1)


def prioritized_loss_weights(task_loss_weights: jax.Array, batch: Batch, groups: jax.Array,
                             floors: Sequence[float], normalization: str = 'per_real_token'
                             ) -> jax.Array:
  """λ per task after task priorities (data/schedules.py `Priority`, which states the rule).

  `groups` [num_tasks] holds each task's priority group (0 the highest, -1 none), `floors`
  each group's smallest share of the batch's λ-weighted token mass. Groups are visited from
  the lowest priority to the highest; one below its floor (and present) gets its tasks' λ
  multiplied by f (M - m) / ((1 - f) m), which brings its share m / M to exactly f.
  """
  weights = jnp.asarray(task_loss_weights, jnp.float32)
  groups = jnp.asarray(groups, jnp.int32)
  mass = task_sums(token_weights(batch, normalization), _task_ids(batch), weights.shape[0])
  for g in reversed(range(len(floors))):
    floor = float(floors[g])
    weighted = mass * weights
    total = jnp.sum(weighted)
    mine = jnp.sum(jnp.where(groups == g, weighted, 0.0))
    short = (mine > 0) & (mine < floor * total)
    factor = _safe_divide(floor * (total - mine), (1.0 - floor) * mine)
    weights = jnp.where((groups == g) & short, weights * factor, weights)
  return weights


def mixture_loss(logits: jax.Array, batch: Batch, task_loss_weights: jax.Array, *,
                 z_loss: float = 1e-4, label_smoothing: float = 0.0,
                 normalization: str = 'per_real_token', constant: float | None = None,
                 normalizer_value: jax.Array | None = None,
                 kernels: kernels_lib.Kernels = kernels_lib.PLAIN
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The objective sum_i lambda_i * L_i (a scalar) and metric sums.

  L_i = sum over task-i tokens of token_weight * token_loss, divided by the batch's
  normalizer, or by `normalizer_value` when given (microbatches pass the full batch's).
  lambda = `task_loss_weights`, [num_tasks]. A batch with no real tokens has loss 0.
  `kernels` computes the accuracy's argmax (the model's, `Transformer.ops`).

  aux (all additive over microbatches except `normalizer`):
    loss_sum, z_loss_sum, correct, tokens: [num_tasks] plain sums over real tokens
      (weighted by decoder_loss_weights, not by lambda nor by the normalization);
    weighted_loss: the objective's numerator, so loss = weighted_loss / normalizer;
    normalizer: the divisor used.
  """
  task_loss_weights = jnp.asarray(task_loss_weights, jnp.float32)
  num_tasks = task_loss_weights.shape[0]
  targets = jnp.asarray(batch['decoder_target_tokens'], jnp.int32)
  real = jnp.asarray(batch['decoder_loss_weights'], jnp.float32)
  task_ids = _task_ids(batch)

  loss, z_term = token_losses(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)
  valid = (task_ids >= 0) & (task_ids < num_tasks)
  token_lambda = jnp.where(valid, task_loss_weights[jnp.clip(task_ids, 0, num_tasks - 1)], 0.0)
  weighted_loss = jnp.sum(token_weights(batch, normalization) * token_lambda * loss)
  if normalizer_value is None:
    normalizer_value = normalizer(batch, normalization, constant)
  normalizer_value = jnp.asarray(normalizer_value, jnp.float32)

  correct = (kernels.argmax(logits) == targets).astype(jnp.float32) * real
  aux = {
      'loss_sum': task_sums(loss * real, task_ids, num_tasks),
      'z_loss_sum': task_sums(z_term * real, task_ids, num_tasks),
      'correct': task_sums(correct, task_ids, num_tasks),
      'tokens': task_sums(real, task_ids, num_tasks),
      'weighted_loss': weighted_loss,
      'normalizer': normalizer_value,
  }
  return _safe_divide(weighted_loss, normalizer_value), aux


def accumulate_aux(total: dict[str, jax.Array], aux: dict[str, jax.Array]
                   ) -> dict[str, jax.Array]:
  """Adds the sums of two microbatches' aux; `normalizer` is shared, so kept, not added."""
  return {k: v if k == 'normalizer' else v + aux[k] for k, v in total.items()}


def summarize(aux: Mapping[str, jax.Array], task_names: Sequence[str]) -> dict[str, jax.Array]:
  """Flat metrics from (accumulated) aux sums.

  `loss`, `z_loss`, `accuracy` are means over real tokens of all tasks (`loss` includes the
  z-loss, as in T5X), `tokens` their count, `objective` the optimized value; per task
  `<task>/loss`, `<task>/accuracy`, `<task>/tokens`. A task with no tokens in the batch
  reports loss and accuracy 0 with tokens 0 (never NaN; keys stay static under jit), so
  averages over steps should weight by `<task>/tokens`.
  """
  tokens = aux['tokens']
  if len(task_names) != tokens.shape[0]:
    raise ValueError(f'{len(task_names)} task names for {tokens.shape[0]} tasks')  # internal
  total_tokens = jnp.sum(tokens)
  metrics = {
      'loss': _safe_divide(jnp.sum(aux['loss_sum']), total_tokens),
      'z_loss': _safe_divide(jnp.sum(aux['z_loss_sum']), total_tokens),
      'accuracy': _safe_divide(jnp.sum(aux['correct']), total_tokens),
      'tokens': total_tokens,
      'objective': _safe_divide(aux['weighted_loss'], aux['normalizer']),
  }
  task_loss = _safe_divide(aux['loss_sum'], tokens)
  task_accuracy = _safe_divide(aux['correct'], tokens)
  for i, name in enumerate(task_names):
    metrics[f'{name}/loss'] = task_loss[i]
    metrics[f'{name}/accuracy'] = task_accuracy[i]
    metrics[f'{name}/tokens'] = tokens[i]
  return metrics
