"""Checkpoints against Hugging Face transformers' PyTorch models (marked `torch`)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget import checkpoints
from qtarget import tokenizer as tokenizer_lib
from qtarget.models import llama

torch = pytest.importorskip('torch', reason='parity tests need torch==2.13.0 (the test extra)')
transformers = pytest.importorskip('transformers')
pytestmark = pytest.mark.torch

VOCAB = 96


def _randomize(model):
  """Weights large enough that a wrong mapping cannot hide behind a small init."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'norm' in name:
        param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
      else:
        param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
  return model


def _save_tiny(kind, directory, **kwargs):
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
  if kind == 'llama':
    config = transformers.LlamaConfig(
        **common, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                      'high_freq_factor': 4.0, 'original_max_position_embeddings': 16})
    model = transformers.LlamaForCausalLM(config)
  else:
    config = transformers.Qwen2Config(**common, rope_theta=1000.0, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config)
  _randomize(model).eval()
  model.save_pretrained(directory, **kwargs)
  return model


@pytest.fixture(scope='module', params=['llama', 'qwen2'])
def tiny_checkpoint(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  return request.param, _save_tiny(request.param, directory), directory


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (3, 10))
  mask = np.ones((3, 10), bool)
  mask[1, 7:] = False  # right padding
  mask[2, :4] = False  # left padding
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def _reference_logits(hf_model, tokens, mask, positions):
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                   position_ids=torch.tensor(positions))
  return out.logits.numpy()


def test_logits_match_transformers_with_padding(tiny_checkpoint):
  kind, hf_model, directory = tiny_checkpoint
  model = checkpoints.load_hf(directory)
  assert model.config.architecture == kind
  assert model.config.attention_bias == (kind == 'qwen2')
  assert (model.config.rope_scaling is not None) == (kind == 'llama')
  tokens, mask, positions = _batch()
  ours = np.asarray(model(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(mask, jnp.int32),
                          positions_BxT=jnp.asarray(positions)))
  reference = _reference_logits(hf_model, tokens, mask, positions)
  assert np.abs(reference).max() > 1.0  # a meaningful scale
  np.testing.assert_allclose(ours[mask], reference[mask], atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
  hf_model = _save_tiny('llama', tmp_path, max_shard_size='20KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  assert len(list(tmp_path.glob('model-*.safetensors'))) > 1
  model = checkpoints.load_hf(tmp_path)
  tokens, mask, positions = _batch()
  ours = model(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(mask, jnp.int32),
               positions_BxT=jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(ours)[mask],
                             _reference_logits(hf_model, tokens, mask, positions)[mask], atol=1e-4)


def test_export_round_trip(tiny_checkpoint, tmp_path):
  kind, _, directory = tiny_checkpoint
  model = checkpoints.load_hf(directory, lora_rank=2, seed=1)
  for _, variable in nnx.iter_graph(model):  # a trained adapter: export must merge it
    if isinstance(variable, llama.LoRAParam):
      variable.set_value(jnp.full(variable.get_value().shape, 0.05))
  checkpoints.export_hf(model, tmp_path / 'export')
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'export').eval()
  assert type(exported).__name__ == checkpoints.SUPPORTED_ARCHITECTURES[kind]
  tokens, mask, positions = _batch()
  ours = np.asarray(model(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(mask, jnp.int32),
                          positions_BxT=jnp.asarray(positions)))
  np.testing.assert_allclose(ours[mask], _reference_logits(exported, tokens, mask, positions)[mask],
                             atol=1e-4)
  # And back into ours: the merged weights give the adapted model's logits without adapters.
  reloaded = checkpoints.load_hf(tmp_path / 'export')
  np.testing.assert_allclose(
      np.asarray(reloaded(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(mask, jnp.int32),
                          positions_BxT=jnp.asarray(positions)))[mask], ours[mask], atol=1e-4)


# Bad input.

def test_unsupported_architecture_names_the_supported_ones(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt2',
                                                    'architectures': ['GPT2LMHeadModel']}))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"unsupported architecture: model_type 'gpt2'.*llama \(LlamaForCausalLM\), "
                           r'qwen2 \(Qwen2ForCausalLM\)'):
    checkpoints.load_hf(tmp_path)


def test_missing_safetensors(tiny_checkpoint, tmp_path):
  _, _, directory = tiny_checkpoint
  shutil.copy(directory / 'config.json', tmp_path / 'config.json')
  with pytest.raises(FileNotFoundError, match='no model.safetensors'):
    checkpoints.load_hf(tmp_path)


def test_missing_shard(tmp_path):
  _save_tiny('llama', tmp_path, max_shard_size='20KB')
  sorted(tmp_path.glob('model-*.safetensors'))[-1].unlink()
  with pytest.raises(FileNotFoundError, match='lists shard'):
    checkpoints.load_hf(tmp_path)


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
  _, _, directory = tiny_checkpoint
  shutil.copy(directory / 'config.json', tmp_path / 'config.json')
  data = (directory / 'model.safetensors').read_bytes()
  (tmp_path / 'model.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(checkpoints.CheckpointError, match='model.safetensors.*truncated'):
    checkpoints.load_hf(tmp_path)


def test_wrong_shape_in_checkpoint(tiny_checkpoint, tmp_path):
  _, _, directory = tiny_checkpoint
  shutil.copy(directory / 'model.safetensors', tmp_path / 'model.safetensors')
  config = json.loads((directory / 'config.json').read_text())
  config['intermediate_size'] = 40
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(checkpoints.CheckpointError, match=r'shape \(32, 48\) does not match .*\(32, 40\)'):
    checkpoints.load_hf(tmp_path)


def test_tokenizer_vocabulary_larger_than_model(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {f't{i}': i for i in range(VOCAB + 5)}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='t0'))
  tok = tokenizer_lib.Tokenizer(backend, chat_template=None, bos_token=None, eos_token='t1')
  with pytest.raises(ValueError, match=f'tokenizer has {VOCAB + 5} tokens but the model embeds '
                                       f'only {VOCAB}'):
    tok.check_model_vocabulary(VOCAB)
  tok.check_model_vocabulary(VOCAB + 5)
