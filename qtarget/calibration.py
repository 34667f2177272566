"""How well a model's token probabilities match its accuracy, teacher-forced on given responses.

:func:`response_token_scores` runs a model over prompt/response pairs (the chat template as in
training) and returns, per response token, the log-probability of the given token, the model's
top probability and whether its top token is the given one. From those,
:func:`expected_calibration_error` (equal-width bins of the top probability) measures
calibration, the mean negative log-probability measures fit, and the mean probability of a
generated answer's own tokens is that answer's confidence.
"""

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget import evaluate

_BUCKET = 16  # lengths after the shared prefix are padded to a multiple of this (recompiles)
_RESPONSE_BUCKET = 16  # and the number of scored (response) tokens to a multiple of this


class TokenScores(NamedTuple):
  """Per response token of one example."""
  log_prob: np.ndarray  # log-probability of the given token
  top_prob: np.ndarray  # probability of the model's most likely token
  top_correct: np.ndarray  # whether the most likely token is the given one


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _scores(graphdef, state, prefix_1xL, tokens_BxT, valid_BxT, scored_BxR, targets_BxR):
  """Scores at the positions ``scored_BxR`` of ``tokens_BxT`` (each row's tokens after the
  shared ``prefix_1xL``, right-padded) only: the head and its softmax run over the response
  tokens, not over the prompt (most of a short exchange)."""
  model = nnx.merge(graphdef, state)
  slots = prefix_1xL.shape[1] + tokens_BxT.shape[1]
  hidden, _, _ = evaluate.prefill(model, prefix_1xL, tokens_BxT, valid_BxT, slots, lora=True)
  hidden = jnp.take_along_axis(hidden, scored_BxR[..., None], axis=1)
  log_probs = jax.nn.log_softmax(model.logits(hidden), axis=-1)
  target_log_prob = jnp.take_along_axis(log_probs, targets_BxR[..., None], axis=-1)[..., 0]
  top = jnp.argmax(log_probs, axis=-1)
  return target_log_prob, jnp.exp(jnp.max(log_probs, axis=-1)), top == targets_BxR


class TeacherForcedBatch(NamedTuple):
  """One batch of demonstrations for a teacher-forced pass (see :func:`teacher_forced_batches`):
  each row's tokens after the shared prefix, right-padded, and where its response tokens are
  scored (``positions``: the position before each, ``targets``: the token itself)."""
  tokens: np.ndarray  # [rows, length] int32
  valid: np.ndarray  # [rows, length] bool
  positions: np.ndarray  # [rows, width] int32
  targets: np.ndarray  # [rows, width] int32
  counts: list  # the scored tokens of each real row (filler rows come after them)


def teacher_forced_batches(tokenizer, examples: Sequence[tuple[str, str, str | None]],
                           batch_size: int):
  """``(prefix_1xL, batches)``: the tokens every example starts with (the chat template, a
  shared system prompt and task wording; never a scored one), run once and its cache copied to
  every row (:func:`qtarget.evaluate.prefill`), and an iterator of :class:`TeacherForcedBatch`
  of ``batch_size`` rows (the last padded with filler rows: one program per padded width)."""
  encoded = [tokenizer.encode_example(prompt, response, system=system)
             for prompt, response, system in examples]
  # Position t predicts token t + 1; a response token's score is read at the position before.
  scored = [np.flatnonzero(np.asarray(e.loss_mask[1:], bool)) for e in encoded]
  inputs = [list(e.token_ids[:-1]) for e in encoded]
  first_scored = min((int(at[0]) for at in scored if at.size), default=0)
  prefix = evaluate.shared_prefix(inputs)[:first_scored]
  prefix_1xL = jnp.asarray(np.asarray(prefix, np.int32).reshape(1, -1))

  def batches():
    for start in range(0, len(encoded), batch_size):
      rests = [row[len(prefix):] for row in inputs[start:start + batch_size]]
      at_rest = [at - len(prefix) for at in scored[start:start + batch_size]]
      length = evaluate.round_up(max(len(r) for r in rests), _BUCKET)
      width = evaluate.round_up(max(max(len(a) for a in at_rest), 1), _RESPONSE_BUCKET)
      rows = batch_size if len(encoded) > batch_size else len(rests)  # a fixed number of rows
      batch = TeacherForcedBatch(np.zeros((rows, length), np.int32),
                                 np.zeros((rows, length), bool),
                                 np.zeros((rows, width), np.int32),
                                 np.zeros((rows, width), np.int32), [len(a) for a in at_rest])
      for row, (rest, at, example) in enumerate(zip(rests, at_rest,
                                                    encoded[start:start + batch_size])):
        batch.tokens[row, :len(rest)], batch.valid[row, :len(rest)] = rest, True
        batch.positions[row, :len(at)] = at
        batch.targets[row, :len(at)] = np.asarray(example.token_ids)[at + len(prefix) + 1]
      batch.valid[len(rests):, 0] = True  # filler rows: one token, so that no row is empty
      yield batch

  return prefix_1xL, batches()


def response_token_scores(model, tokenizer, examples: Sequence[tuple[str, str, str | None]], *,
                          batch_size: int = 32) -> list[TokenScores]:
  """Teacher-forced scores of each ``(prompt, response, system)``'s response tokens (the
  response and the end-of-turn tokens, as the training loss mask covers them), batched by
  :func:`teacher_forced_batches`."""
  prefix_1xL, batches = teacher_forced_batches(tokenizer, examples, batch_size)
  graphdef, state = nnx.split(model)
  out = []
  for batch in batches:
    log_prob, top_prob, top_correct = map(
        np.asarray, _scores(graphdef, state, prefix_1xL, batch.tokens, batch.valid,
                            batch.positions, batch.targets))
    for row, n in enumerate(batch.counts):
      out.append(TokenScores(log_prob[row, :n], top_prob[row, :n], top_correct[row, :n]))
  return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               num_bins: int = 15) -> tuple[float, list[dict]]:
  """ECE over equal-width confidence bins: sum over bins of (share of tokens) x
  |accuracy - mean confidence|. Returns it and the bins (lower edge, count, mean confidence,
  accuracy; empty bins have count 0 and no means)."""
  confidence = np.asarray(confidence, np.float64).ravel()
  correct = np.asarray(correct, np.float64).ravel()
  if confidence.shape != correct.shape or not confidence.size:
    raise ValueError(f'confidence {confidence.shape} and correct {correct.shape} must be the '
                     'same non-empty shape.')
  if np.any((confidence < 0) | (confidence > 1)) or np.any(~np.isfinite(confidence)):
    raise ValueError('confidences must be probabilities in [0, 1].')
  # Bin b holds (b/n, (b+1)/n]; a confidence of exactly 0 goes to the first bin.
  index = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
  ece, bins = 0.0, []
  for b in range(num_bins):
    members = index == b
    count = int(members.sum())
    if not count:
      bins.append({'lower': b / num_bins, 'count': 0})
      continue
    mean_confidence, accuracy = confidence[members].mean(), correct[members].mean()
    ece += count / confidence.size * abs(accuracy - mean_confidence)
    bins.append({'lower': b / num_bins, 'count': count,
                 'mean_confidence': float(mean_confidence), 'accuracy': float(accuracy)})
  return float(ece), bins
