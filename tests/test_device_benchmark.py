"""benchmarks/device.py --smoke: the accelerator benchmark's code paths (plan's batch, packed
builtin-mixture batches, the compiled train step with its cost analysis, memory against
plan, greedy and beam-4 decoding) for both families, on CPU with tiny presets, so the
script cannot rot while no device is lent."""

import json
import os
import subprocess
import sys

from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_KEYS = {'params', 'batch', 'attention', 'vocab', 'compile_s', 'flops_per_step', 'step_s',
             'tokens_per_step', 'tokens_per_s', 'useful_tokens_per_s', 'flop_per_s', 'mfu',
             'plan_bytes', 'plan_budget', 'peak_bytes', 'peak_over_plan',
             'decode', 'loss'}


def test_smoke_line_has_every_figure():
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags()}
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'device.py'),
                        '--smoke'], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  line = json.loads(out.stdout.strip().splitlines()[-1])
  assert line['benchmark'] == 'device' and line['platform'] == 'cpu'
  assert line['device_kind'] and line['versions']['jax'] and line['settings']['mode'] == 'smoke'
  assert line['peak_tflops'] is None   # a CPU is not in the peak table: FLOP/s only
  assert set(line['cases']) == {'t5_tiny', 'llama_tiny'}
  for name, case in line['cases'].items():
    assert 'error' not in case, (name, case)
    assert CASE_KEYS <= set(case), (name, sorted(CASE_KEYS - set(case)))
    assert 1 <= case['batch'] <= line['settings']['max_batch']
    assert case['plan_bytes'] > 0 and case['params'] > 0
    for key in ('compile_s', 'step_s', 'tokens_per_s', 'useful_tokens_per_s', 'flops_per_step',
                'flop_per_s'):
      assert case[key] > 0, (name, key, case[key])
    assert case['useful_tokens_per_s'] <= case['tokens_per_s']
    assert case['mfu'] is None   # no peak for a CPU
    # XLA:CPU has no memory_stats: peak and ratio null; where a backend has them, a ratio
    if case['peak_bytes'] is None:
      assert case['peak_over_plan'] is None
    else:
      assert case['peak_over_plan'] == case['peak_bytes'] / case['plan_bytes'] > 0
    decode = case['decode']
    assert set(decode) == {f'{m}_batch{b}' for m in ('greedy', 'beam4')
                           for b in line['settings']['decode_batches']}
    for figures in decode.values():
      assert figures['call_s'] > 0 and figures['tokens_per_s'] > 0
