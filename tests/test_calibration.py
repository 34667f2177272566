"""qtarget.calibration: teacher-forced token scores against the model run on each example alone,
and the expected calibration error against its definition computed by hand."""

import jax
import numpy as np
import pytest
from flax import nnx

from qtarget import calibration
from qtarget.models import llama

import availability
import cases


def test_expected_calibration_error_by_hand():
  # Bins of width 1/4: (0, .25] holds 0.1 and 0.2 (accuracy 0 vs mean 0.15), (.5, .75] holds
  # 0.6 and 0.7 (accuracy 1/2 vs 0.65), (.75, 1] holds 0.9 (accuracy 1 vs 0.9).
  confidence = np.array([0.1, 0.2, 0.6, 0.7, 0.9])
  correct = np.array([0, 0, 1, 0, 1])
  ece, bins = calibration.expected_calibration_error(confidence, correct, num_bins=4)
  expected = (2 * 0.15 + 2 * abs(0.5 - 0.65) + 1 * 0.1) / 5
  assert ece == pytest.approx(expected, abs=1e-12)
  assert [b['count'] for b in bins] == [2, 0, 2, 1]
  assert bins[2]['mean_confidence'] == pytest.approx(0.65)
  # A bin edge belongs to the bin below it; 0 to the first bin.
  _, bins = calibration.expected_calibration_error(np.array([0.0, 0.25, 1.0]),
                                                   np.array([0, 0, 1]), num_bins=4)
  assert [b['count'] for b in bins] == [2, 0, 0, 1]


def test_expected_calibration_error_of_calibrated_and_overconfident_predictions():
  rng = np.random.default_rng(0)
  confidence = rng.uniform(size=200_000)
  calibrated = rng.uniform(size=confidence.size) < confidence
  ece, _ = calibration.expected_calibration_error(confidence, calibrated)
  assert ece < 0.01
  overconfident, _ = calibration.expected_calibration_error(np.full(1000, 0.9),
                                                           np.arange(1000) < 600)
  assert overconfident == pytest.approx(0.3)


@pytest.mark.parametrize('confidence, correct, message', [
    (np.array([0.5, 1.5]), np.array([1, 0]), r'probabilities in \[0, 1\]'),
    (np.array([0.5, np.nan]), np.array([1, 0]), r'probabilities in \[0, 1\]'),
    (np.array([0.5]), np.array([1, 0]), 'same non-empty shape'),
    (np.array([]), np.array([]), 'same non-empty shape'),
])
def test_expected_calibration_error_refuses_bad_input(confidence, correct, message):
  with pytest.raises(ValueError, match=message):
    calibration.expected_calibration_error(confidence, correct)


def test_scores_with_a_shared_prefix_match_a_plain_forward_at_every_response_token():
  """Rows share their prompt and their response's first token: the prefix run once must stop
  before the first scored position. Right-padded rows of different lengths and a filler row;
  sharpened weights, so that a wrong position or mask shows."""
  model = llama.Llama(llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_layers=2, num_heads=4, num_kv_heads=2),
                      rngs=nnx.Rngs(1))
  for _, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param) and variable.get_value().ndim == 2:
      variable.set_value(variable.get_value() * 8)
  system = '5 9 3 7 11 2 40 41'
  examples = [('12 13', '20 21 22', system), ('12 13', '20 21 30 31 32', system),
              ('12 13', '20 25', system), ('12 13', '20 34 35 36 37 38 39', system)]
  tokenizer = cases.DigitsTokenizer()
  inputs = [tokenizer.encode_example(*e[:2], system=e[2]).token_ids[:-1] for e in examples]
  # Shared: the system prompt, the prompt and the response's first token (11); the first scored
  # position is 9 (the prompt's last token predicts the response's first), so 9 run once.
  assert len(calibration.evaluate.shared_prefix(inputs)) == 11
  scores = calibration.response_token_scores(model, tokenizer, examples, batch_size=3)
  for (prompt, response, system_prompt), got in zip(examples, scores):
    encoded = tokenizer.encode_example(prompt, response, system=system_prompt)
    ids, mask = encoded.token_ids, np.asarray(encoded.loss_mask[1:], bool)
    log_probs = np.asarray(jax.nn.log_softmax(model(ids[None, :-1])[0], axis=-1), np.float64)
    want = log_probs[np.arange(len(ids) - 1), ids[1:]][mask]
    np.testing.assert_allclose(got.log_prob, want, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(got.top_correct, (log_probs.argmax(-1) == ids[1:])[mask])


@availability.needs_smollm2("SmolLM2's tokenizer")
def test_response_token_scores_match_each_example_run_alone():
  from qtarget import checkpoints, tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.Tokenizer.from_gguf(checkpoints.gguf_reader())
  model = llama.Llama(llama.LlamaConfig(
      vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
      num_kv_heads=1, tie_word_embeddings=True), rngs=nnx.Rngs(0))
  examples = [('What is 2 + 3?', '2 + 3 = 5\n#### 5', None),
              ('Add 17 and 4.', '#### 21', 'You are terse.'),
              ('What is 9 * 8?', 'First 9 * 8 = 72, so the answer is\n#### 72', None)]
  # Batches of two: in the first call the second batch has one real row and padding rows. All
  # three share only the template's first tokens; the first and third share the default system
  # prompt and "What is " too (a longer prefix, run once for both rows).
  shared = [(examples, 2), (examples[::2], 2)]
  for batch, batch_size in shared:
    prefix = calibration.evaluate.shared_prefix(
        [tokenizer.encode_example(*e[:2], system=e[2]).token_ids[:-1] for e in batch])
    assert len(prefix) > (20 if len(batch) == 2 else 2)
  scores = [s for batch, batch_size in shared
            for s in calibration.response_token_scores(model, tokenizer, batch,
                                                       batch_size=batch_size)]
  for (prompt, response, system), got in zip(examples + examples[::2], scores):
    encoded = tokenizer.encode_example(prompt, response, system=system)
    ids, mask = encoded.token_ids, np.asarray(encoded.loss_mask[1:], bool)
    log_probs = np.asarray(jax.nn.log_softmax(model(ids[None, :-1])[0], axis=-1), np.float64)
    targets = ids[1:]
    want = log_probs[np.arange(len(targets)), targets][mask]
    assert got.log_prob.shape == (mask.sum(),)
    np.testing.assert_allclose(got.log_prob, want, atol=1e-5)
    np.testing.assert_allclose(got.top_prob, np.exp(log_probs.max(-1))[mask], atol=1e-5)
    np.testing.assert_array_equal(got.top_correct, (log_probs.argmax(-1) == targets)[mask])
