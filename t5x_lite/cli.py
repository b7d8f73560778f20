"""`t5x-lite` command line. Each subcommand is one function below; gin is parsed only here."""

from __future__ import annotations

import argparse
import sys

import t5x_lite


def cmd_models(args: argparse.Namespace) -> int:
  """List the model presets (family/size) with their architecture and parameter count."""
  from t5x_lite import models  # pylint: disable=import-outside-toplevel
  print(f'{"preset":<16} {"params":>16} {"d_model":>8} {"heads":>6} {"d_ff":>6} '
        f'{"layers":>7} {"vocab":>7}  mlp')
  for name, c in models.all_presets().items():
    if args.family and not name.startswith(args.family + '/'):
      continue
    layers = f'{c.num_encoder_layers}/{c.num_decoder_layers}'
    print(f'{name:<16} {models.num_params(c):>16,} {c.d_model:>8} {c.num_heads:>6} {c.d_ff:>6} '
          f'{layers:>7} {c.vocab_size:>7}  {c.feed_forward_proj}'
          f'{"" if c.tie_word_embeddings else ", untied lm_head"}')
  print(f'\nGin: gin_configs/models/<family>/<size>.gin')
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='t5x-lite', description='Multi-task instruction fine-tuning of T5-family models.')
  parser.add_argument('--version', action='version', version=f't5x_lite {t5x_lite.__version__}')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  p = sub.add_parser('models', help=cmd_models.__doc__.splitlines()[0])
  p.add_argument('--family', default=None, help='only this family (t5_1_0, flan_t5, mt5, ...)')
  p.set_defaults(func=cmd_models)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == '__main__':
  sys.exit(main())
