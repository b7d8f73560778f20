"""`t5x-lite convert` / `infer` / `export` on a Hugging Face causal LM (#32 part 3): a random
Qwen2 with its own tokenizer.json (no BOS, EOS and PAD not T5's) converts with its tokenizer,
`infer --mode=score` gives transformers' log-likelihood of the same ids, and the export is a
directory AutoModelForCausalLM and AutoTokenizer load, weights bit-exact."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from safetensors.numpy import load_file  # pylint: disable=wrong-import-position

from t5x_lite import cli  # pylint: disable=wrong-import-position
from t5x_lite.data import vocab as vocab_lib  # pylint: disable=wrong-import-position
from t5x_lite.training import loop  # pylint: disable=wrong-import-position
from tests.data.test_hf_tokenizer import _bpe  # pylint: disable=wrong-import-position
from tests.models.test_hf_causal import _randomize  # pylint: disable=wrong-import-position

VOCAB = 384


# Qwen2's pre-tokenizer, as its tokenizer.json has it (transformers 5's Qwen2Tokenizer puts
# it in place of whatever a config.json with model_type qwen2 ships beside it).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope='module')
def qwen_dir(tmp_path_factory):
  tok = _bpe({'eos': '<|im_end|>', 'pad': '<|endoftext|>'})
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  path = str(tmp_path_factory.mktemp('qwen_hf'))
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|endoftext|>').save_pretrained(path)
  config = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
      eos_token_id=tok.token_to_id('<|im_end|>'), pad_token_id=tok.token_to_id('<|endoftext|>'),
      bos_token_id=None)
  model = transformers.Qwen2ForCausalLM(config).eval()
  _randomize(model, seed=3, gemma=False)
  model.save_pretrained(path)
  return path, model


def test_convert_score_and_export_a_qwen_directory(qwen_dir, tmp_path, capsys):
  path, hf_model = qwen_dir
  model_dir, exported = str(tmp_path / 'run'), str(tmp_path / 'export')
  assert cli.main(['convert', f'--hf_dir={path}', f'--model_dir={model_dir}']) == 0
  assert "vocabulary '" + os.path.join(model_dir, 'tokenizer') in capsys.readouterr().out
  assert "architecture = 'qwen2'" in open(os.path.join(model_dir, 'model.gin')).read()
  # A warm start with another vocabulary (finetune.gin's 'byte' given after model.gin) is
  # refused before training: its ids would mean other tokens.
  with pytest.raises(loop.TrainingError,
                     match="trained with the vocabulary .*tokenizer'.* uses 'byte'"):
    loop._check_init_vocabulary(model_dir, vocab_lib.get_vocabulary('byte'))  # pylint: disable=protected-access
  loop._check_init_vocabulary(model_dir, vocab_lib.get_vocabulary(  # pylint: disable=protected-access
      os.path.join(model_dir, 'tokenizer')))

  rows = [{'inputs': 'What is 12 plus 30?', 'targets': 'It is 42.'},
          {'inputs': 'The quick brown fox', 'targets': 'jumps!'}]
  (tmp_path / 'in.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  assert cli.main(['infer', f'--model_dir={model_dir}', '--mode=score',
                   f'--input_file={tmp_path / "in.jsonl"}',
                   f'--output_file={tmp_path / "out.jsonl"}', '--max_input_length=24',
                   '--max_decode_length=12']) == 0
  scores = [json.loads(line)['score'] for line in open(tmp_path / 'out.jsonl')]
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  eos = tokenizer.eos_token_id
  for row, score in zip(rows, scores):
    # No BOS (Qwen): the prompt is the inputs' ids and the EOS the pipeline ends them with.
    prompt = tokenizer(row['inputs'], add_special_tokens=False).input_ids + [eos]
    target = tokenizer(row['targets'], add_special_tokens=False).input_ids + [eos]
    with torch.no_grad():
      logits = hf_model(torch.tensor([prompt + target])).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    theirs = float(log_probs[np.arange(len(target)), target].sum())
    assert score == pytest.approx(theirs, abs=2e-4)

  assert cli.main(['export', f'--model_dir={model_dir}', f'--hf_dir={exported}']) == 0
  original, written = (load_file(os.path.join(d, 'model.safetensors')) for d in (path, exported))
  original.pop('lm_head.weight', None)   # tied: transformers' save leaves it out too
  assert sorted(written) == sorted(original)
  assert all(np.array_equal(written[k], v) for k, v in original.items())
  again = transformers.AutoTokenizer.from_pretrained(exported)
  assert again(rows[0]['inputs']).input_ids == tokenizer(rows[0]['inputs']).input_ids
  assert type(transformers.AutoModelForCausalLM.from_pretrained(exported)).__name__ == \
      'Qwen2ForCausalLM'
