"""Model families: a config's `family` names the model-interface implementation that runs
it (`build`) and the config class its JSON (checkpoint meta) reads back into. (The presets'
families, `presets.FAMILIES`: t5_1_0, t5_1_1, flan_t5, mt5, byt5, are all of the family 't5'.)"""

from __future__ import annotations

import dataclasses
from typing import Any

from t5x_lite import validation
from t5x_lite.models import t5
from t5x_lite.models.decoder_only_config import DecoderOnlyConfig
from t5x_lite.models.decoder_only_model import DecoderOnlyModel
from t5x_lite.models.encoder_decoder import EncoderDecoderModel
from t5x_lite.models.interface import Model

# family -> (config class, Model implementation)
IMPLEMENTATIONS: dict[str, tuple[type, type[Model]]] = {
    't5': (t5.T5Config, EncoderDecoderModel),
    'decoder_only': (DecoderOnlyConfig, DecoderOnlyModel),   # Llama, Qwen2/3, Gemma
}
DEFAULT_FAMILY = 't5'   # checkpoint metas written before configs recorded their family


def register(family: str, config_class: type, model_class: type[Model]) -> None:
  """Add a family (e.g. a model written in a test, or the decoder-only family)."""
  IMPLEMENTATIONS[family] = (config_class, model_class)


def _entry(family: str) -> tuple[type, type[Model]]:
  if family not in IMPLEMENTATIONS:
    raise validation.ConfigError(f'unknown model family {family!r}; known: '
                                 f'{", ".join(sorted(IMPLEMENTATIONS))}')
  return IMPLEMENTATIONS[family]


def build(config: Any, kernels=None, adapters: Any = None) -> Model:
  """The model (interface) for a family's config; `kernels`: `kernels.for_mesh(mesh)`."""
  return _entry(config.family)[1](config, kernels, adapters)


def config_to_json(config: Any) -> dict[str, Any]:
  """The config as a checkpoint's meta records it: its fields and its family."""
  return {'family': config.family, **dataclasses.asdict(config)}


def config_class(recorded: dict[str, Any]) -> type:
  return _entry(recorded.get('family', DEFAULT_FAMILY))[0]


def config_from_json(recorded: dict[str, Any], fill_defaults: bool = False) -> Any:
  """The config `config_to_json` wrote. `fill_defaults`: keep only the fields today's class
  has (older metas lack some: they get today's defaults)."""
  cls = config_class(recorded)
  fields = {k: v for k, v in recorded.items() if k != 'family'}
  if fill_defaults:
    known = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in fields.items() if k in known}
  return cls(**fields)
