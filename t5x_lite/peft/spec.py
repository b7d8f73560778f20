"""What a parameter-efficient run adds to the frozen base: LoRA banks, a soft prompt, unfrozen parts.

Three ways to share parameters across the tasks of a mixture (Ruder 2017's taxonomy):
hard sharing trains one body for all tasks (no spec: a full fine-tune); soft sharing trains
one LoRA per task beside a frozen shared body (`sharing='task'`); hierarchical sharing trains
one LoRA per group of related tasks, optionally plus one per task below it
(`sharing='group'` / `'group+task'`). `'shared'` is one LoRA for every task (peft's LoRA).

The spec is plain data stored in every checkpoint's meta, so eval, infer and export rebuild
the same model from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from t5x_lite import errors, validation

ATTENTION = ('query', 'key', 'value', 'out')
MLP = ('wi', 'wi_0', 'wi_1', 'wo')
# peft / Hugging Face module names -> ours, for every family: T5's q/k/v/o (peft's T5
# default targets are ['q', 'v']; wi/wi_0/wi_1/wo are the same names there), and the
# decoder-only family's (Llama, Qwen, Gemma) q_proj ... down_proj, also without '_proj'.
# A gated MLP's gate is wi_0 (the activated half) and its up wi_1, in T5 as in Llama.
DECODER_ONLY_ALIASES = {'q_proj': 'query', 'k_proj': 'key', 'v_proj': 'value', 'o_proj': 'out',
                        'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo',
                        'gate': 'wi_0', 'up': 'wi_1', 'down': 'wo'}
ALIASES = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out', **DECODER_ONLY_ALIASES}
STACKS = ('encoder', 'decoder')   # the decoder-only family's one stack is 'decoder'
SHARING = ('shared', 'task', 'group', 'group+task')
BANKS = ('shared', 'group', 'task')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """LoRA (Hu et al. 2021) as peft defines it: W x + (alpha / rank) B A dropout(x), B = 0 at
  init so step 0 is the base model. `targets`: projections by name (ours or peft's q/k/v/o;
  'wi' also covers the gated wi_0/wi_1; the decoder-only family's Hugging Face names
  q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or q ... gate, up, down),
  in the `stacks` listed (a decoder-only model has one: 'decoder'); every attention of a stack
  (self and cross) with a targeted name is adapted, as peft's `target_modules` matches."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ('query', 'value')
  stacks: tuple[str, ...] = STACKS
  sharing: str = 'shared'

  def __post_init__(self):
    object.__setattr__(self, 'targets', tuple(ALIASES.get(t, t) for t in self.targets))
    object.__setattr__(self, 'stacks', tuple(self.stacks))
    validation.check(self, {'rank': '> 0', 'alpha': '> 0', 'dropout': '[0, 1)',
                            'sharing': SHARING})
    bad = [t for t in self.targets if t not in ATTENTION + MLP]
    if bad or not self.targets:
      raise validation.ConfigError(
          f'peft.LoraSpec.targets {list(self.targets)}: unknown {bad or "(none given)"}; choose '
          f'from {list(ATTENTION + MLP)} (or peft names q, k, v, o; decoder-only models: '
          'q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).')
    if not self.stacks or any(s not in STACKS for s in self.stacks):
      raise validation.ConfigError(f'peft.LoraSpec.stacks {list(self.stacks)}: choose from '
                                   f'{list(STACKS)}.')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def banks(self) -> tuple[str, ...]:
    return {'shared': ('shared',), 'task': ('task',), 'group': ('group',),
            'group+task': ('group', 'task')}[self.sharing]

  def adapts(self, stack: str, projection: str) -> bool:
    wi = projection in ('wi_0', 'wi_1') and 'wi' in self.targets
    return stack in self.stacks and (projection in self.targets or wi)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """The trainable part of a run beside its frozen base.

  `train`: regular expressions over base parameter paths ('/'-joined, e.g. 'layer_norm'
  matches every RMSNorm scale) that are trained too. `tasks`: the task bank's slots, in
  order (the training mixture's tasks). `groups`: (group, (task, ...)) pairs, the group
  bank's slots in order; a task in no group gets no group adapter.
  """
  lora: LoraSpec | None = None
  prompt_length: int = 0
  train: tuple[str, ...] = ()
  tasks: tuple[str, ...] = ()
  groups: tuple[tuple, ...] = ()            # ((group, (task, ...)), ...)

  def __post_init__(self):
    object.__setattr__(self, 'train', tuple(self.train))
    object.__setattr__(self, 'tasks', tuple(self.tasks))
    object.__setattr__(self, 'groups', tuple((g, tuple(ts)) for g, ts in (
        self.groups.items() if isinstance(self.groups, Mapping) else self.groups)))
    validation.check(self, {'prompt_length': '>= 0'})
    if self.lora is None and not self.prompt_length and not self.train:
      raise validation.ConfigError(
          'peft.AdapterSpec trains nothing: set lora, prompt_length > 0 or train (patterns of '
          'base parameters to train).')
    banks = self.lora.banks if self.lora else ()
    if 'group' in banks and not self.groups:
      raise validation.ConfigError(
          f"peft sharing={self.lora.sharing!r} needs groups: bind peft.AdapterConfig.groups = "
          "{'group': ['task', ...]} or train on a mixture of sub-mixtures (one group each).")
    seen: dict[str, str] = {}
    for group, members in self.groups:
      for task in members:
        if task in seen:
          raise validation.ConfigError(f'peft groups: task {task!r} is in both {seen[task]!r} '
                                       f'and {group!r}; a task belongs to one group.')
        seen[task] = group

  def bank_size(self, bank: str) -> int:
    return {'shared': 1, 'group': len(self.groups), 'task': len(self.tasks)}[bank]

  def group_of(self, task: str) -> str | None:
    return next((g for g, members in self.groups if task in members), None)

  def slots(self, task: str | None) -> dict[str, int | None]:
    """Bank -> this task's slot (None: the task has no adapter in that bank)."""
    out: dict[str, int | None] = {}
    for bank in (self.lora.banks if self.lora else ()):
      if bank == 'shared':
        out[bank] = 0
      elif bank == 'task':
        out[bank] = self.tasks.index(task) if task in self.tasks else None
      else:
        group = self.group_of(task) if task is not None else None
        out[bank] = [g for g, _ in self.groups].index(group) if group is not None else None
    return out

  @property
  def per_task(self) -> bool:
    """Whether examples must be routed by task (a task or group bank)."""
    return bool(self.lora) and self.lora.sharing != 'shared'

  def to_json(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_json(cls, data: Mapping[str, Any] | None) -> 'AdapterSpec | None':
    if not data:
      return None
    data = dict(data)
    lora = data.pop('lora', None)
    return cls(lora=LoraSpec(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in lora.items()}) if lora else None,
               **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class AdapterError(errors.UserError, ValueError):
  """An adapter run that does not fit its base, mixture or checkpoint."""


def check_same_spec(meta: dict, spec: AdapterSpec | None, where: str) -> None:
  """A checkpoint's adapters (its meta's `peft`) must be the run's."""
  recorded = AdapterSpec.from_json(meta.get('peft'))
  if recorded != spec:
    raise AdapterError(
        f'{where} was written by a run with adapters {recorded} but this run has {spec}; '
        'resume with the same peft settings, or start the new run in another model_dir.')
