"""Batched greedy generation with the KV cache equals a plain greedy loop; scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget import evaluate
from qtarget.data import records
from qtarget.models import llama

VOCAB, EOS = 50, 2


class _DigitsTokenizer:
  """Prompts are space-separated ids; outputs decode to the same form."""
  eos_id = EOS

  def encode_prompt(self, prompt, system=None):
    return [int(t) for t in ((system or '') + ' ' + prompt).split()]

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


def _sharpened_model(seed):
  """A tiny random model with its matrices scaled x8: sharper distributions have fewer
  near-ties, and a wrong position or mask moves its outputs visibly."""
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_layers=2, num_heads=4, num_kv_heads=2)
  model = llama.Llama(config, rngs=nnx.Rngs(seed))
  for _, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param) and variable.get_value().ndim == 2:
      variable.set_value(variable.get_value() * 8)
  return model


def test_batched_generation_equals_plain_greedy_decoding():
  model = _sharpened_model(3)
  rng = np.random.default_rng(0)
  prompts = [' '.join(str(t) for t in rng.integers(3, VOCAB, n)) for n in (5, 9, 2, 7, 3)]
  outputs = evaluate.generate(model, _DigitsTokenizer(), prompts, max_new_tokens=6,
                              batch_size=4)  # two batches, the second one padded with filler
  assert len(outputs) == len(prompts)
  for prompt, output in zip(prompts, outputs):
    expected = _greedy_without_cache(model, _DigitsTokenizer().encode_prompt(prompt), 6)
    assert output == ' '.join(map(str, expected)), prompt


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
  assert evaluate.shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
  assert evaluate.shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]  # the last one is kept
  assert evaluate.shared_prefix([[7], [7, 8]]) == []
  assert evaluate.shared_prefix([[1, 2], [3, 2]]) == [] and evaluate.shared_prefix([]) == []


def test_prefill_with_a_shared_prefix_equals_the_whole_prompt():
  """The prefix's cache copied to rows of different lengths, then each row's left-padded rest:
  the logits of every real token and the next position are those of the whole prompt alone."""
  model = _sharpened_model(5)
  prefix = [5, 9, 3, 7, 11, 2]
  rests = [[4, 8, 1], [6], [12, 13, 14, 15, 16, 17, 18, 19]]
  width = 8
  tokens = np.zeros((len(rests), width), np.int32)
  valid = np.zeros((len(rests), width), bool)
  for i, rest in enumerate(rests):
    tokens[i, width - len(rest):], valid[i, width - len(rest):] = rest, True
  hidden, _, next_position = nnx.jit(evaluate.prefill, static_argnums=(4,))(
      model, jnp.asarray([prefix]), jnp.asarray(tokens), jnp.asarray(valid), 20)
  for i, rest in enumerate(rests):  # every real token, against the whole prompt's forward
    whole = model(jnp.asarray([prefix + rest]))[0, len(prefix):]
    np.testing.assert_allclose(model.logits(hidden[i, width - len(rest):]), whole, atol=1e-4,
                               rtol=1e-5)
    assert int(next_position[i]) == len(prefix) + len(rest)


def test_prompts_with_a_shared_prefix_equal_plain_greedy_decoding():
  """The shared prefix runs once and its cache is copied to every row (filler rows too); each
  answer equals greedy decoding of the whole prompt alone, without a cache."""
  model = _sharpened_model(4)
  rng = np.random.default_rng(1)
  common = ' '.join(str(t) for t in rng.integers(3, VOCAB, 11))
  tails = ['', *(' '.join(str(t) for t in rng.integers(3, VOCAB, n)) for n in (4, 1, 7, 2))]
  prompts = [f'{common} {tail}'.strip() for tail in tails]
  encoded = [_DigitsTokenizer().encode_prompt(p) for p in prompts]
  assert len(evaluate.shared_prefix(encoded)) == 10  # the bare prompt keeps its last token
  outputs = evaluate.generate(model, _DigitsTokenizer(), prompts, max_new_tokens=6,
                              batch_size=4)  # two batches, the second with filler rows
  assert outputs == [' '.join(map(str, _greedy_without_cache(model, e, 6))) for e in encoded]
  assert len(set(outputs)) > 2  # the tails matter: not one answer copied to every row


def test_generation_stops_when_every_row_has_ended_and_keeps_the_rest():
  """A batch whose rows all end before max_new_tokens (the loop stops early) and one where
  some rows run to the limit: both equal plain greedy decoding, which the stop must not cut."""
  model = _sharpened_model(2)
  rng = np.random.default_rng(0)
  prompts = [' '.join(str(t) for t in rng.integers(3, VOCAB, n)) for n in (5, 9, 2, 7, 3, 4, 6, 8)]
  prompts = [prompts[i] for i in (2, 3, 4, 5, 0, 7, 6)]
  steps = 12
  expected = [_greedy_without_cache(model, _DigitsTokenizer().encode_prompt(p), steps)
              for p in prompts]
  lengths = [len(e) for e in expected]
  assert max(lengths[:4]) < steps - 2 and 0 in lengths[:4]  # the first batch ends early
  assert steps in lengths[4:] and min(lengths[4:]) < steps  # the second one only partly
  outputs = evaluate.generate(model, _DigitsTokenizer(), prompts, max_new_tokens=steps,
                              batch_size=4)
  assert outputs == [' '.join(map(str, e)) for e in expected]

  # The loop itself: step i emits token i, so a batch whose longest answer has n tokens (then
  # its end of turn) runs n + 1 steps; filler rows count as ended, so three prompts in a batch
  # of four stop there too instead of running to max_new_tokens.
  graphdef, state = nnx.split(model)
  for batch in (prompts[:4], prompts[:3], prompts[1:2]):
    encoded = [_DigitsTokenizer().encode_prompt(p) for p in batch]
    tokens, valid, real = evaluate.left_padded_batch(encoded, 4)
    assert real.tolist() == [i < len(batch) for i in range(4)]
    generated, ran = evaluate._generate(
        graphdef, state, jnp.zeros((1, 0), jnp.int32), tokens, valid, real, jax.random.key(0),
        0.0, 1.0, max_new_tokens=steps, eos_id=EOS, lora=True)
    assert int(ran) == max(lengths[prompts.index(p)] for p in batch) + 1 < steps
    assert (np.asarray(generated)[len(batch):] == EOS).all()


def test_left_padded_batch_rejects_what_it_cannot_pad():
  with pytest.raises(ValueError, match='3 prompts .* for 2 rows'):
    evaluate.left_padded_batch([[1], [2], [3]], 2)
  with pytest.raises(ValueError, match='each at least one token'):
    evaluate.left_padded_batch([[1], []], 2)


def _small_model(seed=3):
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_layers=2, num_heads=4, num_kv_heads=2)
  return llama.Llama(config, rngs=nnx.Rngs(seed))


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
  model = _small_model()
  prompts = ['5 6 7', '9 9', '3 4 5 6']
  kwargs = dict(max_new_tokens=8, batch_size=4)
  greedy = evaluate.generate(model, _DigitsTokenizer(), prompts, **kwargs)
  # A nucleus of (almost) zero mass keeps only the top token: greedy again.
  assert evaluate.generate(model, _DigitsTokenizer(), prompts, temperature=1.0, top_p=1e-6,
                           **kwargs) == greedy
  hot = dict(temperature=2.0, top_p=1.0, **kwargs)
  first = evaluate.generate(model, _DigitsTokenizer(), prompts, seed=1, **hot)
  assert evaluate.generate(model, _DigitsTokenizer(), prompts, seed=1, **hot) == first
  assert evaluate.generate(model, _DigitsTokenizer(), prompts, seed=2, **hot) != first
  assert first != greedy  # a random small model at temperature 2 samples other tokens


def test_next_token_top_p_cutoff():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda p: {int(evaluate._next_token(logits, k, 1.0, p)[0]) for k in keys}
  assert draw(0.5) == {0}
  assert draw(0.75) == {0, 1}
  assert draw(0.85) == {0, 1, 2}
  assert draw(1.0) == {0, 1, 2, 3}
  assert int(evaluate._next_token(logits, keys[0], 0.0, 1.0)[0]) == 0  # temperature 0: argmax


def test_a_rows_sample_does_not_depend_on_the_other_rows():
  """A row whose nucleus fits the candidates keeps its token when another row needs the whole
  vocabulary (a batch-wide switch drew other tokens for it: a part-filled last batch sampled
  differently from the same prompts in a full one)."""
  vocabulary = 1000  # above the 128 candidates
  peaked = jnp.zeros(vocabulary).at[:3].set(jnp.asarray([9.0, 8.5, 8.0]))
  flat = jnp.zeros(vocabulary)
  for key in jax.random.split(jax.random.key(0), 30):
    alone = evaluate._next_token(jnp.stack([peaked, peaked]), key, 1.0, 0.9)
    beside_flat = evaluate._next_token(jnp.stack([peaked, flat]), key, 1.0, 0.9)
    assert int(alone[0]) == int(beside_flat[0]) and int(alone[0]) < 3
    assert int(beside_flat[1]) >= 0
    inactive = evaluate._next_token(jnp.stack([peaked, flat]), key, 1.0, 0.9,
                                    jnp.asarray([True, False]))
    assert int(inactive[0]) == int(alone[0])


@pytest.mark.parametrize('top_p', [0.3, 0.9, 0.999])
def test_next_token_matches_the_nucleus_distribution(top_p):
  # 300 tokens with geometric-ish mass: top_p 0.999 needs more than the 128 candidates, so the
  # full-sort path runs; the others stay within the candidates. Frequencies of 4000 draws are
  # compared with the exact renormalized nucleus (float64 NumPy).
  rng = np.random.default_rng(0)
  logits = np.sort(rng.normal(size=300) * 0.4)[::-1] - 0.015 * np.arange(300)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  kept = np.searchsorted(np.cumsum(probs), top_p) + 1
  assert (kept > evaluate._NUCLEUS_CANDIDATES) == (top_p == 0.999)
  expected = np.zeros(300)
  expected[:kept] = probs[:kept] / probs[:kept].sum()
  batch = jnp.tile(jnp.asarray(logits, jnp.float32), (4000, 1))
  draws = np.asarray(jax.jit(evaluate._next_token)(batch, jax.random.key(1), 1.0, top_p))
  assert draws.max() < kept  # nothing outside the nucleus
  empirical_cdf = np.cumsum(np.bincount(draws, minlength=300)) / draws.size
  # Kolmogorov-Smirnov distance; 0.03 is above its 99% level (1.63 / sqrt(4000) = 0.026).
  assert np.abs(empirical_cdf - np.cumsum(expected)).max() < 0.03
  if kept > evaluate._NUCLEUS_CANDIDATES:  # the full sort ran and reached beyond the candidates
    assert expected[evaluate._NUCLEUS_CANDIDATES:].sum() > 0.07
    assert (draws >= evaluate._NUCLEUS_CANDIDATES).mean() > 0.05


def test_average_and_pass_at_k(monkeypatch):
  records = [{'prompt': 'q1', 'answer': '12', 'task': 'file', 'metadata': '{}'},
             {'prompt': 'q2', 'answer': '7', 'task': 'file', 'metadata': '{}'}]
  outputs = ['12', '13', '12', '5', '6', '8']  # k = 3: problem 1 right twice, problem 2 never
  monkeypatch.setattr(evaluate, 'generate', lambda *a, **k: outputs)
  result = evaluate.evaluate(None, None, records, num_samples=3, temperature=0.7)
  assert result.accuracy == 2 / 6 and result.pass_at_k == 0.5
  assert [p['sample'] for p in result.predictions] == [0, 1, 2, 0, 1, 2]
  assert [p['question'] for p in result.predictions] == ['q1'] * 3 + ['q2'] * 3
  with pytest.raises(ValueError, match='greedy decoding gives one answer'):
    evaluate.evaluate(None, None, records, num_samples=3)


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


@pytest.mark.parametrize('prediction, gold', [
    ('\\frac{1}{2}', '0.5'), ('\\dfrac12', '\\frac{1}{2}'), ('1/2', '\\tfrac{1}{2}'),
    ('x = 5', '5'), ('5.', '5'), ('1,000', '1000'), ('10\\%', '10'), ('90^\\circ', '90'),
    ('\\left( 1, \\frac{1}{2} \\right)', '(1,0.5)'), ('\\sqrt2', '\\sqrt{2}'),
    ('\\text{(A)}', '(A)'), ('-\\frac{3}{4}', '-0.75'), ('\\$18.90', '18.9'),
])
def test_math_equal_accepts_equivalent_answers(prediction, gold):
  # The 21 pairs of our former hand-written checker: math-verify agrees on every one.
  assert evaluate.math_equal(prediction, gold)
  assert evaluate.score({'task': 'numina_math', 'answer': gold, 'metadata': '{}'},
                        prediction) == 1.0


@pytest.mark.parametrize('prediction, gold', [
    ('\\frac{1}{3}', '0.33'), ('2', '-2'), ('(1,2)', '(2,1)'), ('(1,2)', '[1,2]'),
    ('\\sqrt{3}', '\\sqrt{2}'), ('', '0'), ('x', 'y'), ('1/0', '0'),
])
def test_math_equal_rejects_different_answers(prediction, gold):
  assert not evaluate.math_equal(prediction, gold)


def test_boxed_answers_are_extracted_and_scored():
  record = {'task': 'numina_math', 'answer': '\\frac{3}{2}', 'metadata': '{}'}
  output = 'We get $x = \\boxed{\\dfrac{3}{2}}$. Check: \\boxed{1.5} is the same.'
  extracted = records.extract_answer(output, record['answer'])
  assert extracted == '1.5' and evaluate.score(record, extracted) == 1.0


def test_evaluation_prompts_carry_the_system_prompt_as_training_does():
  """A record whose metadata holds a system prompt is generated from the same rendering as the
  training example's prompt: a prefix of the training tokens, system prompt included."""
  import availability  # pylint: disable=g-import-not-at-top
  if availability.smollm2_missing():
    pytest.skip(availability.smollm2_missing())
  from qtarget import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from qtarget.data import pipeline  # pylint: disable=g-import-not-at-top
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.Tokenizer.from_gguf(checkpoints.gguf_reader())
  record = records.record_from_row(
      {'messages': [{'role': 'system', 'content': 'Answer in French.'},
                    {'role': 'user', 'content': 'What is 2+3?'},
                    {'role': 'assistant', 'content': 'cinq'}]}, 'row 1')
  assert records.system_prompt(record) == 'Answer in French.'
  example = pipeline.example_arrays(record, tokenizer, max_length=512, truncate=False)
  seen = []

  class Recording:  # the real tokenizer, recording the prompts generation encodes
    eos_id = tokenizer.eos_id
    decode = staticmethod(tokenizer.decode)

    def encode_prompt(self, prompt, system=None):
      seen.append(tokenizer.encode_prompt(prompt, system=system))
      return [1]

  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                             num_layers=1, num_heads=2, num_kv_heads=1)
  evaluate.evaluate(llama.Llama(config, rngs=nnx.Rngs(0)), Recording(), [record],
                    max_new_tokens=1, batch_size=1)
  training_tokens = list(example['tokens'])
  assert len(seen) == 1 and training_tokens[:len(seen[0])] == list(seen[0])
  assert 'Answer in French.' in tokenizer.decode(seen[0])
  # Without the system prompt the rendering differs (so the check above can fail).
  assert list(tokenizer.encode_prompt(record['prompt'])) != training_tokens[:len(seen[0])]


def test_generation_needs_at_least_one_new_token():
  with pytest.raises(ValueError, match='max_new_tokens must be at least 1'):
    evaluate.generate(_small_model(), _DigitsTokenizer(), ['5 6'], max_new_tokens=0, batch_size=1)


def test_read_predictions_names_the_file_and_line_of_a_bad_prediction(tmp_path):
  path = tmp_path / 'predictions.jsonl'
  path.write_text('{"question": "q0", "score": 1.0}\n\n{"question": "q1", "score": 0.5}\n')
  rows = evaluate.read_predictions(path)  # the blank line is skipped
  assert [r['question'] for r in rows] == ['q0', 'q1']
  assert [evaluate.full_credit(r['score']) for r in rows] == [True, False]  # 0.5 is partial
  with pytest.raises(TypeError, match="a score is a number, got '1.0'"):
    evaluate.full_credit('1.0')
  path.write_text('{"question": "q0", "score": 1.0}\n{"question": "q1"}\n')
  with pytest.raises(ValueError, match=r'predictions.jsonl, line 2: the prediction has no '
                                       r'score \(it has question\)'):
    evaluate.read_predictions(path)
  assert evaluate.read_predictions(path, fields=('question',))[1] == {'question': 'q1'}
  path.write_text('{"question": "q0", "score": 1.0}\n{"question": \n')
  with pytest.raises(ValueError, match='line 2, column 14: not JSON'):
    evaluate.read_predictions(path)
  path.write_text('[1, 2]\n')
  with pytest.raises(ValueError, match='line 1: expected a JSON object, got list'):
    evaluate.read_predictions(path)
  path.write_text('\n')
  with pytest.raises(ValueError, match='no predictions in the file'):
    evaluate.read_predictions(path)
  with pytest.raises(FileNotFoundError, match='missing.jsonl: no such predictions file'):
    evaluate.read_predictions(tmp_path / 'missing.jsonl')


def _wilson_reference(accuracy, n, z=1.959963984540054):
  """The Wilson interval as its definition: the p with (accuracy - p)^2 = z^2 p (1 - p) / n,
  the two roots of a quadratic in p, in float64 from numpy's polynomial solver."""
  a, b, c = 1 + z * z / n, -(2 * accuracy + z * z / n), accuracy * accuracy
  return tuple(sorted(np.roots([a, b, c]).real))


@pytest.mark.parametrize('accuracy, n', [(0.5, 100), (0.105, 256), (0.66, 128), (0.03, 64),
                                         (0.999, 1000), (0.25, 4)])
def test_wilson_interval_solves_its_defining_equation(accuracy, n):
  low, high = evaluate.wilson_interval(accuracy, n)
  np.testing.assert_allclose((low, high), _wilson_reference(accuracy, n), rtol=1e-9, atol=1e-12)
  assert 0.0 <= low < accuracy < high <= 1.0


def test_wilson_interval_known_values_and_ends():
  np.testing.assert_allclose(evaluate.wilson_interval(0.5, 100), (0.403832, 0.596168), atol=1e-6)
  z2 = 1.959963984540054 ** 2
  assert evaluate.wilson_interval(0.0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
  low, high = evaluate.wilson_interval(1.0, 10)
  assert low == pytest.approx(10 / (10 + z2)) and high == pytest.approx(1.0)
  # Narrower with more problems; the 99% interval holds the 95% one.
  assert np.ptp(evaluate.wilson_interval(0.3, 256)) < np.ptp(evaluate.wilson_interval(0.3, 128))
  low99, high99 = evaluate.wilson_interval(0.3, 128, z=2.5758293035489004)
  low95, high95 = evaluate.wilson_interval(0.3, 128)
  assert low99 < low95 and high95 < high99


def test_wilson_interval_rejects_what_is_not_a_share():
  with pytest.raises(ValueError, match='at least one problem'):
    evaluate.wilson_interval(0.5, 0)
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
    evaluate.wilson_interval(1.2, 10)


def test_format_accuracy():
  assert evaluate.format_accuracy(0.5, 100) == '0.500 [0.404, 0.596]'
