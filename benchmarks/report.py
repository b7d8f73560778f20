"""Run every benchmark and write benchmarks/RESULTS.md: each figure beside the
`transformers`/torch figure measured in the same run, the ratio, the target, the machine
and the versions.

  python benchmarks/report.py                       # runs all three (about 20 minutes here)
  python benchmarks/report.py --from_json a.json b.json c.json   # table from saved lines
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ('data_pipeline', 'train_step', 'decode')


def run(name: str) -> dict:
  out = subprocess.run([sys.executable, os.path.join(HERE, f'{name}.py')], capture_output=True,
                       text=True, timeout=1800, cwd=os.path.dirname(HERE),
                       env={**os.environ, 'PYTHONPATH': os.path.dirname(HERE)})
  if out.returncode:
    raise SystemExit(f'{name}.py failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x, digits=3):
  if x is None:
    return ''
  if isinstance(x, bool):
    return 'yes' if x else 'no'
  if isinstance(x, (int, float)):
    return f'{x:,.{digits}g}' if abs(x) < 1000 else f'{x:,.0f}'
  return str(x)


def rows_data_pipeline(r: dict) -> list[tuple]:
  rows = []
  for vocab in ('byte_vocab', 't5_spiece_vocab'):
    if vocab in r:
      v = r[vocab]
      label = f'pipeline, builtin mixture, {vocab.replace("_", " ")}, batch 64 x 512/128'
      rows.append((f'{label}: packed batches/s', v['batches_per_s'], None, None, ''))
      rows.append((f'{label}: examples/s', v['examples_per_s'], None, None, ''))
      rows.append((f'{label}: packing efficiency (non-pad, all tokens)', v['efficiency_all'],
                   None, None, '>= 0.90'))
      rows.append((f'{label}: x faster than the flan-t5-small fwd+bwd step it feeds',
                   v['x_faster_than_train_step'], None, None, '>= 20'))
  p = r.get('parquet')
  if p:
    label = (f'pipeline, {p["rows"]:,}-row Parquet file, {p["tasks"]} tasks by where=, '
             f'{p["vocab"]} vocab, batch 64 x 512/128')
    rows.append((f'{label}: examples/s', p['examples_per_s'], None, None, ''))
    rows.append((f'{label}: x faster than the flan-t5-small fwd+bwd step it feeds',
                 p['x_faster_than_train_step'], None, None, '>= 20'))
  return rows


def rows_train_step(r: dict) -> list[tuple]:
  rows = []
  for case, c in r['cases'].items():
    ours = c['ours']['steps_per_s']
    rows.append((f'train step {case}: steps/s vs HF torch.compile', ours,
                 c['hf_compiled']['steps_per_s'], c['ours_over_hf_compiled'],
                 '>= 1.1' if case == 'small_fp32' else ''))
    rows.append((f'train step {case}: steps/s vs HF eager', ours, c['hf_eager']['steps_per_s'],
                 c['ours_over_hf_eager'], ''))
    rows.append((f'train step {case}: FLOP/s as a fraction of a matmul (ours; HF compiled)',
                 c['ours'].get('flop_fraction_of_matmul'),
                 c['hf_compiled'].get('flop_fraction_of_matmul'), None, ''))
  for case, why in r.get('skipped_cases', {}).items():
    rows.append((f'train step {case}: not run ({why})', None, None, None, ''))
  d = r.get('decoder_only')
  if d:
    label = (f'train step decoder-only ({d.get("name", d["model"])}), fp32, batch {d["batch"]} x '
             f'{d["length"]}')
    names = {'hf_compiled': 'torch.compile', 'hf_eager': 'eager'}
    other = 'hf_eager' if d['hf_best'] == 'hf_compiled' else 'hf_compiled'
    rows.append((f'{label}: steps/s vs HF\'s faster setting ({names[d["hf_best"]]})',
                 d['ours']['steps_per_s'], d[d['hf_best']]['steps_per_s'], d['ours_over_hf_best'],
                 ''))
    rows.append((f'{label}: steps/s vs HF {names[other]}', d['ours']['steps_per_s'],
                 d[other]['steps_per_s'], d[f'ours_over_{other}'], ''))
    rows.append((f'{label}: FLOP/s as a fraction of a matmul (ours; HF compiled)',
                 d['ours'].get('flop_fraction_of_matmul'),
                 d['hf_compiled'].get('flop_fraction_of_matmul'), None, ''))
  u = r.get('useful_tokens')
  if u and 'ours_over_hf_padded_to_longest' in u:
    best = u['hf_best_padded_to_longest'].replace('hf_longest_', '').replace('_', ' ')
    rows.append((f'useful (non-pad) tokens/s, builtin mixture: packed (ours) vs HF padded per '
                 f'batch to its longest (DataCollatorForSeq2Seq; best of eager / compile '
                 f'dynamic / compile per bucket: {best})', u['ours_tokens_per_s'],
                 u['hf_padded_to_longest_tokens_per_s'], u['ours_over_hf_padded_to_longest'],
                 '>= 2'))
    full = u.get('padded_to_full_length')
    if full:
      rows.append(('useful (non-pad) tokens/s, builtin mixture: packed (ours) vs HF one example '
                   f'per row padded to 256/64 ({full["hf"]}; step-table steps/s x tokens)',
                   full['ours_tokens_per_s'], full['hf_tokens_per_s'], full['ours_over_hf'], ''))
  elif u:  # a line saved before the padded-to-longest measurement
    rows.append(('useful (non-pad) tokens/s: packed (ours) vs padded (HF compiled)',
                 u['ours_tokens_per_s'], u['hf_compiled_tokens_per_s'],
                 u['ours_over_hf_compiled'], '>= 2'))
  return rows


def rows_decode(r: dict) -> list[tuple]:
  rows = []
  for method in ('greedy', 'beam4'):
    m = r.get(method) or r.get('methods', {}).get(method)
    if m:
      hf = ''  # lines saved before the static-cache setting measured the dynamic cache only
      if 'hf_best' in m:
        hf = (', the faster of dynamic cache / static cache + compile: '
              + m['hf_best'].replace('hf_', '').replace('_', ' '))
      rows.append((f'decode {method}: generated tokens/s vs HF generate{hf} (flan-t5-small, '
                   f'batch 8, 256 in, 64 new; rows identical {m.get("rows_identical", "?")})',
                   m['ours_tokens_per_s'], m['hf_tokens_per_s'], m['ours_over_hf'], '>= 2'))
  d = r.get('decoder_only')
  if d:
    m = d['greedy']
    hf = m['hf_best'].replace('hf_', '').replace('_', ' ')
    name = d.get('name', d['model'])
    rows.append((f'decode decoder-only greedy: generated tokens/s vs HF generate, the faster of '
                 f'dynamic cache / static cache + compile: {hf} ({name}, batch '
                 f'{d["batch"]}, {d["prompt_length"]}-token prompts, {d["new_tokens"]} new; rows '
                 f'identical {m["rows_identical"]})', m['ours_tokens_per_s'],
                 m['hf_tokens_per_s'], m['ours_over_hf'], ''))
  return rows


EXTRACT = {'data_pipeline': rows_data_pipeline, 'train_step': rows_train_step,
           'decode': rows_decode}


def write(results: dict[str, dict], path: str) -> None:
  lines = ['# Benchmark results', '',
           f'Generated by `python benchmarks/report.py` on {datetime.date.today()} '
           f'({platform.machine()}, {os.cpu_count()} CPUs). Each row: our figure, the '
           'transformers/torch figure measured in the same run, their ratio and the target.', '',
           '| figure | t5x_lite | transformers | ratio | target |', '|---|---:|---:|---:|---|']
  for name in BENCHMARKS:
    if name in results:
      for label, ours, theirs, ratio, target in EXTRACT[name](results[name]):
        lines.append(f'| {label} | {_fmt(ours)} | {_fmt(theirs)} | {_fmt(ratio)} | {target} |')
  lines += ['', '## Machine and versions', '']
  for name, r in results.items():
    for key in ('machine', 'versions', 'warning'):
      if key in r:
        lines.append(f'- {name} {key}: `{json.dumps(r[key])}`')
  lines += ['', '## Raw JSON lines', '']
  for name, r in results.items():
    lines += [f'<details><summary>{name}</summary>', '', '```json', json.dumps(r), '```', '',
              '</details>', '']
  lines += kept_sections(path)
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


KEPT = ('## Device benchmark',)  # written by hand from benchmarks/device.py on a lent device


def kept_sections(path: str) -> list[str]:
  """The sections of the old file that no benchmark here regenerates (KEPT), as they were."""
  if not os.path.exists(path):
    return []
  kept, keep = [], False
  with open(path) as f:
    for line in f.read().splitlines():
      if line.startswith('## '):
        keep = line.startswith(KEPT)
      if keep:
        kept.append(line)
  return [''] + kept if kept else []


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--from_json', nargs='*', default=None,
                      help='files with one benchmark JSON line each, instead of running')
  parser.add_argument('--output', default=os.path.join(HERE, 'RESULTS.md'))
  args = parser.parse_args()
  results = {}
  if args.from_json:
    for file in args.from_json:
      r = json.loads(open(file).read().strip().splitlines()[-1])
      name = r.get('benchmark') or next(n for n in BENCHMARKS if n in os.path.basename(file))
      results[name] = r
  else:
    for name in BENCHMARKS:
      print(f'running {name}.py ...', flush=True)
      results[name] = run(name)
  write(results, args.output)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
