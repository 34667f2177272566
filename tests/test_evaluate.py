"""Batched greedy generation with the KV cache equals a plain greedy loop; scoring."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget import evaluate
from qtarget.models import llama

VOCAB, EOS = 50, 2


class _DigitsTokenizer:
  """Prompts are space-separated ids; outputs decode to the same form."""
  eos_id = EOS

  def encode_prompt(self, prompt):
    return [int(t) for t in prompt.split()]

  def decode(self, ids):
    return ' '.join(str(int(i)) for i in ids)


@nnx.jit
def _last_logits(model, tokens):
  return model(tokens)[0, -1]


def _greedy_without_cache(model, ids, steps):
  ids = list(ids)
  out = []
  for _ in range(steps):
    next_id = int(jnp.argmax(_last_logits(model, jnp.asarray([ids]))))
    if next_id == EOS:
      break
    out.append(next_id)
    ids.append(next_id)
  return out


def test_batched_generation_equals_plain_greedy_decoding():
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_layers=2, num_heads=4, num_kv_heads=2)
  model = llama.Llama(config, rngs=nnx.Rngs(3))
  for _, variable in nnx.iter_graph(model):  # sharper distributions: fewer near-ties
    if isinstance(variable, nnx.Param) and variable.get_value().ndim == 2:
      variable.set_value(variable.get_value() * 8)
  rng = np.random.default_rng(0)
  prompts = [' '.join(str(t) for t in rng.integers(3, VOCAB, n)) for n in (5, 9, 2, 7, 3)]
  outputs = evaluate.generate(model, _DigitsTokenizer(), prompts, max_new_tokens=6,
                              batch_size=4)  # two batches, the second one padded with filler
  assert len(outputs) == len(prompts)
  for prompt, output in zip(prompts, outputs):
    expected = _greedy_without_cache(model, _DigitsTokenizer().encode_prompt(prompt), 6)
    assert output == ' '.join(map(str, expected)), prompt


def test_evaluate_scores_and_keeps_every_prediction(monkeypatch):
  records = [{'prompt': 'q1', 'answer': '12', 'task': 'file', 'metadata': '{}'},
             {'prompt': 'q2', 'answer': '7', 'task': 'file', 'metadata': '{}'}]
  monkeypatch.setattr(evaluate, 'generate',
                      lambda *a, **k: ['so it is 12', 'I think 8\n#### 8'])
  result = evaluate.evaluate(None, None, records)
  assert result.accuracy == 0.5
  assert [p['extracted'] for p in result.predictions] == ['12', '8']
  assert [p['score'] for p in result.predictions] == [1.0, 0.0]
  assert set(result.predictions[0]) >= {'task', 'question', 'gold', 'output', 'extracted', 'score'}
