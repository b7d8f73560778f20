"""How a run's trainable state comes to be, chosen once before the loop.

One `Start` per run answers, whatever the kind of run: the model trained, the layout of its
TrainState, the state it begins from (`begin`: fresh init, resume, warm start from a
checkpoint or a converted Hugging Face model, partial restore; or adapters beside a frozen
base, fresh or resumed), the params that are not trained (`frozen`, passed to every step),
what the checkpoint records about them (`record`), and what evaluation decodes with for
each task (`served`). The loop and the evaluator only ever talk to this interface.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
from typing import Any, Callable

import flax.linen as nn
import jax

from t5x_lite import kernels, models
from t5x_lite.peft import params as peft_params, runs as peft_runs
from t5x_lite.training import checkpoints, compatibility, state as state_lib


def _same_params(params: Any, task: str) -> Any:
  del task
  return params


@dataclasses.dataclass(frozen=True)
class Served:
  """What evaluation decodes with: the model, the shardings of the params it is given, the
  params for one task (`for_task(params, task_name)`: a per-task adapter routed to the
  task's slots, else the params as they are) and the soft prompt's length."""
  model: models.Model
  shardings: Any
  for_task: Callable[[Any, str], Any] = _same_params
  prompt_length: int = 0

  @classmethod
  def adapters(cls, model: models.Model, spec: Any, shardings: Any) -> 'Served':
    """An adapter run's: one routed model serves every task (each bank one slot, so one
    compiled decoder), `for_task` picks the task's slots (peft.params.route)."""
    return cls(model.with_adapters(peft_params.routed_spec(spec)), shardings,
               functools.partial(peft_params.route, spec=spec) if spec.per_task
               else _same_params, spec.prompt_length)


class Start(abc.ABC):
  """A run's model and the state it trains, from `config` (a loop.TrainConfig)."""

  def __init__(self, config: Any, model: models.Model, mesh, rules, mixture_name: str):
    self.config, self.model, self.mixture_name = config, model, mixture_name
    self.optimizer = config.optimizer.build()
    self.layout = state_lib.state_layout(model, self.optimizer, mesh, rules)
    self.frozen: Any = {}   # params that are not trained: passed to every step as they are
    self.rng = jax.random.key(config.seed)

  @property
  def prompt_length(self) -> int:
    """Soft prompt ids the data side prepends to every input (prompt tuning)."""
    return 0

  def check_model_dir(self, ckpt: checkpoints.Checkpointer) -> None:
    """Before restoring: the run directory's newest checkpoint must be this model's."""
    compatibility.check_model_dir(ckpt, self.model.config, self.layout.abstract().params,
                                  self.model.adapters)

  @abc.abstractmethod
  def begin(self, ckpt: checkpoints.Checkpointer, latest: int | None, latest_meta: dict,
            data: Any, writer: Any) -> state_lib.TrainState:
    """The state the run starts from (`latest`: the newest good checkpoint of its own
    directory, restored with the data iterator's state; None: nothing to resume)."""

  def record(self) -> dict[str, Any]:
    """What every checkpoint's meta records about how this state came to be."""
    return {}

  def params(self, state: state_lib.TrainState) -> Any:
    """The whole params tree of `state` (trained and frozen)."""
    return peft_params.combine(state.params, self.frozen or None)

  def served(self) -> Served:
    return Served(self.model, self.layout.shardings.params)


class FullFineTune(Start):
  """Every parameter trains: a fresh init, a resume, a warm start from a converted
  checkpoint in the run's own directory, or from INITIAL_CHECKPOINT_PATH (partial or not)."""

  def begin(self, ckpt, latest, latest_meta, data, writer):
    cfg, model, layout = self.config, self.model, self.layout
    if latest is not None and latest_meta.get('params_only'):   # t5x-lite convert's output
      params = ckpt.restore_params(layout.abstract().params, latest)
      return state_lib.create_state(model, self.optimizer, layout, self.rng, params=params)
    if latest is not None:
      state, _ = ckpt.restore(layout, latest, data_iterator=data)
      logging.warning('Resuming from step %d of %s', int(state.step), ckpt.directory)
      compatibility.note_mixture_change(latest_meta, self.mixture_name, writer,
                                        int(state.step))
      return state
    if cfg.init_from:
      return compatibility.warm_start(
          checkpoints.Checkpointer(cfg.init_from, async_save=False), None, model,
          self.optimizer, layout, self.rng, partial=cfg.init_from_partial)
    return state_lib.create_state(model, self.optimizer, layout, self.rng)


class AdapterRun(Start):
  """Adapters (a peft.AdapterSpec) train beside a frozen base: the base from
  INITIAL_CHECKPOINT_PATH (or drawn from the seed), its identity recorded and checked on
  every resume; the adapters fresh or resumed."""

  def __init__(self, config, model, mesh, rules, mixture_name):
    super().__init__(config, model, mesh, rules, mixture_name)
    self.mesh, self.rules = mesh, rules
    self.base_identity: dict | None = None

  @property
  def prompt_length(self) -> int:
    return self.model.adapters.prompt_length

  def begin(self, ckpt, latest, latest_meta, data, writer):
    cfg, spec, layout = self.config, self.model.adapters, self.layout
    base_model = self.model.with_adapters(None)
    base, source = peft_runs.load_base(cfg.init_from, None, base_model,
                                       peft_runs.base_shardings(base_model, self.mesh,
                                                                self.rules))
    if latest is not None:
      state, _ = ckpt.restore(layout, latest, data_iterator=data)
      logging.warning('Resuming adapters from step %d of %s', int(state.step), ckpt.directory)
      self.frozen = (peft_params.split(base, spec)[1] if base is not None else
                     state_lib.frozen_from_seed(self.model, cfg.seed, layout.frozen))
    else:
      state, self.frozen = state_lib.create_adapter_state(self.model, self.optimizer, layout,
                                                          self.rng, base)
    self.base_identity = peft_params.base_identity(self.frozen, source)
    if latest is not None:
      peft_runs.check_base(latest_meta.get('peft_base'), self.base_identity,
                           f'resuming {ckpt.directory} step {latest}')
    logging.info('Adapters: %d trainable parameters beside a frozen base of %d (%s)',
                 peft_params.count(state.params), peft_params.count(self.frozen), source)
    return state

  def record(self):
    return {'peft_base': self.base_identity, 'peft': self.model.adapters.to_json()}

  def served(self) -> Served:
    shardings = peft_params.combine(self.layout.shardings.params, jax.tree.map(
        lambda x: x.sharding, self.layout.frozen))
    return Served.adapters(self.model, self.model.adapters, shardings)


def for_run(config: Any, model_config: Any, mixture: Any, mesh, rules) -> Start:
  """The run's Start: adapters when `config.adapters` is set (their task slots are the
  mixture's tasks), else a full fine-tune."""
  adapters = peft_runs.spec_for_mixture(config.adapters, mixture)
  model = models.build(model_config, kernels.for_mesh(mesh), adapters)
  if adapters is None:
    return FullFineTune(config, model, mesh, rules, mixture.name)
  peft_params.check_against_base(adapters,
                                 nn.unbox(model.with_adapters(None).abstract_params()))
  return AdapterRun(config, model, mesh, rules, mixture.name)
