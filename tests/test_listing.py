"""`t5x-lite models`: both families' presets with their parameter counts."""

from t5x_lite import cli


def test_models_lists_t5_and_decoder_only_presets(capsys):
  assert cli.main(['models']) == 0
  rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
          if line.strip()}
  assert rows['llama3/8b'][1] == '8,030,261,248' and rows['gemma/2b'][-2:] == ['gemma,', 'tied']
  assert rows['qwen2_5/0.5b'][1] == '494,032,768'
  assert 'flan_t5/small' in rows
  assert cli.main(['models', '--family=qwen3']) == 0
  firsts = [l.split()[0] for l in capsys.readouterr().out.splitlines() if l.strip()]
  listed = [name for name in firsts if '/' in name]
  assert listed and all(name.startswith('qwen3/') for name in listed)
