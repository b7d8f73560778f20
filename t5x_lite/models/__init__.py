"""Model families behind one interface (`Model`, interface.py): T5 (encoder-decoder) and the
decoder-only family (Llama, Qwen2/2.5, Qwen3, Gemma: `DecoderOnlyConfig`, `decoder_presets`),
in flax.linen."""

from __future__ import annotations

from typing import Any

from t5x_lite.models.families import (IMPLEMENTATIONS, build, config_from_json, config_to_json,
                                      register)
from t5x_lite.models import decoder_presets
from t5x_lite.models.decoder_only_config import DecoderOnlyConfig
from t5x_lite.models.decoder_only_model import DecoderOnlyModel
from t5x_lite.models.interface import ActivationBytes, LayerStack, Model
from t5x_lite.models.presets import FAMILIES, SIZES, all_presets, num_params, preset
from t5x_lite.models.t5 import T5Config, Transformer


def abstract_params(config: Any, adapters: Any = None) -> Any:
  """Shapes and logical axes of a config's parameters, boxed; no memory."""
  return build(config, adapters=adapters).abstract_params()


def logical_axes(config: Any, adapters: Any = None) -> Any:
  return build(config, adapters=adapters).logical_axes()


def init_params(config: Any, rng, out_shardings: Any = None, adapters: Any = None) -> Any:
  return build(config, adapters=adapters).init_params(rng, out_shardings)


def param_count(config: Any, adapters: Any = None) -> int:
  return build(config, adapters=adapters).param_count()


__all__ = ['FAMILIES', 'IMPLEMENTATIONS', 'SIZES', 'ActivationBytes', 'DecoderOnlyConfig',
           'DecoderOnlyModel', 'LayerStack', 'Model', 'T5Config', 'decoder_presets',
           'Transformer', 'abstract_params', 'all_presets', 'build', 'config_from_json',
           'config_to_json', 'init_params', 'logical_axes', 'num_params', 'param_count',
           'preset', 'register']
