r"""Each method's loss as its authors write it, per token, no reduction.

These are the evidence for the Q-target view, not the training path: for each method,
``losses.induced_target(native.X, ...)`` equals ``targets.dense(targets.X(...))`` (for SFT+KL and
ASFT up to a positive per-token factor: their gradient is the target's times
``1 + lam`` and ``p_y + lam``). GEM is here too: its induced target is not a mixture.

All functions take ``(logits [..., V], labels [...], ...)`` and return ``[...]`` float losses;
``sg`` below is ``jax.lax.stop_gradient``. Hyperparameters are partial-applied for
:func:`qtarget.losses.induced_target`, e.g. ``functools.partial(native.beyond_log, alpha=0.5)``.
"""

import jax
import jax.numpy as jnp

from qtarget import targets as targets_lib
from qtarget import validation

Array = jax.Array
_sg = jax.lax.stop_gradient


def _log_probs(logits: Array, labels: Array) -> tuple[Array, Array]:
  validation.check_labels(logits, labels)
  dtype = validation.compute_dtype(jnp.result_type(logits))
  log_probs = jax.nn.log_softmax(jnp.asarray(logits).astype(dtype), axis=-1)
  return log_probs, targets_lib.label_log_probs(log_probs, labels)


def _prior_probs(logits: Array, prior_logits: Array) -> tuple[Array, Array]:
  validation.check_prior(logits, prior_logits)
  dtype = validation.compute_dtype(jnp.result_type(logits))
  prior_log_probs = jax.nn.log_softmax(_sg(prior_logits).astype(dtype), axis=-1)
  return jnp.exp(prior_log_probs), prior_log_probs


def _kl_from_prior(log_probs: Array, prior_probs: Array, prior_log_probs: Array) -> Array:
  # KL(prior || p) = sum_v prior_v (log prior_v - log p_v), with 0 log 0 = 0.
  terms = jnp.where(prior_probs > 0, prior_probs * (prior_log_probs - log_probs), 0.0)
  return jnp.sum(terms, axis=-1)


def nll(logits, labels):
  r""":math:`-\log p_y`."""
  _, label_log_prob = _log_probs(logits, labels)
  return -label_log_prob


def dft(logits, labels):
  r""":math:`-\mathrm{sg}(p_y) \log p_y` (DFT)."""
  _, label_log_prob = _log_probs(logits, labels)
  return -_sg(jnp.exp(label_log_prob)) * label_log_prob


def beyond_log(logits, labels, *, alpha):
  r""":math:`(1 - p_y^\alpha)/\alpha`, alpha > 0 (alpha = 1 is the probability loss 1 - p_y)."""
  validation.check_hyperparameter('alpha', alpha, jnp.shape(labels), 0.0, float('inf'),
                                  low_open=True)
  _, label_log_prob = _log_probs(logits, labels)
  return (1.0 - jnp.exp(alpha * label_log_prob)) / alpha


def profit(logits, labels, *, tau):
  r""":math:`-1[\mathrm{sg}(p_y) > \tau] \log p_y` (ProFiT)."""
  _, label_log_prob = _log_probs(logits, labels)
  keep = _sg(jnp.exp(label_log_prob)) > tau
  return -jnp.where(keep, label_log_prob, 0.0)


def eaft(logits, labels, *, k):
  r""":math:`-\mathrm{sg}(\tilde H_k) \log p_y`, with the top-k entropy normalized by log k."""
  log_probs, label_log_prob = _log_probs(logits, labels)
  top_probs = jax.nn.softmax(jax.lax.top_k(_sg(log_probs), k)[0], axis=-1)
  entropy = -jnp.sum(jnp.where(top_probs > 0, top_probs * jnp.log(top_probs), 0.0), axis=-1)
  return -(entropy / jnp.log(k)) * label_log_prob


def weighted(logits, labels, *, weights):
  r""":math:`-\mathrm{sg}(w) \log p_y` (iw-SFT with sequence weights broadcast to tokens)."""
  _, label_log_prob = _log_probs(logits, labels)
  return -_sg(jnp.asarray(weights)) * label_log_prob


def label_smoothing(logits, labels, *, lam):
  r""":math:`-(1 - \lambda) \log p_y - (\lambda / V) \sum_v \log p_v`."""
  log_probs, label_log_prob = _log_probs(logits, labels)
  return -(1.0 - lam) * label_log_prob - lam * jnp.mean(log_probs, axis=-1)


def sft_kl(logits, labels, *, prior_logits, lam):
  r""":math:`-\log p_y + \lambda\, \mathrm{KL}(\pi_\mathrm{ref} \,\|\, p)`."""
  log_probs, label_log_prob = _log_probs(logits, labels)
  prior_probs, prior_log_probs = _prior_probs(logits, prior_logits)
  return -label_log_prob + lam * _kl_from_prior(log_probs, prior_probs, prior_log_probs)


def asft(logits, labels, *, prior_logits, lam):
  r""":math:`-\mathrm{sg}(p_y) \log p_y + \lambda\, \mathrm{KL}(\pi_\mathrm{base} \,\|\, p)`."""
  log_probs, label_log_prob = _log_probs(logits, labels)
  prior_probs, prior_log_probs = _prior_probs(logits, prior_logits)
  dft_loss = -_sg(jnp.exp(label_log_prob)) * label_log_prob
  return dft_loss + lam * _kl_from_prior(log_probs, prior_probs, prior_log_probs)


def distill(logits, labels, *, prior_logits):
  r""":math:`-\sum_v \pi_T(v) \log p_v`."""
  log_probs, _ = _log_probs(logits, labels)
  prior_probs, _ = _prior_probs(logits, prior_logits)
  return -jnp.sum(jnp.where(prior_probs > 0, prior_probs * log_probs, 0.0), axis=-1)


def hybrid_distill(logits, labels, *, prior_logits, lam):
  r""":math:`(1 - \lambda)(-\log p_y) + \lambda\, \mathrm{KL}(\pi_T \,\|\, p)`."""
  log_probs, label_log_prob = _log_probs(logits, labels)
  prior_probs, prior_log_probs = _prior_probs(logits, prior_logits)
  kl = _kl_from_prior(log_probs, prior_probs, prior_log_probs)
  return -(1.0 - lam) * label_log_prob + lam * kl


def gem(logits, labels, *, beta):
  r"""GEM: :math:`\mathrm{CE}(\mathrm{onehot}, p) - \mathrm{CE}(q, p)`, q proportional to sg(p)^(1/beta).

  Its induced target is :math:`\mathrm{onehot}(y) + p - q`: it sums to 1 but, for beta < 1, puts
  negative mass where q is sharper than p, so it is not a (trust, residual) mixture.
  """
  validation.check_hyperparameter('beta', beta, jnp.shape(labels), 0.0, float('inf'),
                                  low_open=True)
  log_probs, label_log_prob = _log_probs(logits, labels)
  log_q = jax.nn.log_softmax(_sg(log_probs) / beta, axis=-1)
  ce_q = -jnp.sum(jnp.exp(log_q) * log_probs, axis=-1)
  return -label_log_prob - ce_q
