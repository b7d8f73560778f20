"""T5-family models in flax.linen."""

from t5x_lite.models.presets import FAMILIES, SIZES, all_presets, num_params, preset
from t5x_lite.models.t5 import (T5Config, Transformer, abstract_params, decode_step,
                                init_cache, init_params, logical_axes, param_count)

__all__ = ['FAMILIES', 'SIZES', 'T5Config', 'Transformer', 'abstract_params', 'all_presets',
           'decode_step', 'init_cache', 'init_params', 'logical_axes', 'num_params', 'param_count', 'preset']
