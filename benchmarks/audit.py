"""Contamination audit speed (issue #30): 100,000 training examples x 10,000 eval examples.

Real text, with a known number of contaminated eval examples planted among the eval ones.

The text is ../shared/data's (SST-2, Multi30k, XSum), repeated as needed: every task is a
`file_task` over a JSONL file, as gin_configs/mixtures/real_example.gin reads them (its first
template and field_map), the repeated files written to a temporary directory.

  training (`--train`, split 40/40/20): SST-2 train (2,000 sentences, repeated), Multi30k
    en->de train (2,000 pairs, repeated), XSum articles 500-999 (500, repeated).
  eval (10,000): SST-2 validation (872) and test (1,821); Multi30k validation in all four
    directions (4 x 1,014) and test en->de, en->fr (2 x 1,000); XSum articles 0-499 (500);
    and `planted` (751): Multi30k de->en test pairs with `--planted` rows put among them, a
    third each: an SST-2 training sentence and its label and a Multi30k training pair (exact
    duplicates, written in capitals with extra punctuation), and a 20-word passage of an XSum
    training article inside a de->en caption (a 13-gram overlap).

Prints one JSON line: the audit's seconds (the `audit()` call: hashing the eval side,
streaming the training side, the report) against the 60 s target, training examples and
words (normalised units) per second, the seconds to build the tasks (writing the files,
reading every line) apart, `found` against `planted` (planted rows the audit reports
contaminated) and `extra` (other rows of `planted` it reports), and what it finds in the real
eval sets (`natural`: contaminated examples per eval task; SST-2's training file holds
phrases, so some short ones recur in its eval splits).

  python benchmarks/audit.py [--train 100000] [--planted 60]
  python benchmarks/audit.py --quick       # 10,000 training examples: checks it all runs
  python benchmarks/audit.py --profile 25  # + cProfile's top 25 functions (stderr)
"""

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
  sys.path.insert(0, REPO)

DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data')
EVAL_EXAMPLES = 10_000
XSUM_EVAL = 500          # XSum's first 500 articles are eval, the other 500 training
TARGET_S = 60.0
TEMPLATES = {   # real_example.gin's first template of each task
    'sst2': ('Review:\n{sentence}\nIs this movie review sentence negative or positive?'
             '{options_}', '{answer}'),
    'multi30k': ('Translate:\n\n{sentence}', '{translation}'),
    'xsum': ('Summarize this article in one sentence:\n\n{article}', '{summary}'),
}
FIELDS = {'sst2': {'sentence': 'inputs', 'answer': 'targets'},
          'multi30k': {'sentence': 'inputs', 'translation': 'targets'},
          'xsum': {'article': 'inputs', 'summary': 'targets'}}


def read_lines(path, rows=slice(None)):
  with open(path, encoding='utf-8') as f:
    return [line for line in f.read().splitlines() if line.strip()][rows]


def write_lines(path, lines):
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def repeated(lines, count):
  return (lines * (count // len(lines) + 1))[:count]


def make_task(name, kind, files, data_dir):
  from t5x_lite.data import file_tasks
  return file_tasks.file_task(
      name, files, [TEMPLATES[kind]], data_dir=data_dir, field_map=FIELDS[kind],
      options=['negative', 'positive'] if kind == 'sst2' else None, register=False)


def shout(text):
  """The same normalised units, written differently: capitals, doubled punctuation."""
  return '  '.join(text.upper().split(' ')) + ' !!'


def planted_rows(data, sst2_train, m30k_train, xsum_train, count, planted):
  """The `planted` eval file: de->en test pairs, `planted` of them replaced by copies of
  training content (their row numbers returned too)."""
  filler = read_lines(os.path.join(data, 'multi30k', 'test.de-en.jsonl'))
  rows = repeated(filler, count)
  rng = random.Random(0)
  positions = sorted(rng.sample(range(count), planted))
  for k, position in enumerate(positions):
    if k % 3 == 0:
      row = json.loads(rng.choice(sst2_train))
      row = {'inputs': shout(row['inputs']), 'targets': row['targets'].upper()}
    elif k % 3 == 1:
      row = json.loads(rng.choice(m30k_train))
      row = {'inputs': shout(row['inputs']), 'targets': shout(row['targets'])}
    else:
      words = json.loads(rng.choice(xsum_train))['inputs'].split()
      start = rng.randrange(max(1, len(words) - 20))
      row = json.loads(rows[position])
      row['inputs'] += ' ' + ' '.join(words[start:start + 20])
    rows[position] = json.dumps(row, ensure_ascii=False)
  return rows, positions


def build(data, tmp, train_count, planted):
  """(eval sets, training tasks, planted row numbers, training units per task)."""
  from t5x_lite.evaluation import contamination
  sst2_train = read_lines(os.path.join(data, 'sst2', 'train.jsonl'))
  m30k_train = read_lines(os.path.join(data, 'multi30k', 'train.en-de.jsonl'))
  xsum_train = read_lines(os.path.join(data, 'xsum', 'test.jsonl'), slice(XSUM_EVAL, None))
  counts = {'sst2_train': train_count * 2 // 5, 'multi30k_en_de_train': train_count * 2 // 5}
  counts['xsum_train'] = train_count - sum(counts.values())
  sources = {'sst2_train': ('sst2', sst2_train), 'multi30k_en_de_train': ('multi30k', m30k_train),
             'xsum_train': ('xsum', xsum_train)}
  training, units = [], {}
  for name, (kind, lines) in sources.items():
    write_lines(os.path.join(tmp, f'{name}.jsonl'), repeated(lines, counts[name]))
    training.append(make_task(name, kind, {'train': f'{name}.jsonl'}, tmp))
    per_line = [sum(len(contamination.units(v)) for v in json.loads(line).values())
                for line in lines]
    units[name] = sum(repeated(per_line, counts[name]))

  m30k = os.path.join(data, 'multi30k')
  sst2 = make_task('sst2', 'sst2', {'validation': 'validation.jsonl', 'test': 'test.jsonl'},
                   os.path.join(data, 'sst2'))
  directions = {d: make_task(f'multi30k_{d.replace("-", "_")}', 'multi30k',
                             {'validation': f'validation.{d}.jsonl', 'test': f'test.{d}.jsonl'},
                             m30k) for d in ('en-de', 'en-fr', 'de-en', 'fr-en')}
  xsum = make_task('xsum', 'xsum', {'validation': f'test.jsonl[:{XSUM_EVAL}]'},
                   os.path.join(data, 'xsum'))
  sets = [contamination.AuditedSet('sst2_validation', [sst2], 'validation'),
          contamination.AuditedSet('sst2_test', [sst2], 'test'),
          contamination.AuditedSet('multi30k_validation', list(directions.values()),
                                   'validation'),
          contamination.AuditedSet('multi30k_test', [directions['en-de'], directions['en-fr']],
                                   'test'),
          contamination.AuditedSet('xsum', [xsum], 'validation', heldout=True)]
  natural = sum(t.num_examples(s.split) for s in sets for t in s.tasks)
  rows, positions = planted_rows(data, sst2_train, m30k_train, xsum_train,
                                 EVAL_EXAMPLES - natural, planted)
  write_lines(os.path.join(tmp, 'planted.jsonl'), rows)
  planted_task = make_task('planted', 'multi30k', {'validation': 'planted.jsonl'}, tmp)
  sets.append(contamination.AuditedSet('planted', [planted_task], 'validation'))
  return sets, training, positions, units


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--train', type=int, default=100_000, help='training examples')
  parser.add_argument('--planted', type=int, default=60, help='contaminated eval examples')
  parser.add_argument('--quick', action='store_true', help='10,000 training examples')
  parser.add_argument('--data_dir', default=DATA)
  parser.add_argument('--profile', type=int, default=0, metavar='K',
                      help="print cProfile's top K functions of the audit to stderr")
  args = parser.parse_args()
  if args.quick:
    args.train = 10_000
  if not os.path.isdir(args.data_dir):
    print(f'error: {args.data_dir} not found: this benchmark reads the shared real data '
          '(../shared/data, or --data_dir)', file=sys.stderr)
    sys.exit(2)
  load = round(os.getloadavg()[0], 2)
  from t5x_lite.evaluation import contamination
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    sets, training, positions, units = build(args.data_dir, tmp, args.train, args.planted)
    build_s = time.perf_counter() - start
    config = contamination.AuditConfig(examples_per_pair=args.planted + 10)
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
      profiler.enable()
    report = contamination.audit(sets, training, config=config)
    if profiler:
      profiler.disable()
    seconds = time.perf_counter() - start
  if profiler:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats('cumulative').print_stats(args.profile)
    print(out.getvalue(), file=sys.stderr)
  planted = report['sets']['planted']['tasks']['planted']
  shown = {e['eval_index'] for p in planted['pairs'].values() for e in p['examples']}
  found = len(shown & set(positions))
  eval_examples = sum(r['examples'] for s in report['sets'].values()
                      for r in s['tasks'].values())
  train_words = sum(units.values())
  print(json.dumps({
      'benchmark': 'audit', 'train_examples': args.train, 'eval_examples': eval_examples,
      'train_words': train_words, 'train_words_per_task': units, 'n': report['n'],
      'seconds': round(seconds, 2), 'build_tasks_s': round(build_s, 2),
      'train_examples_per_s': round(args.train / seconds),
      'train_words_per_s': round(train_words / seconds),
      'target_s': TARGET_S, 'within_target': seconds <= TARGET_S,
      'planted': args.planted, 'found': found, 'extra': planted['contaminated'] - found,
      'natural': {f'{s}/{t}': r['contaminated'] for s, out in report['sets'].items()
                  if s != 'planted' for t, r in out['tasks'].items() if r['contaminated']},
      'train_scanned': sum(t['scanned'] for t in report['train'].values()),
      'complete': report['complete'],
      'machine': f'{platform.machine()} {os.cpu_count()} cpus',
      'load_average_at_start': load}))


if __name__ == '__main__':
  main()
