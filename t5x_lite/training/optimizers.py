"""Optimizers: optax Adafactor with T5's defaults, AdamW, learning-rate schedules, clipping.

Every function takes plain keyword arguments with defaults so the CLI can register them
with gin as they are. Schedules are called by optax with the number of updates already
applied (0 for the first update), the same step T5X's schedules see. A step that the
non-finite guard skips applies no update and does not advance the schedule: `total_steps`
counts applied updates, so a run of TRAIN_STEPS steps with k skipped ends at schedule
step TRAIN_STEPS - k, and the logged `train/learning_rate` of a step is the rate of the
update it applied or, when skipped, of the next update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import optax

from t5x_lite import validation

SCHEDULES = ('constant', 'warmup', 'rsqrt', 'cosine')
OPTIMIZERS = ('adafactor', 'adamw')


def learning_rate_schedule(name: str = 'constant', base_learning_rate: float = 1e-3,
                           warmup_steps: int = 0, total_steps: int | None = None,
                           alpha: float = 0.0) -> optax.Schedule:
  """The learning rate as a function of the step.

  'constant': base.
  'warmup':   linear 0 -> base over `warmup_steps`, then base.
  'rsqrt':    T5's inverse square root: base / sqrt(max(step, warmup_steps, 1)), flat for
              the first `warmup_steps` steps (a plateau, not a ramp). T5 pretraining is
              base 1.0 with 10k warmup steps: 0.01 up to step 10k, then 1/sqrt(step).
              Note the peak is base / sqrt(warmup_steps), not base.
  'cosine':   linear 0 -> base over `warmup_steps`, then cosine decay to alpha * base at
              `total_steps` (which counts the warmup), and alpha * base after it.
  """
  if warmup_steps < 0:
    raise validation.ConfigError(f'warmup_steps must be >= 0, got {warmup_steps}')
  if name == 'constant':
    return optax.constant_schedule(base_learning_rate)
  if name == 'warmup':
    if warmup_steps == 0:
      return optax.constant_schedule(base_learning_rate)
    return optax.linear_schedule(0.0, base_learning_rate, warmup_steps)
  if name == 'rsqrt':
    floor = max(warmup_steps, 1)

    def rsqrt(step):
      return base_learning_rate * jnp.reciprocal(
          jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32), floor)))

    return rsqrt
  if name == 'cosine':
    if total_steps is None or total_steps <= warmup_steps:
      raise validation.ConfigError(f"schedule 'cosine' needs total_steps > warmup_steps "
                                   f'({warmup_steps}), got total_steps={total_steps}')
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=alpha * base_learning_rate)
  raise validation.ConfigError(f'Unknown learning rate schedule {name!r}; known: '
                               f'{", ".join(SCHEDULES)}')


def adafactor(learning_rate: float | optax.Schedule = 1e-3, decay_rate: float = 0.8,
              decay_offset: int = 0, factored: bool = True,
              multiply_by_parameter_scale: bool = True,
              clipping_threshold: float | None = 1.0, momentum: float | None = None,
              min_dim_size_to_factor: int = 128, eps: float = 1e-30,
              weight_decay_rate: float | None = None) -> optax.GradientTransformation:
  """optax.adafactor with T5X's Adafactor defaults, argument for argument.

  T5X name -> optax argument: decay_rate -> decay_rate (second-moment decay
  1 - (step + 1) ** -0.8, the same schedule in both); step_offset -> decay_offset;
  factored, multiply_by_parameter_scale, clipping_threshold (update RMS clipping),
  min_dim_size_to_factor, weight_decay_rate -> same names; beta1 -> momentum;
  epsilon1 -> eps; epsilon2 (the 1e-3 floor of the parameter scale) is fixed at 1e-3
  in optax. With multiply_by_parameter_scale the learning rate is relative to each
  parameter's RMS.

  Factoring is T5X's: its model gins set `logical_factor_rules`, which decide only for
  parameters of rank > 2; rank <= 2 falls back to factoring the two largest dimensions
  when the smaller is >= min_dim_size_to_factor (`Adafactor._parse_rule`), which is
  optax's rule. Every parameter here is at most 2-D, as in T5X (attention kernels are
  [embed, joined_kv]), so the factored state is T5X's (tests/training/test_adafactor_t5x.py).
  weight_decay_rate is absolute (not scaled by the learning rate), like T5X's default.
  """
  return optax.adafactor(
      learning_rate=learning_rate, min_dim_size_to_factor=min_dim_size_to_factor,
      decay_rate=decay_rate, decay_offset=decay_offset,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold, momentum=momentum,
      weight_decay_rate=weight_decay_rate, eps=eps, factored=factored)


def adamw(learning_rate: float | optax.Schedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.01, mask: Any = None
          ) -> optax.GradientTransformation:
  """optax.adamw; the decay is decoupled and scaled by the learning rate (PyTorch's
  convention). It applies to every parameter unless `mask` (a tree of bools or a
  function of the params, as in optax) says otherwise."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=mask)


def make_optimizer(name: str = 'adafactor', learning_rate: float = 1e-3,
                   schedule: str = 'constant', warmup_steps: int = 0,
                   total_steps: int | None = None, clip_grad_norm: float | None = None,
                   weight_decay: float | None = None, alpha: float = 0.0,
                   **kwargs: Any) -> optax.GradientTransformation:
  """Optimizer `name` driven by schedule `schedule` (see `learning_rate_schedule`; `alpha`
  is the cosine floor), with global-norm gradient clipping first when `clip_grad_norm`
  is set.

  `weight_decay` None keeps the optimizer's default (AdamW 0.01, Adafactor none); for
  Adafactor it is `weight_decay_rate`. Other keyword arguments go to the optimizer.
  """
  if name not in OPTIMIZERS:
    raise validation.ConfigError(f'Unknown optimizer {name!r}; known: '
                                 f'{", ".join(OPTIMIZERS)}')
  lr = learning_rate_schedule(schedule, learning_rate, warmup_steps=warmup_steps,
                              total_steps=total_steps, alpha=alpha)
  if name == 'adafactor':
    if weight_decay is not None:
      kwargs['weight_decay_rate'] = weight_decay
    optimizer = adafactor(lr, **kwargs)
  else:
    if weight_decay is not None:
      kwargs['weight_decay'] = weight_decay
    optimizer = adamw(lr, **kwargs)
  if clip_grad_norm is None:
    return optimizer
  return optax.chain(optax.clip_by_global_norm(clip_grad_norm), optimizer)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer of a run as plain settings (what gin binds): `build()` makes the optax
  transformation, `learning_rate_fn()` the schedule that drives it (for logging)."""
  name: str = 'adafactor'
  learning_rate: float = 1e-3
  schedule: str = 'constant'
  warmup_steps: int = 0
  total_steps: int | None = None
  clip_grad_norm: float | None = None
  weight_decay: float | None = None
  alpha: float = 0.0
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # optimizer kwargs

  def __post_init__(self):
    validation.check(self, {
        'name': OPTIMIZERS, 'learning_rate': '> 0', 'schedule': SCHEDULES,
        'warmup_steps': '>= 0', 'total_steps': '> 0', 'clip_grad_norm': '> 0',
        'weight_decay': '>= 0', 'alpha': '>= 0'}, {'learning_rate': 'LEARNING_RATE'})
    try:
      self.learning_rate_fn()
    except ValueError as e:   # e.g. 'cosine' without total_steps > warmup_steps
      raise validation.ConfigError(f'optimizers.OptimizerConfig: {e}') from None

  def build(self) -> optax.GradientTransformation:
    return make_optimizer(self.name, self.learning_rate, self.schedule, self.warmup_steps,
                          self.total_steps, self.clip_grad_norm, self.weight_decay, self.alpha,
                          **dict(self.extra))

  def learning_rate_fn(self) -> optax.Schedule:
    return learning_rate_schedule(self.schedule, self.learning_rate, self.warmup_steps,
                                  self.total_steps, self.alpha)
