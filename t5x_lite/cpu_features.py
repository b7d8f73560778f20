"""The instruction-set flags of this host's CPU, read once from /proc/cpuinfo.

Some XLA:CPU code paths are faster or slower depending on AVX-512 and native bf16; the
code that picks between them asks here. Off Linux (no /proc/cpuinfo) the set is empty, so
every caller falls back to the choice that is safe everywhere.
"""

from __future__ import annotations

import functools


@functools.cache
def flags() -> frozenset[str]:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[1].split())
  except OSError:
    pass
  return frozenset()


def has_avx512() -> bool:
  return 'avx512f' in flags()


def has_native_bf16() -> bool:
  """bf16 dot products in hardware (AVX512-BF16 or AMX): twice the fp32 FLOP rate."""
  return bool({'avx512_bf16', 'amx_bf16'} & flags())
