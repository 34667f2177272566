"""The prior's top-k cache: exact at k = V, within the stated bound below it."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget import cached_prior
from qtarget import losses
from qtarget import targets

VOCAB = 50
# Every built-in method with a prior, with hyperparameters.
PRIOR_METHODS = [('sft_kl', {'lam': 0.3}), ('asft', {'lam': 0.2}), ('distill', {}),
                 ('hybrid_distill', {'lam': 0.4}), ('target_sft', {'eta': 0.25}),
                 ('target_sft', {'eta': 0.5}), ('target_sft', {'eta': 1.0})]


def _inputs(seed=0, temperature=2.0, shape=(3, 7)):
  keys = jax.random.split(jax.random.key(seed), 3)
  logits = jax.random.normal(keys[0], shape + (VOCAB,)) * temperature
  prior_logits = jax.random.normal(keys[1], shape + (VOCAB,)) * temperature
  labels = jax.random.randint(keys[2], shape, 0, VOCAB)
  return logits, prior_logits, labels


def test_the_cache_holds_the_top_k_and_the_tail():
  _, prior_logits, _ = _inputs()
  cached = cached_prior.from_logits(prior_logits, 5)
  log_probs = np.asarray(jax.nn.log_softmax(prior_logits), np.float64)
  want_ids = np.argsort(-log_probs, axis=-1)[..., :5]
  np.testing.assert_array_equal(np.sort(cached.token_ids, -1), np.sort(want_ids, -1))
  np.testing.assert_allclose(cached.log_probs, np.take_along_axis(log_probs, want_ids, -1),
                             atol=1e-6)
  tail = 1 - np.exp(np.take_along_axis(log_probs, want_ids, -1)).sum(-1)
  np.testing.assert_allclose(np.exp(cached.tail_log_mass), tail, rtol=1e-4)
  # The reconstruction is a distribution, exact on the top k, the tail like the student's.
  logits, _, _ = _inputs(seed=1)
  rebuilt = np.exp(np.asarray(cached_prior.prior_log_probs(cached, logits), np.float64))
  np.testing.assert_allclose(rebuilt.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(rebuilt, want_ids, -1),
                             np.exp(np.take_along_axis(log_probs, want_ids, -1)), rtol=1e-5)
  p = np.asarray(jax.nn.softmax(logits), np.float64)
  outside = np.ones_like(p, bool)
  np.put_along_axis(outside, want_ids, False, -1)
  ratio = np.where(outside, rebuilt / p, np.nan)  # constant over the tail of each position
  spread = np.nanmax(ratio, -1) / np.nanmin(ratio, -1)
  np.testing.assert_allclose(spread, 1.0, rtol=1e-4)


@pytest.mark.parametrize('method, hyper', PRIOR_METHODS, ids=lambda x: str(x))
def test_k_equal_to_the_vocabulary_reproduces_the_online_prior(method, hyper):
  logits, prior_logits, labels = _inputs()
  cached = cached_prior.from_logits(prior_logits, VOCAB)
  assert np.all(np.isneginf(cached.tail_log_mass))

  def loss(z, prior):
    target = targets.get(method)(z, labels, prior_logits=prior, **hyper)
    return jnp.sum(losses.q_cross_entropy(z, labels, target))

  online, online_grad = jax.value_and_grad(loss)(logits, prior_logits)
  offline, offline_grad = jax.value_and_grad(loss)(logits, cached)
  np.testing.assert_allclose(offline, online, rtol=1e-6)
  np.testing.assert_allclose(offline_grad, online_grad, atol=1e-6)


@pytest.mark.parametrize('method, hyper', PRIOR_METHODS, ids=lambda x: str(x))
@pytest.mark.parametrize('k', [1, 4, 16])
@pytest.mark.parametrize('temperature', [0.5, 3.0])
def test_the_target_error_stays_within_the_bound(method, hyper, k, temperature):
  logits, prior_logits, labels = _inputs(seed=k, temperature=temperature, shape=(64,))
  cached = cached_prior.from_logits(prior_logits, k)
  exact = targets.get(method)(logits, labels, prior_logits=prior_logits, **hyper)
  approx = targets.get(method)(logits, labels, prior_logits=cached, **hyper)
  q, q_hat = (np.asarray(targets.dense(t, labels), np.float64) for t in (exact, approx))
  tv = 0.5 * np.abs(q - q_hat).sum(-1)
  powers = targets.METHODS[method].residual_powers(**hyper)
  bound = np.asarray(cached_prior.target_error_bound(cached, logits, exact.trust, *powers))
  assert np.all(tv <= bound + 1e-5), (tv - bound).max()
  # The bound is the docstring's, recomputed in float64 NumPy (all these methods have
  # a + b = 1 with a, b >= 0: the smaller of the Hölder and the general bound).
  a, b = (float(x) for x in powers)
  p = np.asarray(jax.nn.softmax(logits), np.float64)
  top = np.asarray(cached.token_ids)
  in_top = np.zeros_like(p, bool)
  np.put_along_axis(in_top, top, True, -1)
  cached_probs = np.exp(np.asarray(cached.log_probs, np.float64))
  t = np.exp(np.asarray(cached.tail_log_mass, np.float64))
  s_tail = np.where(in_top, 0.0, p).sum(-1)
  weights_top = (np.take_along_axis(p, top, -1) ** a * cached_probs ** b).sum(-1)
  tail_hat = (np.where(in_top, 0.0, p) ** a * np.where(in_top, 0.0, p * (t / s_tail)[:, None])
              ** b).sum(-1) if b else np.where(in_top, 0.0, p).sum(-1)
  beta_hat = tail_hat / (weights_top + tail_hat)
  largest_tail_prior = np.minimum(t, cached_probs.min(-1))
  general = (np.where(in_top, 0.0, p ** a).sum(-1) * largest_tail_prior ** b / weights_top)
  beta_bound = np.minimum(np.minimum(s_tail ** a * t ** b / weights_top, general), 1.0)
  want = (1 - np.asarray(exact.trust, np.float64)) * np.maximum(beta_hat, beta_bound)
  np.testing.assert_allclose(bound, want, rtol=1e-4, atol=1e-6)
  if b == 1 and temperature > 1:  # residual = prior, peaked distributions: nearly attained
    # (measured 0.83-0.97 of it; flat ones at temperature 0.5 reach only about 0.3)
    assert (tv / np.maximum(bound, 1e-12)).max() > 0.5
  # The prior's own error: TV(prior, cached prior) <= tail mass.
  prior = np.asarray(jax.nn.softmax(prior_logits), np.float64)
  rebuilt = np.exp(np.asarray(cached_prior.prior_log_probs(cached, logits), np.float64))
  prior_tv = 0.5 * np.abs(prior - rebuilt).sum(-1)
  assert np.all(prior_tv <= np.exp(np.asarray(cached.tail_log_mass)) + 1e-6)


def test_bad_caches_are_refused():
  logits, prior_logits, labels = _inputs()
  with pytest.raises(ValueError, match=r'k must be an int in \[1, 50\]'):
    cached_prior.from_logits(prior_logits, 51)
  cached = cached_prior.from_logits(prior_logits, 4)
  with pytest.raises(ValueError, match='does not match the student logits'):
    targets.target_sft(logits[:2], labels[:2], prior_logits=cached, eta=0.5)
  wrong_vocabulary = cached._replace(token_ids=cached.token_ids + VOCAB)
  with pytest.raises(ValueError, match='built for another vocabulary'):
    targets.target_sft(logits, labels, prior_logits=wrong_vocabulary, eta=0.5)


_FUSED_DEFAULT = (('distill', {}), ('target_sft', {'eta': 0.5}))  # the others are slow


@pytest.mark.parametrize('method, hyper', [
    pytest.param(m, h, marks=() if (m, h) in _FUSED_DEFAULT else pytest.mark.slow)
    for m, h in PRIOR_METHODS], ids=lambda x: str(x))
def test_the_fused_loss_takes_the_cache(method, hyper):
  """k = V: the fused loss with the cache equals the fused loss with the prior's head (1e-6);
  k = 4: it equals the dense loss with the same cache."""
  from qtarget import fused  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(3), 4)
  n, h = 12, 16
  hidden = jax.random.normal(keys[0], (n, h))
  head = jax.random.normal(keys[1], (h, VOCAB)) * 0.5
  prior_hidden = jax.random.normal(keys[2], (n, h))
  labels = jax.random.randint(keys[3], (n,), 0, VOCAB)
  prior_logits = prior_hidden @ head
  online = lambda hd, w: fused.q_cross_entropy_fused(
      hd, w, labels, method, prior_hidden_NxP=prior_hidden, prior_head_PxV=head, chunk_size=5,
      **hyper)[0]
  value, grads = jax.value_and_grad(online, argnums=(0, 1))(hidden, head)
  whole = cached_prior.from_logits(prior_logits, VOCAB)
  cached = lambda cache: lambda hd, w: fused.q_cross_entropy_fused(
      hd, w, labels, method, prior_cache=cache, chunk_size=5, **hyper)[0]
  value_c, grads_c = jax.value_and_grad(cached(whole), argnums=(0, 1))(hidden, head)
  np.testing.assert_allclose(value_c, value, rtol=1e-6)
  for got, want in zip(grads_c, grads):
    np.testing.assert_allclose(got, want, atol=1e-6)
  top4 = cached_prior.from_logits(prior_logits, 4)
  fused_value = jax.jit(cached(top4))(hidden, head)
  logits = hidden @ head
  target = targets.get(method)(logits, labels, prior_logits=top4, **hyper)
  dense_value = jnp.sum(losses.q_cross_entropy(logits, labels, target))
  np.testing.assert_allclose(fused_value, dense_value, rtol=1e-5)


def test_the_data_parallel_fused_loss_takes_the_cache():
  from qtarget import fused  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  keys = jax.random.split(jax.random.key(4), 4)
  hidden = jax.random.normal(keys[0], (16, 8))
  head = jax.random.normal(keys[1], (8, VOCAB))
  labels = jax.random.randint(keys[2], (16,), 0, VOCAB)
  cache = cached_prior.from_logits(jax.random.normal(keys[3], (16, VOCAB)), 6)
  whole, _ = fused.q_cross_entropy_fused(hidden, head, labels, 'target_sft', prior_cache=cache,
                                         eta=0.5)
  split, _ = jax.jit(lambda h, w: fused.q_cross_entropy_fused_sharded(
      h, w, labels, 'target_sft', mesh=mesh, token_axes=('data',), prior_cache=cache,
      eta=0.5))(hidden, head)
  np.testing.assert_allclose(split, whole, rtol=1e-5)
