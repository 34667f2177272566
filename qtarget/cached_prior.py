r"""The prior cache's math: the prior as a top-k distribution, the target it gives, its bound.

A frozen prior never changes during training, so its distribution at each response token can be
computed once and stored: the ``k`` most likely token ids, their log-probabilities, and the log
of the remaining (tail) mass. :class:`CachedPrior` holds that; :func:`from_logits` builds it.
(The command that computes and writes a cache is :mod:`qtarget.cache_prior`, its files
:mod:`qtarget.data.prior_cache_files`.)

**The tail.** Outside the top k the cache keeps only the tail mass :math:`t`. The reconstructed
prior :math:`\hat\pi` (:func:`prior_log_probs`) is exact on the top k and spreads :math:`t` over
the tail like the student's own distribution there:
:math:`\hat\pi_v = t\, p_v / \sum_{u \notin K} p_u` for :math:`v \notin K`. Both priors put mass
:math:`t` on the tail, so :math:`\mathrm{TV}(\pi, \hat\pi) \le t`.

**The target's error.** A method's residual :math:`r \propto p^{a}\,\pi^{b}` and its cached
:math:`\hat r \propto p^{a}\,\hat\pi^{b}` are proportional to each other on the top k (the same
weights there), so with :math:`\beta, \hat\beta` their masses on the tail,
:math:`\mathrm{TV}(r, \hat r) \le \max(\beta, \hat\beta)`. :math:`\hat\beta` is known from the
cache; by Hölder, the true tail weight :math:`\sum_{v \notin K} p_v^{a} \pi_v^{b} \le s^{a}
t^{b}` when :math:`a + b = 1` (:math:`s` the student's tail mass), so :math:`\beta \le
s^{a} t^{b} / A` with :math:`A = \sum_{v \in K} p_v^{a}\pi_v^{b}` (and for :math:`a + b \ne 1`,
:math:`\beta \le (\sum_{v \notin K} p_v^{a}) \max_{v \notin K} \pi_v^{b} / A` with
:math:`\max_{v \notin K} \pi_v \le \min(t, \min_{v \in K} \pi_v)`). The trust of every
built-in method does not read the prior, so the target's error is
:math:`\mathrm{TV}(Q, \hat Q) = (1 - \gamma)\, \mathrm{TV}(r, \hat r)`, bounded per token by
:func:`target_error_bound`. With :math:`k = V` the tail is empty and everything is exact.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class CachedPrior(NamedTuple):
  """The prior's distribution at each position, reduced to its top k.

  Attributes:
    token_ids: ``[..., k]`` int32, the k most likely tokens (descending).
    log_probs: ``[..., k]`` float32, their log-probabilities (exact, under the full softmax).
    tail_log_mass: ``[...]`` float32, log of the mass outside the top k (-inf when k = V).
  """
  token_ids: Array
  log_probs: Array
  tail_log_mass: Array


def _scatter_index(token_ids_xK: Array) -> tuple:
  rows = jnp.indices(token_ids_xK.shape, sparse=True)
  return tuple(rows[:-1]) + (token_ids_xK,)


def _in_top_k(token_ids_xK: Array, vocab_size: int) -> Array:
  """``[..., V]`` boolean: whether each token is among the cached ones (a scatter: no
  ``[..., k, V]`` comparison)."""
  mask = jnp.zeros(token_ids_xK.shape[:-1] + (vocab_size,), bool)
  return mask.at[_scatter_index(token_ids_xK)].set(True)


def from_logits(prior_logits: Array, k: int) -> CachedPrior:
  """The top-k cache of a prior's logits ``[..., V]`` (k a Python int in [1, V])."""
  vocab_size = prior_logits.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
    raise ValueError(f'k must be an int in [1, {vocab_size}] (the vocabulary size), got {k!r}.')
  log_probs = jax.nn.log_softmax(jnp.asarray(prior_logits, jnp.float32), axis=-1)
  top_log_probs, token_ids = jax.lax.top_k(log_probs, k)
  outside = jnp.where(_in_top_k(token_ids, vocab_size), -jnp.inf, log_probs)
  tail_log_mass = jax.nn.logsumexp(outside, axis=-1)
  return CachedPrior(token_ids.astype(jnp.int32), top_log_probs, tail_log_mass)


def _reconstruct(cached: CachedPrior, student_xV: Array, in_top: Array) -> tuple[Array, Array]:
  """The reconstructed prior's log-probabilities and the log of the student's tail mass (of
  ``student_xV``'s normalisation: only differences of ``student_xV`` matter to the prior)."""
  student_tail = jnp.where(in_top, -jnp.inf, student_xV)
  student_tail_mass = jax.nn.logsumexp(student_tail, axis=-1, keepdims=True)
  empty_tail = jnp.isneginf(cached.tail_log_mass)[..., None] | jnp.isneginf(student_tail_mass)
  spread = student_tail - jnp.where(empty_tail, 0.0, student_tail_mass) + jnp.where(
      empty_tail, 0.0, cached.tail_log_mass[..., None])
  tail = jnp.where(empty_tail, -jnp.inf, spread)
  scattered = jnp.full(student_xV.shape, -jnp.inf, jnp.float32)
  scattered = scattered.at[_scatter_index(cached.token_ids)].set(cached.log_probs)
  return jnp.where(in_top, scattered, tail), student_tail_mass[..., 0]


def prior_log_probs(cached: CachedPrior, student_logits: Array) -> Array:
  """``[..., V]`` log-probabilities of the reconstructed prior: exact on the top k, the tail
  mass spread like the student's distribution over the tail (see the module docstring).
  ``student_logits`` may be logits or log-probabilities (the result is the same)."""
  student = jnp.asarray(student_logits, jnp.float32)
  return _reconstruct(cached, student, _in_top_k(cached.token_ids, student.shape[-1]))[0]


def target_error_bound(cached: CachedPrior, student_logits: Array, trust: Array,
                       model_power, prior_power) -> Array:
  """``[...]`` an upper bound on TV(Q, Q_cached) per token for a residual
  ``p**model_power * prior**prior_power`` (see the module docstring; a negative power gets
  the trivial bound 1 - trust)."""
  vocab_size = student_logits.shape[-1]
  student = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32), axis=-1)
  in_top = _in_top_k(cached.token_ids, vocab_size)
  a = jnp.asarray(model_power, jnp.float32)[..., None]
  b = jnp.asarray(prior_power, jnp.float32)[..., None]
  times = lambda power, log_x: jnp.where(power == 0, 0.0, power * log_x)  # 0 * -inf = 0
  student_top = jnp.take_along_axis(student, cached.token_ids, axis=-1)
  log_a_top = jax.nn.logsumexp(times(a, student_top) + times(b, cached.log_probs), axis=-1)
  # The cached residual's tail mass (exact, from the reconstruction).
  reconstructed, log_student_tail = _reconstruct(cached, student, in_top)
  log_w_hat = jnp.where(in_top, -jnp.inf, times(a, student) + times(b, reconstructed))
  log_tail_hat = jax.nn.logsumexp(log_w_hat, axis=-1)
  beta_hat = jnp.exp(log_tail_hat - jnp.logaddexp(log_a_top, log_tail_hat))
  # The true residual's tail weight, bounded without the true tail.
  log_t = cached.tail_log_mass
  largest_tail_prior = jnp.minimum(log_t, jnp.min(cached.log_probs, axis=-1))
  log_tail_sum_p_a = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, times(a, student)), axis=-1)
  a, b = a[..., 0], b[..., 0]
  log_beta_bound = log_tail_sum_p_a + times(b, largest_tail_prior) - log_a_top
  holder = jnp.isclose(a + b, 1.0) & (a >= 0) & (b >= 0)  # where Hölder applies
  log_beta_holder = times(a, log_student_tail) + times(b, log_t) - log_a_top
  log_beta_bound = jnp.where(holder, jnp.minimum(log_beta_holder, log_beta_bound),
                             log_beta_bound)
  beta_bound = jnp.minimum(jnp.exp(log_beta_bound), 1.0)
  beta_bound = jnp.where((b < 0) | (a < 0), 1.0, beta_bound)  # negative powers: only 1
  empty = jnp.isneginf(log_t)
  tv_residual = jnp.where(empty, 0.0, jnp.maximum(beta_hat, beta_bound))
  return (1.0 - trust) * tv_residual


def bucket_entropy(cached: CachedPrior) -> Array:
  """``[...]`` entropy of the cached distribution with the tail as one bucket: a lower bound on
  the prior's entropy (what the trainer logs as ``prior_entropy`` with a cached prior)."""
  term = lambda log_p: jnp.where(jnp.isneginf(log_p), 0.0, -jnp.exp(log_p) * log_p)
  return jnp.sum(term(cached.log_probs), axis=-1) + term(cached.tail_log_mass)
