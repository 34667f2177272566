"""The unification: each native loss induces the target its constructor builds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cases
import reference
from qtarget import losses
from qtarget import native
from qtarget import targets

_WITH_NATIVE = [case for case in cases.CASES if case.native_loss is not None]


def _factor(case, logits, labels):
  """The positive per-token factor between the native gradient and p - Q (else 1)."""
  p_y = reference.label_prob(reference.softmax(logits), labels)
  if case.name == 'sft_kl':  # -log p_y + lam KL: gradient (1 + lam)(p - Q)
    return np.full_like(p_y, 1.0 + case.hyperparameters['lam'])
  if case.name == 'asft':  # DFT + lam KL: gradient (p_y + lam)(p - Q)
    return p_y + case.hyperparameters['lam']
  return np.ones_like(p_y)


@pytest.mark.parametrize('case', _WITH_NATIVE, ids=[case.name for case in _WITH_NATIVE])
def test_induced_target_of_native_loss_equals_constructed_target(case):
  logits, prior_logits, labels = cases.make_batch(seed=3)
  induced = losses.induced_target(cases.native_loss(case, prior_logits), logits, labels)
  constructed = targets.dense(cases.make_target(case, logits, labels, prior_logits), labels)
  probs = reference.softmax(logits)
  native_gradient = probs - np.asarray(induced.target, np.float64)
  factor = _factor(case, logits, labels)[..., None]
  np.testing.assert_allclose(native_gradient / factor, probs - constructed, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(induced.total_mass, 1.0, atol=1e-5)
  if case.name in ('sft_kl', 'asft'):
    # Without the factor the induced target differs: the factor is not 1 here.
    assert not np.allclose(induced.target, constructed, atol=1e-3)


@pytest.mark.parametrize('case', _WITH_NATIVE, ids=[case.name for case in _WITH_NATIVE])
def test_q_cross_entropy_gradient_equals_native_gradient(case):
  # The training path (target + Q-CE) and the native loss move the logits the same way.
  logits, prior_logits, labels = cases.make_batch(seed=4)
  native_grad = jax.grad(lambda z: jnp.sum(cases.native_loss(case, prior_logits)(z, labels)))(
      logits)
  q_grad = jax.grad(lambda z: jnp.sum(losses.q_cross_entropy(
      z, labels, cases.make_target(case, z, labels, prior_logits))))(logits)
  factor = _factor(case, logits, labels)[..., None]
  np.testing.assert_allclose(native_grad / factor, q_grad, rtol=1e-5, atol=1e-6)


def test_gem_induced_target_is_not_a_mixture():
  logits, _, labels = cases.make_batch(seed=5)
  beta = 0.5
  induced = losses.induced_target(functools.partial(native.gem, beta=beta), logits, labels)
  probs = reference.softmax(logits)
  q = probs ** (1 / beta)
  q /= q.sum(-1, keepdims=True)
  expected = reference.onehot(labels, cases.VOCAB) + probs - q
  np.testing.assert_allclose(induced.target, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(induced.total_mass, 1.0, atol=1e-5)
  expected_negative = np.maximum(-expected, 0.0).sum(-1)
  np.testing.assert_allclose(induced.negative_mass, expected_negative, rtol=1e-4, atol=1e-6)
  # Sharpening (beta < 1) takes mass from the model's top non-label tokens below zero:
  # no trust in [0, 1] and residual >= 0 can produce a negative entry.
  assert float(jnp.max(induced.negative_mass)) > 0.05
  print('GEM beta=0.5 negative mass per token:', np.round(np.asarray(induced.negative_mass), 3))


def test_gem_beta_one_is_nll():
  logits, _, labels = cases.make_batch(seed=5)
  induced = losses.induced_target(functools.partial(native.gem, beta=1.0), logits, labels)
  np.testing.assert_allclose(induced.target, reference.onehot(labels, cases.VOCAB), atol=1e-6)
  assert float(jnp.max(induced.negative_mass)) < 1e-6  # float32 rounding only


def test_induced_target_reports_negative_mass_of_weighted_nll():
  logits, _, labels = cases.make_batch()
  induced = losses.induced_target(functools.partial(native.weighted, weights=1.5), logits, labels)
  # Q = 1.5 onehot - 0.5 p: negative mass 0.5 (1 - p_y).
  p_y = reference.label_prob(reference.softmax(logits), labels)
  np.testing.assert_allclose(induced.negative_mass, 0.5 * (1 - p_y), rtol=1e-5, atol=1e-6)


def test_native_beyond_log_rejects_alpha_zero():
  logits, _, labels = cases.make_batch()
  with pytest.raises(ValueError, match='alpha=0.0'):
    native.beyond_log(logits, labels, alpha=0.0)


def test_induced_target_rejects_bad_input():
  logits, _, labels = cases.make_batch()
  with pytest.raises(ValueError, match='do not match'):
    losses.induced_target(native.dft, logits, labels[:1])
