"""Target constructors against the float64 NumPy reference, and their input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cases
import reference
from qtarget import targets


@pytest.mark.parametrize('case', cases.CASES, ids=cases.CASE_IDS)
def test_dense_target_matches_float64_reference(case):
  logits, prior_logits, labels = cases.make_batch()
  target_q = targets.dense(cases.make_target(case, logits, labels, prior_logits), labels)
  expected = reference.target(case.name, logits, labels, prior_logits, **case.hyperparameters)
  np.testing.assert_allclose(target_q, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(target_q, axis=-1), 1.0, atol=1e-6)
  if case.nonnegative:
    assert np.all(np.asarray(target_q) >= 0.0)
  else:
    assert np.any(np.asarray(target_q) < 0.0), 'a weight above 1 must give negative mass'


@pytest.mark.parametrize('case', cases.CASES, ids=cases.CASE_IDS)
def test_target_is_detached(case):
  logits, prior_logits, labels = cases.make_batch()

  def target_sum(student_logits, prior):
    target = cases.make_target(case, student_logits, labels, prior)
    return jnp.sum(targets.dense(target, labels) * jnp.arange(cases.VOCAB))

  grads = jax.grad(target_sum, argnums=(0, 1))(logits, prior_logits)
  for grad in grads:
    np.testing.assert_array_equal(grad, 0.0)


def test_trust_values_of_the_table():
  logits, prior_logits, labels = cases.make_batch()
  p_y = reference.label_prob(reference.softmax(logits), labels)
  expected = {
      'dft': p_y,
      'target_sft': p_y,
      'asft': p_y / (p_y + 0.3),
      'sft_kl': np.full_like(p_y, 1 / 1.7),
      'distill': np.zeros_like(p_y),
      'profit': (p_y > 0.3).astype(np.float64),
  }
  by_name = {case.name: case for case in cases.CASES}
  for name, trust in expected.items():
    target = cases.make_target(by_name[name], logits, labels, prior_logits)
    np.testing.assert_allclose(target.trust, trust, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_target_sft_endpoints(eta):
  logits, prior_logits, labels = cases.make_batch()
  target = targets.target_sft(logits, labels, prior_logits=prior_logits, eta=eta)
  if eta == 0.0:
    other = targets.dft(logits, labels)
  else:  # confidence-gated distillation: trust p_y, residual the prior.
    other = targets.asft(logits, labels, prior_logits=prior_logits, lam=0.0)
    other = other._replace(trust=jnp.exp(targets.label_log_probs(
        jax.nn.log_softmax(logits), labels)))
  np.testing.assert_allclose(targets.dense(target, labels), targets.dense(other, labels),
                             rtol=1e-5, atol=1e-7)


def test_per_token_hyperparameter_equals_per_position_scalars():
  logits, prior_logits, labels = cases.make_batch()
  eta_per_token = jnp.linspace(0.0, 1.0, labels.size).reshape(labels.shape)
  target = targets.target_sft(logits, labels, prior_logits=prior_logits, eta=eta_per_token)
  expected = reference.target('target_sft', logits, labels, prior_logits,
                              eta=np.asarray(eta_per_token, np.float64))
  np.testing.assert_allclose(targets.dense(target, labels), expected, rtol=1e-5, atol=1e-6)


def test_prior_with_minus_inf_logits_is_handled():
  # A prior that excludes tokens (logit -inf) must not produce NaN, also at eta = 0.
  logits, prior_logits, labels = cases.make_batch()
  prior_logits = prior_logits.at[..., :3].set(-jnp.inf)
  for eta in (0.0, 0.5, 1.0):
    target_q = targets.dense(
        targets.target_sft(logits, labels, prior_logits=prior_logits, eta=eta), labels)
    assert np.all(np.isfinite(target_q))
    np.testing.assert_allclose(target_q.sum(-1), 1.0, atol=1e-6)
    expected = reference.target('target_sft', logits, labels, prior_logits, eta=eta)
    np.testing.assert_allclose(target_q, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_give_float32_targets():
  logits, prior_logits, labels = cases.make_batch(dtype=jnp.bfloat16)
  target = targets.target_sft(logits, labels, prior_logits=prior_logits, eta=0.5)
  assert target.trust.dtype == jnp.float32 and target.log_residual.dtype == jnp.float32
  expected = reference.target('target_sft', np.asarray(logits, np.float64), labels,
                              np.asarray(prior_logits, np.float64), eta=0.5)
  np.testing.assert_allclose(targets.dense(target, labels), expected, rtol=1e-5, atol=1e-6)


def test_out_of_range_label_gives_nan_row():
  logits, prior_logits, labels = cases.make_batch()
  labels = labels.at[0, 1].set(-1).at[1, 2].set(cases.VOCAB)
  target_q = targets.dense(targets.dft(logits, labels), labels)
  assert np.isnan(target_q[0, 1]).all() and np.isnan(target_q[1, 2]).all()
  assert np.isfinite(target_q[0, 0]).all()


# Bad input: each error names the problem.

def test_mismatched_shapes():
  logits, _, labels = cases.make_batch()
  with pytest.raises(ValueError, match='do not match'):
    targets.dft(logits, labels[:, :-1])


def test_prior_vocabulary_mismatch():
  logits, prior_logits, labels = cases.make_batch()
  with pytest.raises(ValueError, match='vocabulary size 12 differs'):
    targets.target_sft(logits, labels, prior_logits=jnp.pad(prior_logits, ((0, 0),) * 2 + ((0, 1),)),
                       eta=0.5)


def test_prior_required():
  logits, _, labels = cases.make_batch()
  for name, hyper in [('target_sft', {'eta': 0.5}), ('distill', {}), ('asft', {'lam': 0.1}),
                      ('sft_kl', {'lam': 0.1}), ('hybrid_distill', {'lam': 0.1})]:
    with pytest.raises(ValueError, match=f'{name}.*needs the prior'):
      targets.get(name)(logits, labels, **hyper)


def test_integer_logits_rejected():
  _, _, labels = cases.make_batch()
  with pytest.raises(TypeError, match='floating-point.*int32'):
    targets.dft(jnp.zeros(labels.shape + (4,), jnp.int32), labels)


def test_float_labels_rejected():
  logits, _, labels = cases.make_batch()
  with pytest.raises(TypeError, match='labels must be an integer'):
    targets.dft(logits, labels.astype(jnp.float32))


@pytest.mark.parametrize('name, hyper, message', [
    ('target_sft', {'eta': 1.5}, r'eta=1.5 is outside its valid range \[0.0, 1.0\]'),
    ('target_sft', {'eta': -0.1}, 'eta=-0.1'),
    ('label_smoothing', {'lam': 2.0}, 'lam=2.0'),
    ('hybrid_distill', {'lam': -1.0}, 'lam=-1.0'),
    ('sft_kl', {'lam': -0.5}, 'lam=-0.5'),
    ('asft', {'lam': float('nan')}, 'lam=nan'),
    ('beyond_log', {'alpha': -0.5}, 'alpha=-0.5'),
    ('profit', {'tau': 1.2}, 'tau=1.2'),
    ('eaft', {'k': 1}, 'k=1'),
    ('eaft', {'k': 99}, 'k=99'),
    ('weighted', {'weights': -1.0}, 'weights=-1.0'),
    ('target_sft', {'eta': np.array([0.2, 3.0])}, 'eta=3.0'),
])
def test_hyperparameter_out_of_range(name, hyper, message):
  logits, prior_logits, labels = cases.make_batch(shape=(2,))
  with pytest.raises(ValueError, match=message):
    targets.get(name)(logits, labels, prior_logits=prior_logits, **hyper)


def test_hyperparameter_wrong_shape():
  logits, prior_logits, labels = cases.make_batch()
  with pytest.raises(ValueError, match='eta of shape .3,. must be a scalar or broadcast'):
    targets.target_sft(logits, labels, prior_logits=prior_logits, eta=jnp.zeros(3))


def test_missing_or_unknown_hyperparameter():
  logits, prior_logits, labels = cases.make_batch()
  with pytest.raises(TypeError, match="missing \\['eta'\\]"):
    targets.build(targets.METHODS['target_sft'], logits, labels, prior_logits=prior_logits)
  with pytest.raises(TypeError, match="unknown \\['beta'\\]"):
    targets.build(targets.METHODS['dft'], logits, labels, beta=1.0)


def test_unknown_method():
  with pytest.raises(ValueError, match="unknown method 'sfft'; known methods: asft, beyond_log"):
    targets.get('sfft')
