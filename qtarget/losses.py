r"""The Q cross-entropy and the induced-target inversion.

:func:`q_cross_entropy` is the one loss behind every method: the cross-entropy from a detached
target Q (a :class:`qtarget.targets.Target`) to the model's softmax, whose logit gradient is
:math:`p - Q`. :func:`induced_target` goes the other way: from any per-token loss to the target
it implies, :math:`Q = p - \partial L / \partial z`.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from qtarget import targets as targets_lib
from qtarget import validation

Array = jax.Array


def _times(weight: Array, value: Array) -> Array:
  # weight * value with 0 * inf = 0: a zero-mass token contributes nothing, even if p_v = 0.
  return jnp.where(weight == 0, 0.0, weight * value)


def q_cross_entropy(logits: Array, labels: Array, target: targets_lib.Target,
                    where: Array | None = None) -> Array:
  r"""Per-token cross-entropy from the target Q to p = softmax(logits).

  .. math::
    \mathrm{CE}(Q, p) = \gamma\,(-\log p_y) + (1 - \gamma)\,\mathrm{CE}(r, p),
    \qquad \frac{\partial\, \mathrm{CE}}{\partial z} = p - Q

  Computed in log space in float32 (or wider, for float64 inputs) whatever the input dtype. The
  target is a constant (stop-gradient), so the gradient is exactly p - Q up to rounding of
  :math:`\sum_k Q_k = 1`. No reduction: the trainer weighs and sums the tokens.

  Args:
    logits: ``[..., V]`` floating-point logits.
    labels: ``[...]`` integer token ids in ``[0, V)`` at unmasked positions.
    target: a :class:`~qtarget.targets.Target` from a constructor in :mod:`qtarget.targets`.
    where: optional ``[...]`` boolean mask; masked positions give loss 0 and gradient 0 whatever
      their logits, labels and target hold (for example -100 padding labels).

  Returns:
    ``[...]`` per-token losses, float32 (or float64).

  Out-of-range labels, and NaN in the logits or the target, at unmasked positions raise a
  ValueError naming the first such position when the inputs are concrete; under ``jax.jit`` they
  cannot raise and give a NaN loss (and NaN gradient) at that position, never a silently wrong
  finite value.

  The residual must sum to one (``exp(target.log_residual)`` over the vocabulary, as every
  constructor's does): the gradient is defined as p - Q, which is the loss's own gradient only
  then (where the trust is below 1). A concrete target that breaks this raises a ValueError
  (tolerance 1e-3); under
  ``jax.jit`` it cannot be checked and is the caller's contract.

  Example:
    >>> from qtarget import targets
    >>> logits = jnp.array([[2.0, 0.0, -1.0]])
    >>> labels = jnp.array([0])
    >>> loss = q_cross_entropy(logits, labels, targets.dft(logits, labels))
  """
  validation.check_labels(logits, labels)
  validation.check_where(where, labels)
  if target.log_residual.shape != jnp.shape(logits):
    raise ValueError(f'target.log_residual of shape {target.log_residual.shape} does not match '
                     f'logits of shape {jnp.shape(logits)}.')
  if jnp.shape(target.trust) != jnp.shape(labels):
    raise ValueError(f'target.trust of shape {jnp.shape(target.trust)} does not match labels of '
                     f'shape {jnp.shape(labels)}.')
  validation.check_label_range(labels, jnp.shape(logits)[-1], where)
  validation.check_not_nan(logits, 'logits', where, vocab_axis=True, positive_inf=True)
  validation.check_not_nan(
      target.trust, 'target.trust', where,
      'The constructor got NaN logits there, NaN prior_logits (methods whose trust reads the '
      'prior), or a traced hyperparameter outside its range.')
  validation.check_not_nan(
      target.log_residual, 'target.log_residual', where,
      'The constructor got NaN logits or prior_logits there.', vocab_axis=True)
  validation.check_residual_normalized(target.trust, target.log_residual, where)

  dtype = validation.compute_dtype(jnp.result_type(logits))
  logits = jnp.asarray(logits).astype(dtype)
  trust = jax.lax.stop_gradient(target.trust).astype(dtype)
  log_residual = jax.lax.stop_gradient(target.log_residual).astype(dtype)
  if where is not None:
    # Neutral values at masked positions keep NaN out of the backward pass, not just the output.
    logits = jnp.where(where[..., None], logits, 0.0)
    labels = jnp.where(where, labels, 0)
    trust = jnp.where(where, trust, 1.0)
    log_residual = jnp.where(where[..., None], log_residual, 0.0)

  loss = _cross_entropy_to_target(logits, labels, trust, log_residual)
  if where is not None:
    loss = jnp.where(where, loss, 0.0)
  return loss


@jax.custom_jvp
def _cross_entropy_to_target(logits, labels, trust, log_residual):
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  label_nll = -targets_lib.label_log_probs(log_probs, labels)
  residual_ce = -jnp.sum(_times(jnp.exp(log_residual), log_probs), axis=-1)
  return _times(trust, label_nll) + _times(1.0 - trust, residual_ce)


@_cross_entropy_to_target.defjvp
def _cross_entropy_to_target_jvp(primals, tangents):
  # The target is a constant, so the logit gradient is p - Q; written out, it is exact even
  # where autodiff of the formula would carry the rounding of sum(r) = 1 (huge logits).
  logits, labels, trust, log_residual = primals
  logits_dot = tangents[0]
  loss = _cross_entropy_to_target(logits, labels, trust, log_residual)
  target_q = targets_lib.dense(targets_lib.Target(trust, log_residual), labels)
  grad = jax.nn.softmax(logits, axis=-1) - target_q
  return loss, jnp.sum(grad * logits_dot, axis=-1)


def negative_mass(target_q: Array) -> Array:
  """Per-token mass of the negative entries of a dense target: ``-sum(min(Q, 0))``, >= 0."""
  return jnp.sum(jnp.maximum(-target_q, 0.0), axis=-1)


class InducedTarget(NamedTuple):
  """What a loss asks the model to move toward.

  Attributes:
    target: ``[..., V]`` the induced Q = p - dL/dz.
    total_mass: ``[...]`` sum of Q over the vocabulary (1 when L depends on z only through p).
    negative_mass: ``[...]`` ``-sum(min(Q, 0))``: 0 when Q is a distribution.
  """
  target: Array
  total_mass: Array
  negative_mass: Array


def induced_target(loss_fn: Callable[[Array, Array], Array], logits: Array,
                   labels: Array) -> InducedTarget:
  r"""The target a per-token loss induces, by the inversion identity.

  .. math:: Q = p - \partial L / \partial z

  Args:
    loss_fn: ``(logits, labels) -> [...]`` per-token losses (each token's loss depends only on
      that token's logits).
    logits: ``[..., V]`` logits (float32 or float64).
    labels: ``[...]`` integer labels.

  Returns:
    An :class:`InducedTarget` with Q, its total mass and its negative mass per token.

  Example:
    >>> from qtarget import native
    >>> induced = induced_target(native.dft, jnp.zeros((1, 4)), jnp.array([2]))
    >>> induced.target  # = dense(targets.dft(...)): 0.25 on the label, then (1 - 0.25) * p
    Array([[0.1875, 0.1875, 0.4375, 0.1875]], dtype=float32)
  """
  validation.check_labels(logits, labels)
  dtype = validation.compute_dtype(jnp.result_type(logits))
  logits = jnp.asarray(logits).astype(dtype)
  grad = jax.grad(lambda z: jnp.sum(loss_fn(z, labels)))(logits)
  target_q = jax.nn.softmax(logits, axis=-1) - grad
  return InducedTarget(target=target_q, total_mass=jnp.sum(target_q, axis=-1),
                       negative_mass=negative_mass(target_q))
