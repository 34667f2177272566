"""The fused Q cross-entropy equals the dense one, without the N x V logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget import fused
from qtarget import losses
from qtarget import targets

N, H, P, V = 37, 16, 24, 203  # N and V deliberately not multiples of the chunk

HYPER = {'sft': {}, 'label_smoothing': {'lam': 0.1}, 'dft': {}, 'beyond_log': {'alpha': 0.5},
         'profit': {'tau': 0.2}, 'sft_kl': {'lam': 0.7}, 'asft': {'lam': 0.3}, 'distill': {},
         'hybrid_distill': {'lam': 0.4}, 'target_sft': {'eta': 0.3}, 'eaft': {'k': 4}}


def _inputs(dtype=jnp.float32, scale=3.0, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  hidden = jax.random.normal(keys[0], (N, H)).astype(dtype)
  head = (scale * jax.random.normal(keys[1], (H, V)) / H ** 0.5).astype(dtype)
  prior_hidden = jax.random.normal(keys[2], (N, P)).astype(dtype)
  prior_head = (scale * jax.random.normal(keys[3], (P, V)) / P ** 0.5).astype(dtype)
  labels = jax.random.randint(keys[4], (N,), 0, V)
  weights = jax.random.uniform(keys[5], (N,)) * (jnp.arange(N) % 5 != 0)  # some masked
  labels = jnp.where(weights > 0, labels, -100)  # padding labels where masked
  return hidden, head, prior_hidden, prior_head, labels, weights


def _dense_loss(method, hidden, head, prior_hidden, prior_head, labels, weights, **hyper):
  logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
  prior_logits = jnp.dot(prior_hidden, prior_head, preferred_element_type=jnp.float32)
  needs_prior = targets.METHODS[method].needs_prior
  safe_labels = jnp.where(weights > 0, labels, 0)
  target = targets.get(method)(logits, safe_labels,
                               prior_logits=prior_logits if needs_prior else None, **hyper)
  per_token = losses.q_cross_entropy(logits, safe_labels, target, where=weights > 0)
  return jnp.sum(per_token * weights), per_token


def _fused_loss(method, hidden, head, prior_hidden, prior_head, labels, weights, chunk_size=8,
                **hyper):
  return fused.q_cross_entropy_fused(hidden, head, labels, method, prior_hidden_NxP=prior_hidden,
                                     prior_head_PxV=prior_head, weights_N=weights,
                                     chunk_size=chunk_size, **hyper)


def _grads(loss_fn, args):
  return jax.jit(jax.value_and_grad(lambda *a: loss_fn(*a)[0], argnums=(0, 1, 2, 3)))(*args)


@pytest.mark.parametrize('method', list(HYPER))  # every built-in method of targets.METHODS
@pytest.mark.parametrize('scale', [3.0, 300.0], ids=['normal', 'extreme'])
def test_equals_dense_float32(method, scale):
  args = _inputs(scale=scale)
  dense = functools.partial(_dense_loss, method, **HYPER[method])
  fast = functools.partial(_fused_loss, method, **HYPER[method])
  (dense_value, dense_grads), (fused_value, fused_grads) = _grads(dense, args), _grads(fast, args)
  assert np.isfinite(fused_value)
  np.testing.assert_allclose(fused_value, dense_value, rtol=1e-5, atol=1e-5)
  for name, got, want in zip(('hidden', 'head'), fused_grads[:2], dense_grads[:2]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
  # No gradient reaches the prior.
  for got in fused_grads[2:]:
    np.testing.assert_array_equal(got, 0.0)
  _, aux = fast(*args)
  _, dense_per_token = dense(*args)
  np.testing.assert_allclose(aux.per_token_loss, dense_per_token, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', ['dft', 'target_sft', 'hybrid_distill'])
def test_equals_dense_bfloat16(method):
  args = _inputs(dtype=jnp.bfloat16)
  dense = functools.partial(_dense_loss, method, **HYPER[method])
  fast = functools.partial(_fused_loss, method, **HYPER[method])
  (dense_value, dense_grads), (fused_value, fused_grads) = _grads(dense, args), _grads(fast, args)
  assert fused_grads[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(fused_value, dense_value, rtol=2e-2)
  for got, want in zip(fused_grads[:2], dense_grads[:2]):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)


@pytest.mark.parametrize('chunk_size', [1, 4, 16])
def test_head_gradient_accumulated_in_bfloat16_within_its_bound(chunk_size):
  """'head_dtype' accumulation of a bfloat16 head: the head gradient is within the recursive-
  summation bound of the docstring against a float64 sum of the same per-chunk products."""
  hidden, head, prior_hidden, prior_head, labels, weights = _inputs(dtype=jnp.bfloat16)
  labels = jnp.where(weights > 0, labels, 0)

  def head_grad(accumulation):
    loss = lambda w: fused.q_cross_entropy_fused(
        hidden, w, labels, 'target_sft', prior_hidden_NxP=prior_hidden,
        prior_head_PxV=prior_head, weights_N=weights, chunk_size=chunk_size,
        head_grad_accumulation=accumulation, eta=0.3)[0]
    return np.asarray(jax.jit(jax.grad(loss))(head), np.float64)

  narrow, wide = head_grad('head_dtype'), head_grad('float32')
  # The float64 reference: each chunk's logit gradient as the fused loss rounds it (the same
  # function on the same chunk), multiplied and summed in float64.
  partial_sums, total, magnitude = [], np.zeros(head.shape), np.zeros(head.shape)
  for start in range(0, N, chunk_size):
    rows = slice(start, start + chunk_size)
    _, grad_logits, _ = fused._chunk_values(
        targets.METHODS['target_sft'], hidden[rows], head, labels[rows], weights[rows],
        prior_hidden[rows], prior_head, None, {'eta': jnp.full(hidden[rows].shape[0], 0.3)}, {})
    grad_logits = np.asarray(grad_logits.astype(jnp.bfloat16), np.float64)
    rows_hidden = np.asarray(hidden[rows], np.float64)
    total = total + rows_hidden.T @ grad_logits
    magnitude = magnitude + np.abs(rows_hidden).T @ np.abs(grad_logits)
    partial_sums.append(np.abs(total) + np.abs(rows_hidden.T @ grad_logits))
  u = 2.0 ** -8
  bound = u * sum(partial_sums)  # every product and every partial sum rounded once
  float32_slack = 1e-5 * magnitude + 1e-12  # float32 products and sums within a chunk
  assert np.all(np.abs(narrow - total) <= bound + float32_slack)
  assert np.all(np.abs(wide - total) <= u * np.abs(total) + float32_slack)
  chunks = -(-N // chunk_size)
  if chunks > 1:  # the accumulator really is narrow: its result is not the float32 one
    assert np.any(narrow != wide)
    # and the bound is not vacuous: the largest error uses a visible part of it
    assert np.max(np.abs(narrow - total) / (bound + 1e-30)) > 0.05


def test_head_grad_accumulation_keeps_a_float32_head_exact():
  args = _inputs()
  grads = [_grads(functools.partial(_fused_loss, 'target_sft', eta=0.3,
                                    head_grad_accumulation=a), args)[1][1]
           for a in ('float32', 'head_dtype')]
  np.testing.assert_array_equal(grads[0], grads[1])
  with pytest.raises(ValueError, match="head_grad_accumulation must be one of"):
    _fused_loss('target_sft', *args, eta=0.3, head_grad_accumulation='bfloat16')


@pytest.mark.parametrize('chunk_size', [1, 5, 37, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
  args = _inputs()
  reference, _ = _fused_loss('target_sft', *args, chunk_size=8, eta=0.3)
  value, _ = _fused_loss('target_sft', *args, chunk_size=chunk_size, eta=0.3)
  np.testing.assert_allclose(value, reference, rtol=1e-6)


def test_per_token_hyperparameters_and_no_recompilation():
  args = _inputs()
  traces = []

  @jax.jit
  def loss(eta, *a):
    traces.append(None)
    return _fused_loss('target_sft', *a, eta=eta)[0]

  values = [float(loss(jnp.asarray(eta), *args)) for eta in (0.0, 0.5, 1.0)]
  per_token_eta = jnp.linspace(0.0, 1.0, N)
  per_token = float(loss(per_token_eta, *args))
  dense_per_token = float(_dense_loss('target_sft', *args, eta=per_token_eta)[0])
  assert len(traces) == 2  # once for scalars, once for the [N] shape
  assert len(set(values)) == 3
  np.testing.assert_allclose(per_token, dense_per_token, rtol=1e-5)


def _temporaries(n, h=64, v=4096, chunk_size=128):
  hidden, head, labels, weights = jnp.zeros((n, h)), jnp.zeros((h, v)), jnp.zeros(
      (n,), jnp.int32), jnp.ones(n)
  dense = jax.jit(jax.grad(lambda x, w: _dense_loss('target_sft', x, w, x, w, labels, weights,
                                                    eta=0.5)[0], argnums=(0, 1)))
  fast = jax.jit(jax.grad(lambda x, w: _fused_loss('target_sft', x, w, x, w, labels, weights,
                                                   chunk_size=chunk_size, eta=0.5)[0],
                          argnums=(0, 1)))
  temp = lambda f: f.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes
  return temp(dense), temp(fast)


def test_no_tokens_x_vocabulary_temporaries():
  n, h, v, chunk = 2048, 64, 4096, 128
  dense_small, fused_small = _temporaries(n, h, v, chunk)
  dense_large, fused_large = _temporaries(4 * n, h, v, chunk)
  # Dense holds N x V arrays: its temporaries grow with the tokens.
  assert dense_small >= n * v * 4 and dense_large >= 3.5 * dense_small
  # Fused holds a few chunk x V arrays; only O(N x H) terms grow with the tokens.
  assert fused_small < 8 * chunk * v * 4, fused_small
  assert fused_large - fused_small < 4 * (3 * n) * h * 4 * 2, (fused_small, fused_large)


def test_bad_input():
  hidden, head, prior_hidden, prior_head, labels, weights = _inputs()
  with pytest.raises(ValueError, match="unknown method 'weighted_mean'"):
    fused.q_cross_entropy_fused(hidden, head, labels, 'weighted_mean')
  with pytest.raises(ValueError, match="'weighted' has a constructor but no table entry"):
    fused.q_cross_entropy_fused(hidden, head, labels, 'weighted', weights=1.0)
  with pytest.raises(TypeError, match='k must be a Python int'):
    fused.q_cross_entropy_fused(hidden, head, labels, 'eaft', k=4.0)
  with pytest.raises(ValueError, match=r'k=300 is outside its valid range \[2, 203\]'):
    fused.q_cross_entropy_fused(hidden, head, labels, 'eaft', k=300)
  if 'pallas' not in fused._EXTRA_IMPLEMENTATIONS:  # pylint: disable=protected-access
    with pytest.raises(ValueError, match='import qtarget.experimental.fused_pallas first'):
      fused.q_cross_entropy_fused(hidden, head, labels, 'dft', implementation='pallas')
  with pytest.raises(ValueError, match="implementation must be one of"):
    fused.q_cross_entropy_fused(hidden, head, labels, 'dft', implementation='triton')
  with pytest.raises(ValueError, match='needs the prior'):
    fused.q_cross_entropy_fused(hidden, head, labels, 'target_sft', eta=0.5)
  with pytest.raises(ValueError, match="prior head's vocabulary size 202 differs"):
    fused.q_cross_entropy_fused(hidden, head, labels, 'target_sft', prior_hidden_NxP=prior_hidden,
                                prior_head_PxV=prior_head[:, :-1], eta=0.5)
  with pytest.raises(ValueError, match='do not chain'):
    fused.q_cross_entropy_fused(hidden, head[:-1], labels, 'dft')
  with pytest.raises(ValueError, match=r'labels_N of shape \(36,\)'):
    fused.q_cross_entropy_fused(hidden, head, labels[:-1], 'dft')
  with pytest.raises(TypeError, match='floating-point'):
    fused.q_cross_entropy_fused(hidden.astype(jnp.int32), head, labels, 'dft')
  with pytest.raises(ValueError, match='eta=1.5'):
    fused.q_cross_entropy_fused(hidden, head, labels, 'target_sft', prior_hidden_NxP=prior_hidden,
                                prior_head_PxV=prior_head, eta=1.5)
  with pytest.raises(ValueError, match=r'outside \[0, 203\)'):
    fused.q_cross_entropy_fused(hidden, head, labels, 'dft')  # -100 labels without weights


def test_bad_labels_weights_and_hyperparameters_under_jit_give_nan():
  """Out-of-range labels at non-zero weight, and traced hyperparameters outside their range,
  give a NaN loss, as the dense loss does; distillation's zero trust must not hide the label."""
  hidden, head, prior_hidden, prior_head, labels, weights = _inputs()
  bad_labels = labels.at[1].set(V + 5)
  assert weights[1] > 0
  loss = jax.jit(lambda y: _fused_loss('distill', hidden, head, prior_hidden, prior_head, y,
                                       weights)[0])
  assert np.isfinite(loss(labels)) and np.isnan(loss(bad_labels))
  eta_loss = jax.jit(lambda eta: _fused_loss('target_sft', hidden, head, prior_hidden,
                                             prior_head, labels, weights, eta=eta)[0])
  assert np.isfinite(eta_loss(1.0)) and np.isnan(eta_loss(1.5))


def test_bad_prior_rows_labels_and_weights_are_named():
  hidden, head, prior_hidden, prior_head, labels, weights = _inputs()
  with pytest.raises(ValueError, match='prior_hidden_NxP has 4 rows and hidden_NxH 37'):
    fused.q_cross_entropy_fused(hidden, head, labels, 'distill', prior_hidden_NxP=prior_hidden[:4],
                                prior_head_PxV=prior_head, weights_N=weights)
  with pytest.raises(ValueError, match='weight 0 in `weights_N`'):
    fused.q_cross_entropy_fused(hidden, head, labels, 'dft')
  for bad in (-0.5, jnp.nan):
    with pytest.raises(ValueError, match=r'weights_N must be finite and non-negative; 1 are '
                                         r'not, the first .* at index 2'):
      fused.q_cross_entropy_fused(hidden, head, labels, 'dft', weights_N=weights.at[2].set(bad))
