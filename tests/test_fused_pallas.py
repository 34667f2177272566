"""The Pallas kernels of the fused Q-loss (interpreted on CPU) equal the dense loss.

H, P and V are not multiples of the blocks, so padding and the vocabulary mask are exercised;
masked tokens carry padding labels (-100).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget import fused
from qtarget.experimental import fused_pallas
from qtarget import targets

import test_fused

BLOCKS = {'tokens': 16, 'vocab': 64, 'hidden': 16}
# 'pallas' on a GPU (benchmarks/gpu_benchmarks.sh): the same checks with the compiled kernels.
IMPLEMENTATION = os.environ.get('QTARGET_PALLAS_IMPLEMENTATION', 'pallas_interpret')


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
  monkeypatch.setattr(fused_pallas, 'DEFAULT_BLOCKS', BLOCKS)  # 203 words: 4 blocks, 1 partial


def _pallas_loss(method, *args, **hyper):
  return test_fused._fused_loss(method, *args, implementation=IMPLEMENTATION, **hyper)  # pylint: disable=protected-access


# The kernels take trust rules of the label probability alone (not EAFT's top-k entropy).
PALLAS_METHODS = [name for name in test_fused.HYPER
                  if not targets.METHODS[name].trust_reads_distribution]


def _scale_cases():
  # Every method at normal scale; extreme logits for Target-SFT by default, the rest slow.
  return [pytest.param(method, scale, id=f'{label}-{method}',
                       marks=pytest.mark.slow if label == 'extreme' and method != 'target_sft'
                       else ())
          for label, scale in (('normal', 3.0), ('extreme', 300.0)) for method in PALLAS_METHODS]


@pytest.mark.parametrize('method, scale', _scale_cases())
def test_equals_dense_float32(method, scale):
  args = test_fused._inputs(scale=scale)  # pylint: disable=protected-access
  hyper = test_fused.HYPER[method]
  dense = functools.partial(test_fused._dense_loss, method, **hyper)  # pylint: disable=protected-access
  kernel = functools.partial(_pallas_loss, method, **hyper)
  (dense_value, dense_grads) = test_fused._grads(dense, args)  # pylint: disable=protected-access
  (value, grads) = test_fused._grads(kernel, args)  # pylint: disable=protected-access
  assert np.isfinite(value)
  if scale < 100:
    np.testing.assert_allclose(value, dense_value, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(('hidden', 'head'), grads[:2], dense_grads[:2]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
  else:
    # Logits of a few hundred: summing the hidden size in blocks instead of in one dot moves
    # float32 logits by ~1e-4, so the kernel and the dense loss differ by their own rounding.
    # Both are held to the float64 dense loss: the kernel may not be much worse.
    # On the CPU: cuBLASLt has no float64 GEMM on the GPU image we ran on (jax 0.11.2, H100).
    with jax.enable_x64(True), jax.default_device(jax.devices('cpu')[0]):
      exact_value, exact_grads = test_fused._grads(  # pylint: disable=protected-access
          dense, [np.asarray(a, np.float64) if a.dtype == jnp.float32 else a for a in args])
    pairs = [('value', value, dense_value, exact_value)] + list(
        zip(('hidden', 'head'), grads[:2], dense_grads[:2], exact_grads[:2]))
    for name, got, want, ref in pairs:
      ref = np.asarray(ref)
      kernel_error = np.linalg.norm(np.asarray(got, np.float64) - ref)
      dense_error = np.linalg.norm(np.asarray(want, np.float64) - ref)
      assert kernel_error <= 10 * dense_error + 1e-5, (name, kernel_error, dense_error)
      assert kernel_error <= 1e-3 * np.linalg.norm(ref) + 1e-5, (name, kernel_error)
  for got in grads[2:]:
    np.testing.assert_array_equal(got, 0.0)
  _, aux = kernel(*args)
  _, xla_aux = test_fused._fused_loss(method, *args, **hyper)  # pylint: disable=protected-access
  weights = np.asarray(args[-1])
  for name in ('per_token_loss', 'trust', 'label_log_prob', 'prior_entropy'):
    got, want = np.asarray(getattr(aux, name)), np.asarray(getattr(xla_aux, name))
    np.testing.assert_allclose(got[weights > 0], want[weights > 0], rtol=1e-5,
                               atol=1e-5 if scale < 100 else 5e-4, err_msg=name)
  np.testing.assert_array_equal(aux.predicted, xla_aux.predicted)


def test_equals_dense_bfloat16():
  args = test_fused._inputs(dtype=jnp.bfloat16)  # pylint: disable=protected-access
  dense = functools.partial(test_fused._dense_loss, 'target_sft', eta=0.3)  # pylint: disable=protected-access
  kernel = functools.partial(_pallas_loss, 'target_sft', eta=0.3)
  (dense_value, dense_grads), (value, grads) = (test_fused._grads(dense, args),  # pylint: disable=protected-access
                                                test_fused._grads(kernel, args))  # pylint: disable=protected-access
  assert grads[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(value, dense_value, rtol=2e-2)
  for got, want in zip(grads[:2], dense_grads[:2]):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)


def test_per_token_hyperparameters():
  args = test_fused._inputs()  # pylint: disable=protected-access
  eta = jnp.linspace(0.0, 1.0, test_fused.N)
  dense_value, _ = test_fused._dense_loss('target_sft', *args, eta=eta)  # pylint: disable=protected-access
  value, _ = _pallas_loss('target_sft', *args, eta=eta)
  np.testing.assert_allclose(value, dense_value, rtol=1e-5)


def test_unknown_implementation():
  with pytest.raises(ValueError, match='implementation must be one of'):
    test_fused._fused_loss('sft', *test_fused._inputs(), implementation='triton')  # pylint: disable=protected-access


def test_trust_rules_of_the_whole_distribution_are_refused():
  hidden, head, _, _, labels, _ = test_fused._inputs()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="needs implementation='xla'"):
    fused.q_cross_entropy_fused(hidden, head, jnp.abs(labels), 'eaft', k=4,
                                implementation=IMPLEMENTATION)


def test_bad_labels_and_hyperparameters_under_jit_give_nan():
  """As in the XLA path: an out-of-range label at non-zero weight (distillation's zero trust
  must not hide it) and a traced hyperparameter out of range give NaN; padding does not."""
  hidden, head, prior_hidden, prior_head, labels, weights = test_fused._inputs()  # pylint: disable=protected-access
  assert weights[1] > 0 and weights[0] == 0 and labels[0] == -100
  loss = jax.jit(lambda y: _pallas_loss('distill', hidden, head, prior_hidden, prior_head, y,
                                        weights)[0])
  assert np.isfinite(loss(labels)) and np.isnan(loss(labels.at[1].set(10_000)))
  eta_loss = jax.jit(lambda eta: _pallas_loss('target_sft', hidden, head, prior_hidden,
                                              prior_head, labels, weights, eta=eta)[0])
  assert np.isfinite(eta_loss(1.0)) and np.isnan(eta_loss(1.5))
