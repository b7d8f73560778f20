"""The non-finite guard's run-level half: stop a run whose state or losses went non-finite
before anything non-finite is saved, and leave its model_dir so that the same command with a
lower learning rate resumes from a checkpoint that trains on.

The step (`step.py`) skips an update whose loss or gradient is not finite and reports
`bad_streak` (consecutive skips) and `state_finite` (every new parameter and optimizer-state
value finite). The loop hands each step's metrics to `Guard.push`, which reads them one step
late (the host never waits for the device), and asks `Guard.should_save` before a checkpoint:
it checks that step at once, and puts a save off while a streak of skipped steps is on (those
parameters just gave a non-finite loss; saving them could rotate a good checkpoint out under
`max_to_keep`), to the next finite step; the final step is saved anyway (the streak was
tolerated).

A run stops when
- a step's update made the state non-finite: it is never saved, and the checkpoints before
  it are kept (the update from them was the problem, not their parameters);
- `max_bad_steps` consecutive steps were non-finite: their parameters are those after the
  last applied update (step S - k), which give non-finite losses batch after batch.
  Checkpoints from step S - k on hold those parameters; resuming from one leads into the same
  failure whatever the learning rate, so they are moved to
  `MODEL_DIR/checkpoints_broken/<step>-non_finite` (never deleted; where damaged checkpoints go
  too, see checkpoints.py) and the restart resumes from the checkpoint before them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_lite import errors


class NonFiniteError(errors.UserError, RuntimeError):
  """The run stopped for non-finite steps; the message says how to resume."""


def all_finite(tree) -> jax.Array:
  """True when every floating-point value in `tree` is finite: one is-finite reduction per
  leaf, a read of the new state and no copy of it (the compiled step's temporary and aliased
  bytes are those of a step without the check; the update stays in place)."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.array(True)


class Guard:
  """Checks each step's `bad_streak` and `state_finite` (taken out of its metrics)."""

  def __init__(self, max_bad_steps: int, checkpointer, learning_rate: float, best=None):
    """`best`: the run's best_checkpoint.BestCheckpoint (keep_best), told of moved steps."""
    self.max_bad_steps, self.ckpt, self.learning_rate = max_bad_steps, checkpointer, learning_rate
    self.best = best
    self._pending = None
    self._save_due = False

  def push(self, metrics: dict, step: int) -> None:
    """Takes step `step`'s guard values out of `metrics`; checks the previous step's (done by
    now, so reading them does not stall the device)."""
    previous = self._pending
    self._pending = (metrics.pop('bad_streak'), metrics.pop('state_finite'), step)
    if previous is not None:
      self._check(*previous)

  def should_save(self, due: bool, final: bool) -> bool:
    """Whether to checkpoint the latest step: it is `due` (or a save was put off), its state
    is finite (checked now; a stop otherwise) and it ended no skipped step, unless `final`."""
    self._save_due |= due
    if not self._save_due or self._pending is None:
      return False
    self._check(*self._pending)
    if int(self._pending[0]) and not final:
      return False
    self._save_due = False
    return True

  def _check(self, bad_streak, state_finite, step: int) -> None:
    k = int(bad_streak)
    if not bool(state_finite) and k:   # skipped: the state came in non-finite
      self._stop(f'the parameters or optimizer state were already non-finite before step '
                 f'{step} (a restored checkpoint or initial parameters with NaN/Inf)',
                 bad_from=None)
    if not bool(state_finite):
      self._stop(f'the update of step {step} made the parameters or optimizer state '
                 'non-finite; it was not saved (undoing it in place is not possible, see '
                 'step.py)', bad_from=None)
    if k >= self.max_bad_steps:
      self._stop(f'{k} consecutive steps had a non-finite loss or gradient (steps '
                 f'{step - k + 1}-{step}, last at step {step}); their updates were skipped',
                 bad_from=step - k)

  def _stop(self, what: str, bad_from: int | None) -> None:
    self.ckpt.wait()   # an asynchronous save in flight is either moved or kept, never half
    moved = []
    if bad_from is not None:
      moved = [s for s in self.ckpt.all_steps() if s >= max(bad_from, 1)]
      for s in moved:
        self.ckpt.move_aside(s, 'non_finite')
      if self.best is not None:
        self.best.forget(moved)   # a best record never names a step without a checkpoint
    remaining = [s for s in self.ckpt.all_steps() if s not in moved]
    message = what + '. '
    if moved:
      message += (f'Checkpoints {moved} hold the parameters that gave those losses: moved to '
                  f'{self.ckpt.broken_dir()}. ')
    rate = f'a lower --gin.LEARNING_RATE (this run: {self.learning_rate:g})'
    if remaining:
      message += f'Restart the same command with {rate}: it resumes from step {max(remaining)}'
    else:
      message += f'No earlier checkpoint is left: the same command with {rate} starts over'
    raise NonFiniteError(message + '; or clip gradients '
                         '(--gin.optimizers.OptimizerConfig.clip_grad_norm=1.0), or check the data.')
