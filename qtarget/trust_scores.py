r"""Which demonstration tokens a target distrusts: per-token trust and the prior's disagreement.

Target-SFT's target puts mass :math:`\gamma = p_y` on the demonstrated token and moves the
rest to the residual: where the model finds a token implausible, its target trusts it little.
:func:`score_demonstrations` runs a model and a prior, teacher-forced, over demonstrations (the
chat template and loss mask of training) and returns, per response token, the trust
:math:`p_y`, the prior's :math:`\pi_y`, the prior's most likely token and the total variation
and KL divergence between the model's and the prior's next-token distributions. The scoring is
jitted and batched as evaluation is (the shared prompt prefix runs once).

:func:`corrupted_step_lines` finds, in a step-by-step arithmetic demonstration, the line whose
arithmetic is wrong (how :mod:`qtarget.data.rationales` corrupts one); :func:`detector_metrics`
measures how well low trust finds corrupted demonstrations and their wrong step.
"""

import functools
import re
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget import calibration
from qtarget import evaluate

class TokenTrust(NamedTuple):
  """Per response token of one demonstration (the end-of-turn tokens included)."""
  token_ids: np.ndarray  # int32, the demonstrated tokens
  trust: np.ndarray  # p_y under the scoring model
  prior_prob: np.ndarray  # the prior's probability of the demonstrated token
  prior_top: np.ndarray  # int32, the prior's most likely token
  total_variation: np.ndarray  # TV(model, prior) of the next-token distributions
  kl: np.ndarray  # KL(model || prior)


@functools.partial(jax.jit, static_argnames=('graphdef', 'prior_graphdef', 'prior_is_model'))
def _scores(graphdef, state, prior_graphdef, prior_state, prefix_1xL, tokens_BxT, valid_BxT,
            scored_BxR, targets_BxR, prior_is_model=False):
  """The model's and the prior's distributions at the positions ``scored_BxR`` only
  (``prior_is_model``: a model without adapters is its own prior, run once)."""
  slots = prefix_1xL.shape[1] + tokens_BxT.shape[1]

  def log_probs(graph, variables, lora):
    model = nnx.merge(graph, variables)
    hidden, _, _ = evaluate.prefill(model, prefix_1xL, tokens_BxT, valid_BxT, slots, lora=lora)
    hidden = jnp.take_along_axis(hidden, scored_BxR[..., None], axis=1)
    return jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)

  model = log_probs(graphdef, state, True)
  # The same weights with LoRA off (the initial model of a LoRA student), or a separate prior.
  prior = model if prior_is_model else log_probs(prior_graphdef, prior_state,
                                                 prior_graphdef is graphdef)
  pick = lambda lp: jnp.take_along_axis(lp, targets_BxR[..., None], axis=-1)[..., 0]
  p, q = jnp.exp(model), jnp.exp(prior)
  total_variation = 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
  kl = jnp.sum(jnp.where(p > 0, p * (model - prior), 0.0), axis=-1)
  return (jnp.exp(pick(model)), jnp.exp(pick(prior)), jnp.argmax(prior, axis=-1),
          total_variation, kl)


def score_demonstrations(model, prior, tokenizer,
                         examples: Sequence[tuple[str, str, str | None]], *,
                         batch_size: int = 32,
                         progress: Callable[[int, int], None] | None = None) -> list[TokenTrust]:
  """Teacher-forced trust of each ``(prompt, response, system)``'s response tokens.

  Args:
    model: the scoring model (a :class:`qtarget.models.llama.Llama`).
    prior: the prior, same vocabulary; ``None`` or ``model`` itself: the model with its LoRA
      adapters switched off (for a model without adapters, the model: zero disagreement).
    tokenizer: the model's :class:`qtarget.tokenizer.Tokenizer`.
    examples: demonstrations as training reads them.
    batch_size: rows per compiled call.
    progress: called with (examples done, total) after each batch.
  """
  if prior is not None and prior is not model and (
      prior.config.vocab_size != model.config.vocab_size):
    raise ValueError(f"the prior's vocabulary ({prior.config.vocab_size}) differs from the "
                     f"model's ({model.config.vocab_size}).")
  prefix_1xL, batches = calibration.teacher_forced_batches(tokenizer, examples, batch_size)
  graphdef, state = nnx.split(model)
  prior_graphdef, prior_state = (graphdef, state) if prior is None or prior is model else (
      nnx.split(prior))
  prior_is_model = prior_graphdef is graphdef and not model.config.lora_rank
  out, done = [], 0
  for batch in batches:
    values = [np.asarray(v) for v in _scores(graphdef, state, prior_graphdef, prior_state,
                                             prefix_1xL, batch.tokens, batch.valid,
                                             batch.positions, batch.targets,
                                             prior_is_model=prior_is_model)]
    for row, n in enumerate(batch.counts):
      trust, prior_prob, prior_top, total_variation, kl = (v[row, :n] for v in values)
      out.append(TokenTrust(batch.targets[row, :n].copy(), trust, prior_prob,
                            prior_top.astype(np.int32), total_variation, kl))
    done += len(batch.counts)
    if progress is not None:
      progress(done, len(examples))
  return out


_NUMBER_EXPRESSION = re.compile(r'^[\d\s+\-*()]+$')


def _value(expression: str) -> int | None:
  """The integer value of ``+ - *`` arithmetic on integers, or None for anything else."""
  expression = expression.strip()
  if not expression or not _NUMBER_EXPRESSION.match(expression):
    return None
  try:
    return int(eval(expression, {'__builtins__': {}}, {}))  # pylint: disable=eval-used
  except (SyntaxError, ValueError, TypeError):
    return None


def chain_terms(expression: str) -> list[int] | None:
  """The signed terms of a chain of additions and subtractions ('4 - 1 + 7' -> [4, -1, 7]),
  or None for any other expression."""
  parts = expression.split()
  if len(parts) % 2 == 0 or not all(p.isdigit() for p in parts[::2]) or not all(
      op in ('+', '-') for op in parts[1::2]):
    return None
  return [int(parts[0])] + [int(n) if op == '+' else -int(n)
                            for op, n in zip(parts[1::2], parts[2::2])]


def corrupted_step_lines(response: str, terms: list[int] | None = None) -> list[int]:
  """The indices of the lines of a step-by-step arithmetic demonstration that are wrong.

  A line is wrong where its equation is false (``a + b = c``; a line ``= expr`` continues the
  one before, equal to its last expression), or, given the problem's signed ``terms`` (a chain
  sum), where its step adds a term the problem does not have left (a flipped operator leaves
  the line's own arithmetic true). ``#### answer`` lines and lines that are not arithmetic are
  not judged."""
  wrong, previous = [], None
  remaining = None if terms is None else list(terms)
  for index, line in enumerate(response.split('\n')):
    if line.startswith('####'):
      continue
    sides = line.split('=')
    if line.strip().startswith('='):
      sides = [previous or ''] + sides[1:]
    values = [_value(side) for side in sides]
    if len(sides) >= 2 and all(v is not None for v in values):
      bad = any(v != values[0] for v in values[1:])
      step = re.fullmatch(r'\s*(-?\d+)\s*([+-])\s*(\d+)\s*', sides[0])
      if remaining is not None and step:
        first, sign, number = int(step[1]), step[2], int(step[3])
        if first in remaining and index == 0:
          remaining.remove(first)
        term = number if sign == '+' else -number
        if term in remaining:
          remaining.remove(term)
        else:
          bad = True
      if bad:
        wrong.append(index)
      previous = sides[-1]
    else:
      previous = None
  return wrong


def token_lines(tokenizer, token_ids: Sequence[int], response: str) -> np.ndarray:
  """The response line each response token starts in (``-1`` past the response: the
  end-of-turn tokens), from the decoded text's character offsets."""
  line_starts = np.cumsum([0] + [len(line) + 1 for line in response.split('\n')])
  lines = np.full(len(token_ids), -1, np.int32)
  for i in range(len(token_ids)):
    offset = len(tokenizer.decode(token_ids[:i], skip_special_tokens=True))
    if offset < len(response):
      # The first non-space character of the token decides its line.
      rest = tokenizer.decode(token_ids[:i + 1], skip_special_tokens=True)[offset:]
      offset += len(rest) - len(rest.lstrip())
      lines[i] = int(np.searchsorted(line_starts, min(offset, len(response) - 1), 'right')) - 1
  return lines


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve of ``scores`` for ``positive`` labels (ties count half): the
  probability that a random positive outscores a random negative."""
  scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
  if positive.all() or not positive.any():
    raise ValueError('AUROC needs both positive and negative examples.')
  order = np.argsort(scores, kind='mergesort')
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # Average ranks over ties.
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  for group in np.split(np.arange(len(scores)), boundaries):
    ranks[order[group]] = group.mean() + 1
  n_pos, n_neg = positive.sum(), (~positive).sum()
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(false positive rate, true positive rate)`` at every threshold, from (0, 0) to (1, 1)."""
  scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
  order = np.argsort(-scores, kind='mergesort')
  hits = positive[order]
  keep = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]
  tpr = np.r_[0.0, np.cumsum(hits)[keep] / max(hits.sum(), 1)]
  fpr = np.r_[0.0, np.cumsum(~hits)[keep] / max((~hits).sum(), 1)]
  return fpr, tpr


def precision_at(scores: np.ndarray, positive: np.ndarray, count: int) -> float:
  """The share of positives among the ``count`` highest scores."""
  order = np.argsort(-np.asarray(scores, np.float64), kind='mergesort')
  return float(np.asarray(positive, bool)[order[:count]].mean())


def bootstrap_interval(statistic: Callable[[np.ndarray], float], size: int, *,
                       samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
  """A percentile bootstrap interval of ``statistic(indices)`` over examples resampled with
  replacement (resamples where it is undefined, e.g. one class only, are dropped)."""
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(samples):
    try:
      values.append(statistic(rng.integers(0, size, size)))
    except ValueError:
      continue
  low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
  return float(low), float(high)


def detector_metrics(scores: list[TokenTrust], corrupted: np.ndarray,
                     wrong_token: list[np.ndarray | None], *, samples: int = 1000,
                     seed: int = 0, with_prior: bool = True) -> dict:
  """How well trust finds corrupted demonstrations and their wrong step, against length-
  normalised NLL, with bootstrap intervals over examples.

  Args:
    scores: per-example :class:`TokenTrust`.
    corrupted: ``[examples]`` whether each demonstration was corrupted.
    wrong_token: per example, a boolean mask over its scored tokens of those in the corrupted
      step (None where unknown or not corrupted).

  Returns:
    ``{'examples', 'corrupted', 'rate', 'rankers': {name: {'auroc', 'auroc_interval',
    'precision', 'precision_interval'}}, 'locate': {name: {'accuracy', 'interval', 'n'}}}``;
    rankers: ``lowest_trust`` (min p_y), ``mean_nll`` (mean -log p_y, the baseline),
    ``prior_disagreement`` (max TV; only ``with_prior``, a prior other than the model);
    locate: whether the example's lowest-trust token (the
    same token as its highest NLL) lies in the corrupted step, against choosing a token of the
    example uniformly at random (the chance rate).
  """
  corrupted = np.asarray(corrupted, bool)
  count = int(round(corrupted.mean() * len(corrupted)))
  rankers = {
      'lowest_trust': np.array([-s.trust.min() for s in scores]),
      'mean_nll': np.array([-np.log(np.maximum(s.trust, 1e-30)).mean() for s in scores]),
  }
  if with_prior:
    rankers['prior_disagreement'] = np.array([s.total_variation.max() for s in scores])
  out = {'examples': len(scores), 'corrupted': int(corrupted.sum()),
         'rate': float(corrupted.mean()), 'rankers': {}, 'locate': {}}
  for name, values in rankers.items():
    out['rankers'][name] = {
        'auroc': auroc(values, corrupted),
        'auroc_interval': bootstrap_interval(
            lambda i, v=values: auroc(v[i], corrupted[i]), len(values), samples=samples,
            seed=seed),
        'precision': precision_at(values, corrupted, count),
        'precision_interval': bootstrap_interval(
            lambda i, v=values: precision_at(v[i], corrupted[i], max(1, int(round(
                corrupted[i].mean() * len(i))))), len(values), samples=samples, seed=seed),
    }
  located = [i for i, mask in enumerate(wrong_token) if mask is not None and mask.any()]
  if located:
    hit = np.array([bool(wrong_token[i][np.argmin(scores[i].trust)]) for i in located])
    chance = np.array([wrong_token[i].mean() for i in located])
    for name, values in (('lowest_trust', hit.astype(float)), ('chance', chance)):
      out['locate'][name] = {
          'accuracy': float(values.mean()), 'n': len(located),
          'interval': bootstrap_interval(lambda i, v=values: float(v[i].mean()), len(values),
                                         samples=samples, seed=seed)}
  return out
