"""q_cross_entropy: values, gradient p - Q, masks, extreme inputs, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

import cases
import reference
from qtarget import losses
from qtarget import targets


def _loss(case, logits, labels, prior_logits, where=None):
  target = cases.make_target(case, logits, labels, prior_logits)
  return losses.q_cross_entropy(logits, labels, target, where=where)


@pytest.mark.parametrize('case', cases.CASES, ids=cases.CASE_IDS)
def test_loss_under_jit_matches_float64_reference(case):
  logits, prior_logits, labels = cases.make_batch()
  loss = jax.jit(lambda z, y, zp: _loss(case, z, y, zp))(logits, labels, prior_logits)
  target_q = reference.target(case.name, logits, labels, prior_logits, **case.hyperparameters)
  assert loss.dtype == jnp.float32 and loss.shape == labels.shape
  np.testing.assert_allclose(loss, reference.cross_entropy(target_q, logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', cases.CASES, ids=cases.CASE_IDS)
def test_gradient_is_p_minus_q(case):
  logits, prior_logits, labels = cases.make_batch()
  grad = jax.jit(jax.grad(lambda z: jnp.sum(_loss(case, z, labels, prior_logits))))(logits)
  target_q = reference.target(case.name, logits, labels, prior_logits, **case.hyperparameters)
  np.testing.assert_allclose(grad, reference.softmax(logits) - target_q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', cases.CASES, ids=cases.CASE_IDS)
def test_where_equals_boolean_indexing(case):
  logits, prior_logits, labels = cases.make_batch(seed=1)
  where = jnp.array([[True, False, True, True, False], [False, True, True, False, True]])
  # Garbage at masked positions: padding labels and NaN logits must not leak.
  labels = jnp.where(where, labels, -100)
  logits = jnp.where(where[..., None], logits, jnp.nan)
  target = cases.make_target(case, jnp.where(where[..., None], logits, 0.0),
                             jnp.where(where, labels, 0), prior_logits)
  target = target._replace(trust=jnp.where(where, target.trust, jnp.nan))

  def total(z):
    return jnp.sum(losses.q_cross_entropy(z, labels, target, where=where))

  loss_masked = losses.q_cross_entropy(logits, labels, target, where=where)
  loss_indexed = losses.q_cross_entropy(
      logits[where], labels[where], targets.Target(target.trust[where], target.log_residual[where]))
  np.testing.assert_array_equal(loss_masked[~where], 0.0)
  np.testing.assert_allclose(loss_masked[where], loss_indexed, rtol=1e-6, atol=1e-7)

  grad = jax.grad(total)(logits)
  grad_indexed = jax.grad(lambda z: jnp.sum(losses.q_cross_entropy(
      z, labels[where], targets.Target(target.trust[where], target.log_residual[where]))))(
          logits[where])
  np.testing.assert_array_equal(grad[~where], 0.0)
  np.testing.assert_allclose(grad[where], grad_indexed, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('case', cases.CASES, ids=cases.CASE_IDS)
def test_check_grads(case):
  with jax.enable_x64(True):
    logits, prior_logits, labels = cases.make_batch(dtype=jnp.float64)
    target = cases.make_target(case, logits, labels, prior_logits)
    test_util.check_grads(lambda z: losses.q_cross_entropy(z, labels, target), (logits,),
                          order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('case', cases.CASES, ids=cases.CASE_IDS)
@pytest.mark.parametrize('scale', [1e4, -1e4])
def test_extreme_logits_are_finite(case, scale):
  logits, prior_logits, labels = cases.make_batch(scale=1.0)
  # Logits of +-1e4 on a few tokens: probabilities underflow to exactly 0 and 1.
  logits = logits.at[..., 0].set(scale).at[..., 5].set(-scale)
  prior_logits = prior_logits.at[..., 3].set(scale).at[..., 7].set(-scale)
  loss, grad = jax.value_and_grad(
      lambda z: jnp.sum(_loss(case, z, labels, prior_logits)))(logits)
  assert np.isfinite(loss)
  assert np.all(np.isfinite(grad))
  target_q = reference.target(case.name, logits, labels, prior_logits, **case.hyperparameters)
  np.testing.assert_allclose(grad, reference.softmax(logits) - target_q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', cases.CASES, ids=cases.CASE_IDS)
def test_bfloat16_inputs(case):
  logits, prior_logits, labels = cases.make_batch(dtype=jnp.bfloat16)
  loss, grad = jax.value_and_grad(lambda z: jnp.sum(_loss(case, z, labels, prior_logits)))(logits)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))
  # The loss itself is computed in float32 from the bfloat16 values: compare at that precision.
  logits64 = np.asarray(logits, np.float64)
  prior64 = np.asarray(prior_logits, np.float64)
  target_q = reference.target(case.name, logits64, labels, prior64, **case.hyperparameters)
  np.testing.assert_allclose(loss, reference.cross_entropy(target_q, logits64).sum(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad, np.float32), reference.softmax(logits64) - target_q,
                             atol=1e-2)


_TOKENWISE = [case for case in cases.CASES if case.name != 'weighted']  # weights: next test


@pytest.mark.parametrize('case', _TOKENWISE, ids=[case.name for case in _TOKENWISE])
def test_vmap_over_batch(case):
  logits, prior_logits, labels = cases.make_batch()

  def per_sequence(z, y, zp):
    return _loss(case, z, y, zp)

  batched = jax.vmap(per_sequence)(logits, labels, prior_logits)
  np.testing.assert_allclose(batched, _loss(case, logits, labels, prior_logits), rtol=1e-6)


def test_vmap_weighted_per_sequence_weight():
  logits, _, labels = cases.make_batch()
  weights = jnp.array([0.4, 1.5])

  def per_sequence(z, y, w):
    return losses.q_cross_entropy(z, y, targets.weighted(z, y, weights=w))

  batched = jax.vmap(per_sequence)(logits, labels, weights)
  direct = losses.q_cross_entropy(logits, labels,
                                  targets.weighted(logits, labels, weights=weights[:, None]))
  np.testing.assert_allclose(batched, direct, rtol=1e-6)


def test_eta_sweep_compiles_once():
  logits, prior_logits, labels = cases.make_batch()
  traces = []

  @jax.jit
  def mean_loss(z, y, zp, eta):
    traces.append(None)  # runs only while tracing
    target = targets.target_sft(z, y, prior_logits=zp, eta=eta)
    return jnp.mean(losses.q_cross_entropy(z, y, target))

  etas = [0.0, 0.25, 0.5, 0.75, 1.0]
  values = [float(mean_loss(logits, labels, prior_logits, eta)) for eta in etas]
  assert len(traces) == 1
  assert mean_loss._cache_size() == 1
  for eta, value in zip(etas, values):
    target_q = reference.target('target_sft', logits, labels, prior_logits, eta=eta)
    np.testing.assert_allclose(value, reference.cross_entropy(target_q, logits).mean(), rtol=1e-5)
  assert len(set(values)) == len(etas)


def test_per_token_traced_hyperparameter():
  logits, prior_logits, labels = cases.make_batch()
  lam = jnp.linspace(0.0, 0.9, labels.size).reshape(labels.shape)
  loss = jax.jit(lambda lam: losses.q_cross_entropy(
      logits, labels, targets.hybrid_distill(logits, labels, prior_logits=prior_logits, lam=lam)))(
          lam)
  target_q = reference.target('hybrid_distill', logits, labels, prior_logits,
                              lam=np.asarray(lam, np.float64))
  np.testing.assert_allclose(loss, reference.cross_entropy(target_q, logits), rtol=1e-5)


def test_out_of_range_labels_raise_when_concrete():
  logits, _, labels = cases.make_batch()
  bad = labels.at[1, 3].set(cases.VOCAB + 4)
  target = targets.dft(logits, bad)
  with pytest.raises(ValueError, match=r'outside \[0, 11\).*15 at index \(1, 3\)'):
    losses.q_cross_entropy(logits, bad, target)
  # Masked, the same label is fine.
  where = jnp.ones(labels.shape, bool).at[1, 3].set(False)
  assert np.all(np.isfinite(losses.q_cross_entropy(logits, bad, target, where=where)))


def test_out_of_range_labels_give_nan_under_jit():
  logits, _, labels = cases.make_batch()
  bad = labels.at[1, 3].set(-1)

  @jax.jit
  def loss_and_grad(z, y):
    return jax.value_and_grad(
        lambda z: jnp.sum(losses.q_cross_entropy(z, y, targets.dft(z, y)) * (y >= -10)))(z)

  loss, grad = loss_and_grad(logits, bad)
  assert np.isnan(loss)
  assert np.isnan(grad[1, 3]).all() and np.isfinite(grad[0]).all()


def test_bad_where_and_target_shapes():
  logits, _, labels = cases.make_batch()
  target = targets.dft(logits, labels)
  with pytest.raises(TypeError, match='where must be a boolean mask'):
    losses.q_cross_entropy(logits, labels, target, where=jnp.ones(labels.shape))
  with pytest.raises(ValueError, match='where of shape'):
    losses.q_cross_entropy(logits, labels, target, where=jnp.ones((2,), bool))
  with pytest.raises(ValueError, match='target.log_residual of shape'):
    losses.q_cross_entropy(logits[:1], labels[:1], target)
  with pytest.raises(ValueError, match='do not match'):
    losses.q_cross_entropy(logits, labels[:, :2], target)


def test_a_residual_that_does_not_sum_to_one_is_refused():
  """A hand-built target whose residual is unnormalized: its loss's own gradient is not p - Q
  (checked here with jax.grad of the formula), so a concrete one raises."""
  logits = jnp.array([[1.0, 0.5, -1.0, 0.0]])
  labels = jnp.array([1])
  unnormalized = targets.Target(trust=jnp.array([0.3]), log_residual=jnp.log(
      jnp.array([[0.5, 0.5, 0.5, 0.5]])))  # sums to 2
  with pytest.raises(ValueError, match=r'does not sum to one at 1 position.*sums to 2'):
    losses.q_cross_entropy(logits, labels, unnormalized)
  # Why: the formula's gradient differs from the custom p - Q for such a target.
  log_probs = jax.nn.log_softmax(logits)
  formula = lambda z: (-0.3 * jax.nn.log_softmax(z)[0, 1]
                       - 0.7 * jnp.sum(0.5 * jax.nn.log_softmax(z)))
  q = 0.3 * jax.nn.one_hot(labels, 4) + 0.7 * 0.5
  assert not np.allclose(jax.grad(formula)(logits), jnp.exp(log_probs) - q, atol=1e-3)
  # Masked positions, and positions with trust 1, do not use the residual: no error.
  losses.q_cross_entropy(logits, labels, unnormalized, where=jnp.array([False]))
  losses.q_cross_entropy(logits, labels, unnormalized._replace(trust=jnp.array([1.0])))
  # A normalized residual passes; under jit nothing is checked (documented contract).
  normalized = unnormalized._replace(log_residual=jax.nn.log_softmax(unnormalized.log_residual))
  losses.q_cross_entropy(logits, labels, normalized)
  jitted = jax.jit(losses.q_cross_entropy)(logits, labels, unnormalized)
  assert np.isfinite(jitted).all()


@pytest.mark.parametrize('name, hyper', [
    ('target_sft', {'eta': 1.5}), ('label_smoothing', {'lam': 2.0}), ('profit', {'tau': -0.1}),
    ('sft_kl', {'lam': -0.5}), ('beyond_log', {'alpha': -0.5}), ('weighted', {'weights': -1.0})])
def test_traced_hyperparameters_outside_their_range_give_nan(name, hyper):
  """Under jit a value cannot be range-checked: the positions it reaches get a NaN loss, not the
  finite loss of a target with negative mass (profit's trust would be a finite 1 at tau < 0)."""
  logits, prior_logits, labels = cases.make_batch()
  (key, value), = hyper.items()
  prior = prior_logits if targets.needs_prior(name) else None

  @jax.jit
  def loss(v):
    target = targets.get(name)(logits, labels, prior_logits=prior, **{key: v})
    return losses.q_cross_entropy(logits, labels, target)

  assert np.isnan(loss(value)).all()
  per_token = jnp.full(labels.shape, 0.5 if name != 'weighted' else 1.0).at[0, 2].set(value)
  mixed = loss(per_token)  # one position out of range: only it is NaN
  assert np.isnan(mixed[0, 2]) and np.isfinite(np.delete(mixed.ravel(), 2)).all()
  with pytest.raises(ValueError, match=f'{key}=.* is outside its valid range'):
    targets.get(name)(logits, labels, prior_logits=prior, **hyper)  # concrete: an error


def test_nan_inputs_are_named_when_concrete():
  logits, prior_logits, labels = cases.make_batch()
  nan_logits = logits.at[1, 3, 4].set(jnp.nan)
  with pytest.raises(ValueError, match=r'^logits holds NaN or \+inf at 1 unmasked '
                                       r'position\(s\), the first at index \(1, 3\)'):
    losses.q_cross_entropy(nan_logits, labels, targets.sft(nan_logits, labels))
  inf_logits = logits.at[0, 1, 2].set(jnp.inf)  # softmax would be NaN; -inf stays allowed
  with pytest.raises(ValueError, match=r'^logits holds NaN or \+inf .* index \(0, 1\)'):
    losses.q_cross_entropy(inf_logits, labels, targets.sft(inf_logits, labels))
  minus_inf = logits.at[0, 1, 2].set(-jnp.inf)
  finite = losses.q_cross_entropy(minus_inf, labels, targets.sft(minus_inf, labels))
  assert np.isfinite(finite).all()
  nan_prior = prior_logits.at[0, 4, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r'target.log_residual holds NaN .* index \(0, 4\).*'
                                       'prior_logits'):
    losses.q_cross_entropy(logits, labels, targets.sft_kl(logits, labels, prior_logits=nan_prior,
                                                           lam=0.5))
  # Masked, the same NaN is fine.
  where = jnp.ones(labels.shape, bool).at[1, 3].set(False).at[0, 4].set(False)
  assert np.isfinite(losses.q_cross_entropy(nan_logits, labels, targets.sft(nan_logits, labels),
                                            where=where)).all()
  with pytest.raises(TypeError, match="hyperparameter eta must be a number .* string '0.5'"):
    targets.target_sft(logits, labels, prior_logits=prior_logits, eta='0.5')
