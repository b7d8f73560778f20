"""What checkpoint checksums cost: save and restore time of a Flan-T5 TrainState (params +
Adafactor state) with the checksums recorded and verified, and without (checksums.record
replaced by `None`: the checkpoint then records none and its restore verifies nothing, as
before issue #18).

  JAX_PLATFORMS=cpu python benchmarks/checkpoint_integrity.py [--preset=small] [--repeats=3]

Prints one JSON line of medians, in seconds: `save_blocking` (what the training loop waits
for: checksums + copy off the devices), `save_total` (until the checkpoint is finalized),
`restore` (verified: read + checksums + cast), `checksum` (one checksum pass alone) and
`checksum_first_call` (the same with its compilations, once per array shape and run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax

from t5x_lite import models, partitioning
from t5x_lite.training import checkpoints, checksums, optimizers, state as state_lib


def measure(state, layout, directory: str, verify: bool) -> dict[str, float]:
  record = checksums.record
  if not verify:
    checksums.record = lambda tree: None
  try:
    ckpt = checkpoints.Checkpointer(directory, async_save=True)
    start = time.perf_counter()
    ckpt.save(1, state)
    blocking = time.perf_counter() - start
    ckpt.wait()
    total = time.perf_counter() - start
    ckpt.close()
    ckpt = checkpoints.Checkpointer(directory)
    start = time.perf_counter()
    restored, _ = ckpt.restore(layout, 1)
    jax.block_until_ready(restored)
    restore = time.perf_counter() - start
    ckpt.close()
  finally:
    checksums.record = record
  return {'save_blocking': blocking, 'save_total': total, 'restore': restore}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  config = models.preset('flan_t5', args.preset)
  optimizer = optimizers.OptimizerConfig().build()
  model = models.build(config)
  layout = state_lib.state_layout(model, optimizer, partitioning.make_mesh({'data': -1}),
                                  partitioning.rules_for('dp'))
  state = state_lib.create_state(model, optimizer, layout, jax.random.key(0))
  tree = checkpoints.state_to_dict(state)
  start = time.perf_counter()
  checksums.record(tree)   # compiled once per array shape and run
  compile_and_first = time.perf_counter() - start
  runs: dict[str, list[dict]] = {'verified': [], 'unverified': []}
  sums = []
  for i in range(args.repeats + 1):   # the first pair warms up orbax and the page cache
    for name in ('verified', 'unverified'):
      with tempfile.TemporaryDirectory() as directory:
        result = measure(state, layout, directory, name == 'verified')
      if i:
        runs[name].append(result)
    start = time.perf_counter()
    checksums.record(tree)
    sums.append(time.perf_counter() - start)
  leaves = jax.tree.leaves(tree)
  print(json.dumps({
      'preset': f'flan_t5/{args.preset}', 'arrays': len(leaves),
      'bytes': sum(x.nbytes for x in leaves), 'devices': jax.device_count(),
      'repeats': args.repeats, 'checksum': round(statistics.median(sums[1:]), 3),
      'checksum_first_call': round(compile_and_first, 3),
      **{name: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
         for name, rs in runs.items()}}))


if __name__ == '__main__':
  main()
