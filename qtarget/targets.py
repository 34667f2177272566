r"""Target constructors: each SFT variant as a target distribution Q over the vocabulary.

Every method of the Q-target view (Xie et al., arXiv 2606.11189; the README's methods table)
writes its per-token target as

.. math::
  Q = \gamma \, \mathrm{onehot}(y) + (1 - \gamma) \, r

with a **trust** :math:`\gamma` (mass on the observed token) and a **residual** :math:`r` (a
distribution over the vocabulary). A constructor returns the pair as a :class:`Target`, detached
from the graph: the loss :func:`qtarget.losses.q_cross_entropy` then has the logit gradient
:math:`p - Q` exactly.

All constructors share one signature::

  fn(logits, labels, *, prior_logits=None, **hyperparameters) -> Target

Hyperparameters carry the paper's symbols (``alpha``, ``tau``, ``k``, ``lam``, ``eta``); they may be
Python numbers or arrays (a scalar, or one value per token: any shape that broadcasts to the
labels), traced or not, so a sweep under ``jax.jit`` does not recompile. Values given concretely
are checked against their valid range; traced values outside it give a NaN trust (so a NaN loss)
at the positions they reach. ``k`` (EAFT) sets an array shape and is a static integer.

Except the user-weighted form, each method's residual is a normalized product of powers of the
current model ``p`` and the ``prior``, :math:`r \propto p^a \, \mathrm{prior}^b`, with the
uniform distribution when :math:`a = b = 0`. A :class:`Method` holds that description (a trust
rule, the two powers, the hyperparameters and their ranges) as data, and :data:`METHODS` is the
one registry that the dense constructors, the fused loss, the trainer and ``compile_check``
read. A new design is a :class:`Method` passed to :func:`register` (or set as a training
config's ``method``); nothing in the package changes::

  register(Method('sqrt_trust_geometric', trust=lambda lp: jnp.exp(0.5 * lp),
                  residual_powers=lambda: (0.5, 0.5), needs_prior=True))

Labels outside ``[0, V)`` give a NaN trust at that position (under ``jit`` nothing can raise);
:func:`qtarget.losses.q_cross_entropy` ignores such positions when they are masked.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from qtarget import cached_prior
from qtarget import method as method_lib
from qtarget import validation
from qtarget.method import Method  # public as targets.Method too
from qtarget.method import Range  # public as targets.Range too

Array = jax.Array


class Target(NamedTuple):
  """A target Q = trust * onehot(labels) + (1 - trust) * exp(log_residual), as a pytree.

  Attributes:
    trust: shape of the labels: the mass Q puts on the observed token.
    log_residual: shape of the labels plus the vocabulary axis: log-probabilities of the
      residual distribution (``-inf`` allowed for tokens it excludes).
  """
  trust: Array
  log_residual: Array


def _ones(label_log_prob):
  return jnp.ones_like(label_log_prob)


def _powered_prob(label_log_prob, alpha):
  # p**alpha with 0**0 = 1, also for p = 0 (log-prob -inf).
  return jnp.where(alpha == 0, 1.0, jnp.exp(alpha * label_log_prob))


def _eaft_trust(label_log_prob, log_probs, k):
  del label_log_prob
  return top_k_entropy(log_probs, k) / jnp.log(jnp.asarray(k, log_probs.dtype))


def _asft_trust(label_log_prob, lam):
  prob = jnp.exp(label_log_prob)
  return jnp.where(prob + lam > 0, prob / jnp.where(prob + lam > 0, prob + lam, 1.0), 1.0)


_UNIT = Range(0.0, 1.0)
_NON_NEGATIVE = Range(0.0)

METHODS: dict[str, Method] = {
    method.name: method for method in (
        Method('sft', trust=_ones, residual_powers=lambda: (1, 0)),
        Method('label_smoothing',
               trust=lambda lp, lam: 1.0 - lam,
               residual_powers=lambda lam: (0, 0),
               hyperparameters={'lam': _UNIT}),
        Method('dft', trust=jnp.exp, residual_powers=lambda: (1, 0)),
        Method('beyond_log',
               trust=_powered_prob,
               residual_powers=lambda alpha: (1, 0),
               hyperparameters={'alpha': _NON_NEGATIVE}),
        Method('profit',
               trust=lambda lp, tau: (jnp.exp(lp) > tau).astype(lp.dtype),
               residual_powers=lambda tau: (1, 0),
               hyperparameters={'tau': _UNIT}),
        Method('sft_kl',
               trust=lambda lp, lam: 1.0 / (1.0 + lam),
               residual_powers=lambda lam: (0, 1),
               hyperparameters={'lam': _NON_NEGATIVE}, needs_prior=True),
        Method('asft',
               trust=_asft_trust,
               residual_powers=lambda lam: (0, 1),
               hyperparameters={'lam': _NON_NEGATIVE}, needs_prior=True),
        Method('distill',
               trust=lambda lp: jnp.zeros_like(lp),
               residual_powers=lambda: (0, 1), needs_prior=True),
        Method('hybrid_distill',
               trust=lambda lp, lam: 1.0 - lam,
               residual_powers=lambda lam: (0, 1),
               hyperparameters={'lam': _UNIT}, needs_prior=True),
        Method('target_sft',
               trust=lambda lp, eta: jnp.exp(lp),
               residual_powers=lambda eta: (1.0 - eta, eta),
               hyperparameters={'eta': _UNIT}, needs_prior=True),
        Method('eaft', trust=_eaft_trust, residual_powers=lambda k: (1, 0),
               static_hyperparameters={'k': Range(2)}, trust_reads_distribution=True),
    )
}


def label_log_probs(log_probs: Array, labels: Array) -> Array:
  """``log_probs[..., labels]``; NaN where a label lies outside ``[0, V)``.

  JAX would wrap negative indices and fill others silently, so the range is checked here.
  """
  vocab_size = log_probs.shape[-1]
  in_range = (labels >= 0) & (labels < vocab_size)
  safe_labels = jnp.where(in_range, labels, 0)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return jnp.where(in_range, picked, jnp.nan)


def _power_times(power, log_probs: Array) -> Array | float:
  """power * log_probs with 0 * (-inf) = 0; ``power`` is a Python number or labels-shaped."""
  if isinstance(power, (int, float)):
    return 0.0 if power == 0 else power * log_probs
  power = power[..., None]
  return jnp.where(power == 0, 0.0, power * log_probs)


def log_residual_from_powers(log_probs: Array, prior_log_probs: Array | None,
                             model_power, prior_power) -> Array:
  """log of the normalized ``p**model_power * prior**prior_power`` (uniform when both are 0)."""
  unnormalized = _power_times(model_power, log_probs)
  if prior_log_probs is not None:
    unnormalized = unnormalized + _power_times(prior_power, prior_log_probs)
  unnormalized = jnp.broadcast_to(unnormalized, log_probs.shape)
  return jax.nn.log_softmax(unnormalized, axis=-1)


def _check_common(method: Method, logits, labels, prior_logits, hyperparameters):
  validation.check_labels(logits, labels)
  if isinstance(prior_logits, cached_prior.CachedPrior):
    validation.check_cached_prior(jnp.shape(logits)[:-1], jnp.shape(logits)[-1], prior_logits)
  elif prior_logits is not None:
    validation.check_prior(logits, prior_logits)
  elif method.needs_prior:
    raise ValueError(
        f'method {method.name!r} needs the prior distribution: pass prior_logits (the frozen '
        "model's logits, same shape as the student's).")
  method.check_hyperparameters(hyperparameters, jnp.shape(labels), jnp.shape(logits)[-1])


def _as_float_array(value, dtype, shape) -> Array:
  return jnp.broadcast_to(jnp.asarray(jax.lax.stop_gradient(value), dtype), shape)


def build(method: Method, logits: Array, labels: Array, *, prior_logits: Array | None = None,
          **hyperparameters) -> Target:
  """The target of a :class:`Method` description. The named constructors call this."""
  _check_common(method, logits, labels, prior_logits, hyperparameters)
  dtype = validation.compute_dtype(jnp.result_type(logits))
  log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(logits).astype(dtype), axis=-1)
  prior_log_probs = None
  if method.needs_prior and isinstance(prior_logits, cached_prior.CachedPrior):
    prior_log_probs = jax.lax.stop_gradient(
        cached_prior.prior_log_probs(prior_logits, log_probs)).astype(dtype)
  elif method.needs_prior:
    prior_log_probs = jax.nn.log_softmax(
        jax.lax.stop_gradient(prior_logits).astype(dtype), axis=-1)
  traced, static = method.split_hyperparameters(hyperparameters)
  hyper = {name: _as_float_array(value, dtype, jnp.shape(labels))
           for name, value in traced.items()}
  hyper.update(static)
  label_log_prob = label_log_probs(log_probs, labels)
  trust = method.checked_trust(label_log_prob, log_probs, **hyper)
  model_power, prior_power = method.residual_powers(**hyper)
  log_residual = log_residual_from_powers(log_probs, prior_log_probs, model_power, prior_power)
  return Target(trust=trust.astype(dtype), log_residual=log_residual)


def sft(logits, labels, *, prior_logits=None) -> Target:
  r"""Plain SFT (negative log-likelihood): :math:`\gamma = 1`, so Q = onehot(y).

  Args:
    logits: ``[..., V]`` student logits (only their shape and dtype matter here).
    labels: ``[...]`` integer token ids.
    prior_logits: unused; accepted for the common signature.

  Example:
    >>> t = sft(jnp.zeros((2, 4)), jnp.array([1, 3]))
    >>> t.trust
    Array([1., 1.], dtype=float32)
  """
  return build(METHODS['sft'], logits, labels, prior_logits=prior_logits)


def label_smoothing(logits, labels, *, lam, prior_logits=None) -> Target:
  r"""Label smoothing: :math:`\gamma = 1 - \lambda`, :math:`r = \mathrm{Unif}(V)`.

  .. math:: Q = (1 - \lambda)\, \mathrm{onehot}(y) + \lambda / V

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids.
    lam: smoothing in [0, 1], scalar or per token.
    prior_logits: unused.
  """
  return build(METHODS['label_smoothing'], logits, labels, prior_logits=prior_logits, lam=lam)


def dft(logits, labels, *, prior_logits=None) -> Target:
  r"""DFT (dynamic fine-tuning, -sg(p_y) log p_y): :math:`\gamma = p_y`, :math:`r = p`.

  .. math:: Q = p_y\, \mathrm{onehot}(y) + (1 - p_y)\, p

  Args:
    logits: ``[..., V]`` student logits (detached).
    labels: ``[...]`` integer token ids.
    prior_logits: unused.
  """
  return build(METHODS['dft'], logits, labels, prior_logits=prior_logits)


def beyond_log(logits, labels, *, alpha, prior_logits=None) -> Target:
  r"""Beyond log-likelihood, loss (1 - p_y^alpha)/alpha: :math:`\gamma = p_y^\alpha`, r = p.

  ``alpha = 1`` is the probability loss -p_y; ``alpha = 0`` is SFT (the limit).

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids.
    alpha: exponent >= 0, scalar or per token.
    prior_logits: unused.
  """
  return build(METHODS['beyond_log'], logits, labels, prior_logits=prior_logits, alpha=alpha)


def profit(logits, labels, *, tau, prior_logits=None) -> Target:
  r"""ProFiT, loss -1[p_y > tau] log p_y: :math:`\gamma = 1[p_y > \tau]`, r = p.

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids.
    tau: probability threshold in [0, 1], scalar or per token.
    prior_logits: unused.
  """
  return build(METHODS['profit'], logits, labels, prior_logits=prior_logits, tau=tau)


def sft_kl(logits, labels, *, lam, prior_logits=None) -> Target:
  r"""SFT + lam KL(prior || p): :math:`\gamma = 1/(1+\lambda)`, r = prior.

  The native loss has this target's gradient times the factor :math:`1 + \lambda`.

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids.
    prior_logits: ``[..., V]`` logits of the frozen reference model.
    lam: KL weight >= 0, scalar or per token.
  """
  return build(METHODS['sft_kl'], logits, labels, prior_logits=prior_logits, lam=lam)


def asft(logits, labels, *, lam, prior_logits=None) -> Target:
  r"""ASFT, DFT + lam KL(prior || p): :math:`\gamma = p_y/(p_y + \lambda)`, r = prior.

  The native loss has this target's gradient times the per-token factor :math:`p_y + \lambda`.

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids.
    prior_logits: ``[..., V]`` logits of the frozen base model.
    lam: KL weight >= 0, scalar or per token.
  """
  return build(METHODS['asft'], logits, labels, prior_logits=prior_logits, lam=lam)


def distill(logits, labels, *, prior_logits=None) -> Target:
  r"""Knowledge distillation, -sum_v prior(v) log p_v: :math:`\gamma = 0`, r = prior.

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids (they do not change the target).
    prior_logits: ``[..., V]`` teacher logits.
  """
  return build(METHODS['distill'], logits, labels, prior_logits=prior_logits)


def hybrid_distill(logits, labels, *, lam, prior_logits=None) -> Target:
  r"""(1 - lam) NLL + lam KL(prior || p): :math:`\gamma = 1 - \lambda`, r = prior.

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids.
    prior_logits: ``[..., V]`` teacher logits.
    lam: distillation weight in [0, 1], scalar or per token.
  """
  return build(METHODS['hybrid_distill'], logits, labels, prior_logits=prior_logits, lam=lam)


def target_sft(logits, labels, *, eta, prior_logits=None) -> Target:
  r"""Target-SFT: trust the current model's p_y, spread the rest by a geometric mix.

  .. math::
    Q = p_y\, \mathrm{onehot}(y) + (1 - p_y)\, r, \qquad
    r \propto p^{1 - \eta}\, \mathrm{prior}^{\eta}

  ``eta = 0`` is DFT; ``eta = 1`` is confidence-gated distillation.

  Args:
    logits: ``[..., V]`` student logits (detached).
    labels: ``[...]`` integer token ids.
    prior_logits: ``[..., V]`` logits of the frozen prior (initial model or teacher).
    eta: teacher intensity in [0, 1], scalar or per token.

  Example:
    >>> logits, prior = jnp.zeros((3, 5)), jnp.arange(15.).reshape(3, 5)
    >>> t = target_sft(logits, jnp.array([0, 1, 2]), prior_logits=prior, eta=0.5)
    >>> dense(t, jnp.array([0, 1, 2])).sum(-1)
    Array([1., 1., 1.], dtype=float32)
  """
  return build(METHODS['target_sft'], logits, labels, prior_logits=prior_logits, eta=eta)


def top_k_entropy(log_probs: Array, k: int) -> Array:
  """Entropy of the k largest probabilities renormalized to sum to 1 (0 log 0 = 0)."""
  top_log_probs, _ = jax.lax.top_k(log_probs, k)
  top_log_probs = jax.nn.log_softmax(top_log_probs, axis=-1)
  top_probs = jnp.exp(top_log_probs)
  return -jnp.sum(jnp.where(top_probs > 0, top_probs * top_log_probs, 0.0), axis=-1)


def eaft(logits, labels, *, k: int, prior_logits=None) -> Target:
  r"""EAFT: trust is the normalized entropy of the top-k renormalized probabilities, r = p.

  .. math:: \gamma = H(\mathrm{top}_k(p) / \textstyle\sum \mathrm{top}_k(p)) / \log k

  Uncertain positions keep the full NLL; confident ones are down-weighted toward p.

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids.
    k: a static integer in [2, V] (it sets an array shape; a new value recompiles).
    prior_logits: unused.
  """
  return build(METHODS['eaft'], logits, labels, prior_logits=prior_logits, k=k)


def weighted(logits, labels, *, weights, prior_logits=None) -> Target:
  r"""Weighted NLL, -sg(w) log p_y: :math:`\gamma = w`, r = p (iw-SFT and any per-token weight).

  .. math:: Q = w\, \mathrm{onehot}(y) + (1 - w)\, p

  Sequence weights (iw-SFT's importance weight of the whole demonstration) broadcast over the
  tokens: pass ``weights`` of shape ``[B, 1]`` for labels ``[B, T]``. A weight above 1 makes Q
  negative off the label (the sum stays 1); :func:`qtarget.losses.negative_mass` measures it.

  Args:
    logits: ``[..., V]`` student logits.
    labels: ``[...]`` integer token ids.
    weights: non-negative weights broadcastable to the labels' shape.
    prior_logits: unused.
  """
  validation.check_labels(logits, labels)
  validation.check_hyperparameter('weights', weights, jnp.shape(labels), 0.0, float('inf'))
  dtype = validation.compute_dtype(jnp.result_type(logits))
  log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(logits).astype(dtype), axis=-1)
  trust = _as_float_array(weights, dtype, jnp.shape(labels))
  invalid = jnp.isnan(label_log_probs(log_probs, labels)) | ~_NON_NEGATIVE.contains(trust)
  trust = jnp.where(invalid, jnp.nan, trust)  # traced weights are not range-checked
  return Target(trust=trust, log_residual=log_probs)


CONSTRUCTORS: dict[str, Callable[..., Target]] = {
    'sft': sft, 'label_smoothing': label_smoothing, 'dft': dft, 'beyond_log': beyond_log,
    'profit': profit, 'eaft': eaft, 'sft_kl': sft_kl, 'asft': asft, 'distill': distill,
    'hybrid_distill': hybrid_distill, 'target_sft': target_sft, 'weighted': weighted,
}


def register(method: Method, *, replace: bool = False) -> Method:
  """Adds a design to :data:`METHODS` (and its constructor to :data:`CONSTRUCTORS`), so the
  dense and fused losses, the trainer and ``compile_check`` take it by name.

  Registering the same design again is a no-op (the same object, or the same definition run
  again: a config file is executed more than once); another design under a taken name is an
  error unless ``replace`` (a compiled step keyed by the old name would otherwise be reused).
  """
  if not isinstance(method, Method):
    raise TypeError(f'register takes a qtarget.targets.Method, got {type(method).__name__}.')
  if not method.name or not method.name.isidentifier():
    raise ValueError(f'a method name must be an identifier (it names configs and run '
                     f'directories), got {method.name!r}.')
  existing = METHODS.get(method.name)
  taken = existing is not None or method.name in CONSTRUCTORS
  same = existing is not None and method_lib.same_design(existing, method)
  if taken and not same and not replace:
    raise ValueError(f'a method named {method.name!r} is already registered; choose another '
                     'name or pass replace=True.')
  overlap = set(method.hyperparameters) & set(method.static_hyperparameters)
  if overlap:
    raise ValueError(f'{method.name}: {sorted(overlap)} are both traced and static.')
  METHODS[method.name] = method

  def constructor(logits, labels, *, prior_logits=None, **hyperparameters) -> Target:
    return build(method, logits, labels, prior_logits=prior_logits, **hyperparameters)

  constructor.__name__ = constructor.__qualname__ = method.name
  constructor.__doc__ = f'The target of the registered design {method.name!r} (see build).'
  CONSTRUCTORS[method.name] = constructor
  return method


def resolve(method: 'str | Method') -> Method:
  """The :class:`Method` of a name or a design (registered on the way), or a clear error."""
  if isinstance(method, Method):
    return register(method)
  if method in METHODS:
    return METHODS[method]
  if method in CONSTRUCTORS:
    raise ValueError(f'method {method!r} has a constructor but no table entry: it needs inputs '
                     'beyond logits and hyperparameters (per-token weights from the data).')
  raise ValueError(f'unknown method {method!r}; known methods: {", ".join(sorted(METHODS))} '
                   "('weighted' has a dense constructor only).")


def needs_prior(method: 'str | Method') -> bool:
  """Whether a method (a name or a :class:`Method`) uses the prior (False for names outside
  the table)."""
  if isinstance(method, Method):
    return method.needs_prior
  return method in METHODS and METHODS[method].needs_prior


def get(name: str) -> Callable[..., Target]:
  """The constructor for a method name from a config, with a clear error for unknown names."""
  if name not in CONSTRUCTORS:
    raise ValueError(f'unknown method {name!r}; known methods: {", ".join(sorted(CONSTRUCTORS))}.')
  return CONSTRUCTORS[name]


def dense(target: Target, labels: Array) -> Array:
  r"""Q itself: ``trust * onehot(labels) + (1 - trust) * exp(log_residual)``, shape ``[..., V]``.

  Rows whose label lies outside ``[0, V)`` are NaN.

  Example:
    >>> q = dense(dft(jnp.zeros((1, 4)), jnp.array([2])), jnp.array([2]))
    >>> q
    Array([[0.1875, 0.1875, 0.4375, 0.1875]], dtype=float32)
  """
  vocab_size = target.log_residual.shape[-1]
  if jnp.shape(labels) != target.log_residual.shape[:-1]:
    raise ValueError(f'labels of shape {jnp.shape(labels)} do not match the target of shape '
                     f'{target.log_residual.shape}.')
  in_range = (labels >= 0) & (labels < vocab_size)
  onehot = jax.nn.one_hot(labels, vocab_size, dtype=target.log_residual.dtype)
  trust = jnp.where(in_range, target.trust, jnp.nan)[..., None]
  return trust * onehot + (1 - trust) * jnp.exp(target.log_residual)
