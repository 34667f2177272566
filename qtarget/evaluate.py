"""Generation with the KV cache, answer extraction and the task's own scorer.

``evaluate`` turns held-out records into accuracy: prompts through the chat template, batched
decoding (the prompts' shared prefix run once, then each prompt's rest left-padded: one compiled
program per prefix length and rest-length bucket), greedy or sampled
(temperature, top-p; k samples per problem for Average@k and pass@k), the final answer extracted
(after ``####``, else the last ``\\boxed{}``, else the last number for numeric answers) and scored
by reasoning-gym's ``score_answer`` for reasoning-gym tasks, or by MATH-style equivalence
(:func:`math_equal`) otherwise.
"""

import dataclasses
import functools
import json
import math
import numbers
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget import jsonl
from qtarget.data import records as records_lib

# Prompts after their shared prefix are padded up to a multiple of this, to limit recompiles.
_BUCKET = 16


def shared_prefix(encoded: list[list[int]]) -> list[int]:
  """The tokens every prompt starts with (the chat template, a system prompt, the task's
  wording), leaving each prompt at least one token of its own: generation runs them once and
  copies their cache to every row, instead of once per row."""
  if not encoded:
    return []
  limit = min(len(e) for e in encoded) - 1
  length = 0
  while length < limit and all(e[length] == encoded[0][length] for e in encoded):
    length += 1
  return list(encoded[0][:length])


_NUCLEUS_CANDIDATES = 128  # top-p looks at this many top tokens first (a full sort is slow)


@jax.jit  # the branches close over arrays: eager calls would compile every time
def _next_token(logits_BxV, key, temperature, top_p, active_B=None):
  """Greedy when temperature is 0, else a sample from the top-p nucleus of p^(1/temperature).

  The nucleus is searched among the top ``_NUCLEUS_CANDIDATES`` tokens; only a row whose nucleus
  does not fit there takes its token from a sort of the whole vocabulary (same distribution,
  ties aside), which runs when an ``active_B`` row (default: every row) needs it. A row's token
  depends on its own logits and the key only, not on the other rows'.
  """
  def greedy(_):
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def sample(_):
    scaled = logits_BxV.astype(jnp.float32) / temperature

    def whole_vocabulary(_):
      return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def nucleus(candidates):
      top_logits, top_ids = jax.lax.top_k(scaled, candidates)
      log_mass = top_logits - jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
      cumulative = jnp.cumsum(jnp.exp(log_mass), axis=-1)
      # The smallest set of top tokens whose mass reaches top_p (always at least one token).
      last_kept = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
      keep = jnp.arange(candidates) <= last_kept
      choice = jax.random.categorical(key, jnp.where(keep, top_logits, -jnp.inf), axis=-1)
      token = jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0]
      return token.astype(jnp.int32), cumulative[:, -1] >= top_p

    def top_p_sample(_):
      candidates = min(_NUCLEUS_CANDIDATES, scaled.shape[-1])
      token, fits_B = nucleus(candidates)
      needed = ~fits_B if active_B is None else ~fits_B & active_B
      whole = jax.lax.cond(jnp.any(needed), lambda _: nucleus(scaled.shape[-1])[0],
                           lambda _: token, None)
      return jnp.where(fits_B, token, whole)

    return jax.lax.cond(top_p >= 1.0, whole_vocabulary, top_p_sample, None)

  return jax.lax.cond(temperature > 0, sample, greedy, None)


def prefill(model, prefix_1xL, tokens_BxP, valid_BxP, slots: int, lora: bool = True):
  """A batch of prompts into a fresh cache of ``slots`` per row: ``prefix_1xL`` (the tokens
  every row starts with) runs once and its cache is copied to every row, then each row's rest
  ``tokens_BxP``, left- or right-padded (``valid_BxP`` False on the padding).

  Returns the hidden states of ``tokens_BxP`` ``[B, P, H]``, the cache, and each row's next
  position ``[B]``.
  """
  batch = tokens_BxP.shape[0]
  prefix_len = prefix_1xL.shape[1]
  cache = model.init_cache(batch, slots)
  if prefix_len:
    _, shared = model.decode(prefix_1xL, model.init_cache(1, slots),
                             positions_BxT=jnp.arange(prefix_len)[None], lora=lora)
    cache = jax.tree.map(lambda x, like: jnp.broadcast_to(x, like.shape), shared, cache)
  positions = prefix_len + jnp.maximum(jnp.cumsum(valid_BxP, axis=1) - 1, 0)
  hidden, cache = model.decode(tokens_BxP, cache, positions_BxT=positions, valid_BxT=valid_BxP,
                               lora=lora)
  return hidden, cache, prefix_len + jnp.sum(valid_BxP, axis=1)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'eos_id', 'lora'))
def _generate(graphdef, state, prefix_1xL, tokens_BxP, valid_BxP, real_B, key, temperature,
              top_p, *, max_new_tokens, eos_id, lora):
  """Greedy or sampled tokens after the prompts (:func:`prefill`), and the number of decoding
  steps run. Rows with ``real_B`` False (filler) count as ended from the start."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens_BxP.shape
  slots = prefix_1xL.shape[1] + prompt_len + max_new_tokens
  hidden, cache, next_position = prefill(model, prefix_1xL, tokens_BxP, valid_BxP, slots, lora)
  keys = jax.random.split(key, max_new_tokens + 1)
  first = _next_token(model.logits(hidden[:, -1]), keys[0], temperature, top_p, real_B)

  # Step i emits token i and computes token i + 1. Once every row has emitted its end of turn,
  # every later token is eos_id: the loop stops there (the output is filled with eos_id).
  def step(carry):
    i, token, position, cache, done, generated = carry
    generated = generated.at[:, i].set(token)
    done = done | (token == eos_id)
    hidden, cache = model.decode(token[:, None], cache, positions_BxT=position[:, None],
                                 lora=lora)
    new_token = _next_token(model.logits(hidden[:, 0]), keys[i + 1], temperature, top_p, ~done)
    return i + 1, jnp.where(done, eos_id, new_token), position + 1, cache, done, generated

  def unfinished(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  init = (0, jnp.where(real_B, first, eos_id), next_position, cache, ~real_B,
          jnp.full((batch, max_new_tokens), eos_id, jnp.int32))
  steps, _, _, _, _, generated = jax.lax.while_loop(unfinished, step, init)
  return generated, steps  # [B, max_new_tokens], []


def round_up(length: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` at least ``length`` (padded widths: few programs)."""
  return -(-length // multiple) * multiple


def left_padded_batch(encoded: list[list[int]], rows: int):
  """``rows`` rows of token ids, each left-padded to a multiple of ``_BUCKET`` (one program per
  width): ``(tokens, valid, real)``; rows past ``len(encoded)`` are filler (``real`` False, one
  dummy token so that no row is empty)."""
  if not 0 < len(encoded) <= rows or not all(encoded):
    raise ValueError(f'{len(encoded)} prompts (each at least one token) for {rows} rows.')
  width = round_up(max(len(e) for e in encoded), _BUCKET)
  tokens = np.zeros((rows, width), np.int32)
  valid = np.zeros((rows, width), bool)
  for i, ids in enumerate(encoded):
    tokens[i, width - len(ids):] = ids
    valid[i, width - len(ids):] = True
  valid[len(encoded):, -1] = True
  return tokens, valid, np.arange(rows) < len(encoded)


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             lora: bool = True, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             progress=None, systems: list[str | None] | None = None) -> list[str]:
  """Completions of chat prompts (text up to the end-of-turn token).

  ``systems``: each prompt's system prompt (None: none), rendered by the chat template exactly
  as in training.
  ``temperature`` 0 decodes greedily; otherwise tokens are sampled from the top-p nucleus, with
  keys derived from ``seed`` and the index of each batch's first prompt (the same call gives the
  same samples; another ``batch_size`` gives other, equally distributed ones).
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be at least 1; got {max_new_tokens}.')
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f'temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}.')
  if systems is not None and len(systems) != len(prompts):
    raise ValueError(f'{len(systems)} system prompts for {len(prompts)} prompts.')
  systems = systems if systems is not None else [None] * len(prompts)
  graphdef, state = nnx.split(model)
  encoded_prompts = [tokenizer.encode_prompt(p, system=system)
                     for p, system in zip(prompts, systems)]
  prefix = shared_prefix(encoded_prompts)
  prefix_1xL = jnp.asarray(np.asarray(prefix, np.int32).reshape(1, -1))
  outputs = []
  for start in range(0, len(prompts), batch_size):
    tokens, valid, real = left_padded_batch(
        [e[len(prefix):] for e in encoded_prompts[start:start + batch_size]], batch_size)
    key = jax.random.fold_in(jax.random.key(seed), start)
    generated, _ = _generate(graphdef, state, prefix_1xL, jnp.asarray(tokens), jnp.asarray(valid),
                             jnp.asarray(real), key, jnp.float32(temperature), jnp.float32(top_p),
                             max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, lora=lora)
    for row in np.asarray(generated)[:int(real.sum())]:
      row = list(row)
      if tokenizer.eos_id in row:
        row = row[:row.index(tokenizer.eos_id)]
      outputs.append(tokenizer.decode(row))
    if progress is not None:
      progress(len(outputs), len(prompts))
  return outputs


@functools.lru_cache(maxsize=None)
def _reasoning_gym_dataset(task: str):
  import reasoning_gym  # pylint: disable=g-import-not-at-top
  return reasoning_gym.create_dataset(task, size=1, seed=0)


def math_equal(prediction: str, gold: str) -> bool:
  r"""MATH-style answer equivalence by math-verify (the checker of the open reasoning-SFT
  evaluations): both answers parsed as LaTeX into sympy and compared symbolically and
  numerically (``0.5`` = ``\frac{1}{2}`` = ``1/2``, ``x = 5`` = ``5``, tuples element by
  element, intervals by their brackets). An empty or unparseable prediction is wrong."""
  from math_verify import parse, verify  # pylint: disable=g-import-not-at-top
  as_latex = lambda text: f'${text}$'  # extracted answers are bare LaTeX
  parsed_gold = parse(as_latex(gold))
  parsed_prediction = parse(as_latex(prediction))
  if not parsed_gold or not parsed_prediction:
    return False
  return bool(verify(parsed_gold, parsed_prediction))


def score(record: dict, extracted: str) -> float:
  """The task's own score of an extracted answer: reasoning-gym's scorer for reasoning-gym
  tasks, else MATH-style equivalence with the gold answer (:func:`math_equal`)."""
  metadata = json.loads(record.get('metadata') or '{}')
  if record.get('task') not in (None, '', 'file') and 'question' in metadata:
    entry = {'question': metadata['question'], 'answer': metadata['answer'],
             'metadata': metadata['metadata']}
    return float(_reasoning_gym_dataset(record['task']).score_answer(extracted, entry))
  return float(math_equal(extracted, record['answer']))


def full_credit(score_value: float) -> bool:
  """Whether a :func:`score` is full credit: reasoning-gym also gives partial credit (0.5 for a
  sign error, for instance), which counts as wrong here."""
  if isinstance(score_value, bool) or not isinstance(score_value, numbers.Real):
    raise TypeError(f'a score is a number, got {score_value!r}.')
  return score_value == 1.0


def read_predictions(path, fields=('question', 'score')) -> list[dict]:
  """The predictions saved as JSON lines (one of :func:`evaluate`'s predictions per line; blank
  lines skipped), each checked to hold ``fields``: a clear error naming the file and line instead
  of a ``KeyError`` or an average over nothing later."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such predictions file.')
  rows = jsonl.read_objects(path, required=fields, what='prediction')
  if not rows:
    raise ValueError(f'{path}: no predictions in the file.')
  return rows


_Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(accuracy: float, num_problems: int, z: float = _Z_95) -> tuple[float, float]:
  r"""The Wilson score interval of an accuracy measured on ``num_problems`` problems (95% by
  default): unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or 1.

  .. math::
    \frac{\hat p + \frac{z^2}{2n} \pm z \sqrt{\frac{\hat p (1 - \hat p)}{n}
    + \frac{z^2}{4n^2}}}{1 + \frac{z^2}{n}}

  Args:
    accuracy: the observed share :math:`\hat p` in [0, 1] (a mean score with partial credit is
      read as a share).
    num_problems: :math:`n`, at least 1.
    z: the normal quantile of the confidence level.

  Example:
    >>> [round(x, 4) for x in wilson_interval(0.5, 100)]
    [0.4038, 0.5962]
  """
  if num_problems < 1:
    raise ValueError(f'num_problems={num_problems}: an interval needs at least one problem.')
  if not 0.0 <= accuracy <= 1.0:
    raise ValueError(f'accuracy={accuracy}: must lie in [0, 1].')
  n, p = float(num_problems), float(accuracy)
  centre = p + z * z / (2 * n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  scale = 1 + z * z / n
  return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def format_accuracy(accuracy: float, num_problems: int) -> str:
  """An accuracy and its 95% Wilson interval: ``format_accuracy(0.5, 100)`` is
  ``'0.500 [0.404, 0.596]'``."""
  low, high = wilson_interval(accuracy, num_problems)
  return f'{accuracy:.3f} [{low:.3f}, {high:.3f}]'


@dataclasses.dataclass
class EvalResult:
  """Average@k (``accuracy``: the mean score over problems and samples), pass@k (the fraction of
  problems with at least one fully correct sample), and one prediction per problem and sample."""
  accuracy: float
  pass_at_k: float
  predictions: list[dict]
  seconds: float


def evaluate(model, tokenizer, records: list[dict], *, max_new_tokens: int = 64,
             batch_size: int = 16, lora: bool = True, num_samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             progress=None) -> EvalResult:
  """Average@k and pass@k on records (k = ``num_samples``); every prediction kept for re-scoring.

  With ``temperature`` 0 the k samples would be identical, so k must then be 1.
  """
  if num_samples < 1 or (temperature == 0 and num_samples > 1):
    raise ValueError(f'num_samples={num_samples} with temperature={temperature}: greedy decoding '
                     'gives one answer per problem; sample (temperature > 0) for k > 1.')
  start = time.time()
  prompts = [r['prompt'] for r in records for _ in range(num_samples)]
  systems = [records_lib.system_prompt(r) for r in records for _ in range(num_samples)]
  outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, lora=lora, temperature=temperature, top_p=top_p,
                     seed=seed, progress=progress, systems=systems)
  predictions = []
  for index, output in enumerate(outputs):
    record = records[index // num_samples]
    extracted = records_lib.extract_answer(output, record['answer'])
    predictions.append({'task': record['task'], 'question': record['prompt'],
                        'gold': record['answer'], 'output': output, 'extracted': extracted,
                        'score': score(record, extracted), 'sample': index % num_samples,
                        'metadata': record.get('metadata', '')})
  scores = np.asarray([p['score'] for p in predictions]).reshape(len(records), num_samples)
  accuracy = float(scores.mean()) if len(records) else 0.0
  pass_at_k = float((scores == 1.0).any(axis=1).mean()) if len(records) else 0.0
  return EvalResult(accuracy, pass_at_k, predictions, time.time() - start)
