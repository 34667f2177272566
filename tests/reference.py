"""Float64 NumPy references, written from the paper's method table (Xie et al., arXiv
2606.11189) without the library's code.

Each `target_*` returns the dense target Q directly as trust * onehot + (1 - trust) * residual.
"""

import numpy as np


def softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def onehot(labels, vocab_size):
  return (np.asarray(labels)[..., None] == np.arange(vocab_size)).astype(np.float64)


def label_prob(probs, labels):
  return np.take_along_axis(probs, np.asarray(labels)[..., None], axis=-1)[..., 0]


def mixture(trust, residual, labels):
  trust = np.broadcast_to(np.asarray(trust, np.float64), np.shape(labels))[..., None]
  return trust * onehot(labels, residual.shape[-1]) + (1.0 - trust) * residual


def geometric_mix(logits, prior_logits, eta):
  """Normalized p**(1 - eta) * prior**eta, in log space (probabilities may underflow)."""
  eta = np.asarray(eta, np.float64)[..., None] if np.ndim(eta) else eta
  log_p, log_prior = log_softmax(logits), log_softmax(prior_logits)
  with np.errstate(invalid='ignore'):  # 0 * -inf: a power of 0 leaves the factor out
    mixed = (np.where(eta == 1.0, 0.0, (1.0 - eta) * log_p)
             + np.where(eta == 0.0, 0.0, eta * log_prior))
  return softmax(mixed)


def top_k_normalized_entropy(probs, k):
  top = -np.sort(-probs, axis=-1)[..., :k]
  top = top / top.sum(axis=-1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    plogp = np.where(top > 0, top * np.log(top), 0.0)
  return -plogp.sum(axis=-1) / np.log(k)


def target(method, logits, labels, prior_logits=None, **hp):
  """Dense Q of `method`, float64."""
  p = softmax(logits)
  prior = None if prior_logits is None else softmax(prior_logits)
  p_y = label_prob(p, labels)
  vocab_size = p.shape[-1]
  uniform = np.full_like(p, 1.0 / vocab_size)
  if method == 'sft':
    return onehot(labels, vocab_size)
  if method == 'label_smoothing':
    return mixture(1.0 - hp['lam'], uniform, labels)
  if method == 'dft':
    return mixture(p_y, p, labels)
  if method == 'beyond_log':
    return mixture(p_y ** np.asarray(hp['alpha']), p, labels)
  if method == 'profit':
    return mixture((p_y > hp['tau']).astype(np.float64), p, labels)
  if method == 'eaft':
    return mixture(top_k_normalized_entropy(p, hp['k']), p, labels)
  if method == 'weighted':
    return mixture(np.broadcast_to(hp['weights'], p_y.shape), p, labels)
  if method == 'sft_kl':
    return mixture(1.0 / (1.0 + np.asarray(hp['lam'])), prior, labels)
  if method == 'asft':
    return mixture(p_y / (p_y + hp['lam']), prior, labels)
  if method == 'distill':
    return prior
  if method == 'hybrid_distill':
    return mixture(1.0 - hp['lam'], prior, labels)
  if method == 'target_sft':
    return mixture(p_y, geometric_mix(logits, prior_logits, hp['eta']), labels)
  raise ValueError(method)


def cross_entropy(target_q, logits):
  """CE(Q, p) per token."""
  return -(target_q * log_softmax(logits)).sum(axis=-1)
