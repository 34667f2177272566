r"""The Q cross-entropy fused with the output head: no tokens x vocabulary array is kept.

:func:`q_cross_entropy_fused` takes hidden states and head weights instead of logits. It walks
the tokens in chunks; for each chunk it computes full-vocabulary rows of the student's (and the
prior's) logits, the target Q of the method, the loss and its logit gradient p - Q in the same
pass (Q is a constant), and accumulates the gradients of the hidden states and of the head. The
matmuls are the floor: three with the student's head (logits, hidden gradient, head gradient)
and one with the prior's. Only a chunk of logits lives at a time, so memory beyond inputs and
gradients is O(chunk x V) instead of O(N x V).

This is the portable XLA implementation (``lax.scan`` with a custom VJP); it runs on CPU, GPU
and TPU. Methods: those whose residual is a normalized product of powers of the model, the prior
and the uniform distribution (:data:`qtarget.targets.METHODS`).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from qtarget import cached_prior as cached_prior_lib
from qtarget import targets as targets_lib
from qtarget import validation

Array = jax.Array


def __getattr__(name):
  if name == 'SUPPORTED_METHODS':  # every registered design, read when asked
    return tuple(targets_lib.METHODS)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


class FusedAux(NamedTuple):
  """Per-token values for metrics (not differentiable).

  Attributes:
    per_token_loss: ``[N]`` CE(Q, p) of each token (unweighted; 0 at zero weight).
    trust: ``[N]`` the target's mass on the label; NaN where the label is out of range or a
      hyperparameter outside its range, whatever the weight (as the dense constructors give;
      mask it with the weights before reducing).
    label_log_prob: ``[N]`` log p(label).
    predicted: ``[N]`` argmax of the student's logits.
    prior_entropy: ``[N]`` entropy of the prior (zeros without a prior; with a cached prior,
      :func:`qtarget.cached_prior.bucket_entropy`).
  """
  per_token_loss: Array
  trust: Array
  label_log_prob: Array
  predicted: Array
  prior_entropy: Array


def _chunk_values(method, hidden_CxH, head_HxV, labels_C, weights_C, prior_hidden_CxP,
                  prior_head_PxV, prior_cache_C, hyper_C, static, dtype=jnp.float32):
  """Loss, logit gradient and metrics of one chunk of tokens, in ``dtype`` (float32, or
  float64 for the one-call form's float64 inputs)."""
  logits = jnp.dot(hidden_CxH, head_HxV, preferred_element_type=dtype)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  label_log_prob = targets_lib.label_log_probs(log_probs, labels_C)
  prior_log_probs = None
  prior_entropy = jnp.zeros(labels_C.shape, dtype)
  if method.needs_prior:
    if prior_cache_C is not None:  # the cached top-k prior, its tail spread like the student's
      prior_log_probs = cached_prior_lib.prior_log_probs(prior_cache_C, log_probs)
      prior_entropy = cached_prior_lib.bucket_entropy(prior_cache_C)
    else:
      prior_logits = jnp.dot(prior_hidden_CxP, prior_head_PxV, preferred_element_type=dtype)
      prior_log_probs = jax.nn.log_softmax(prior_logits, axis=-1)
      prior_probs = jnp.exp(prior_log_probs)
      prior_entropy = -jnp.sum(jnp.where(prior_probs > 0, prior_probs * prior_log_probs, 0.0),
                               -1)
  hyper_C = {**hyper_C, **static}
  trust = method.checked_trust(label_log_prob, log_probs, **hyper_C)
  model_power, prior_power = method.residual_powers(**hyper_C)
  log_residual = targets_lib.log_residual_from_powers(log_probs, prior_log_probs, model_power,
                                                      prior_power)
  residual = jnp.exp(log_residual)
  residual_ce = -jnp.sum(jnp.where(residual > 0, residual * log_probs, 0.0), axis=-1)
  label_nll = -label_log_prob
  loss = (jnp.where(trust == 0, 0.0, trust * label_nll)
          + jnp.where(trust == 1, 0.0, (1 - trust) * residual_ce))
  target = targets_lib.dense(targets_lib.Target(trust, log_residual), labels_C)
  grad_logits = (jnp.exp(log_probs) - target) * weights_C[:, None]
  # Zero-weight tokens (padding) contribute nothing, even with garbage labels.
  grad_logits = jnp.where(weights_C[:, None] == 0, 0.0, grad_logits)
  loss = jnp.where(weights_C == 0, 0.0, loss)
  aux = FusedAux(loss, trust, label_log_prob, jnp.argmax(logits, axis=-1).astype(jnp.int32),
                 prior_entropy)
  return loss, grad_logits, aux


def _pad_tokens(x, pad):
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


HEAD_GRAD_ACCUMULATIONS = ('float32', 'head_dtype')

# implementation name -> forward(method name, hidden, head, labels, weights, prior hidden,
# prior head, hyper) -> (total, aux, grads); modules outside the default path add theirs.
_EXTRA_IMPLEMENTATIONS = {}
# Implementations that exist in the package, and the module that registers each.
KNOWN_IMPLEMENTATIONS = {'xla': __name__, 'pallas': 'qtarget.experimental.fused_pallas',
                         'pallas_interpret': 'qtarget.experimental.fused_pallas'}


def register_implementation(name: str, forward) -> None:
  """Makes ``implementation=name`` available (the experimental Pallas module calls this)."""
  _EXTRA_IMPLEMENTATIONS[name] = forward


def _implementation_forward(implementation, method_key, chunking, hidden_NxH, head_HxV,
                            labels_N, weights_N, prior_hidden_NxP, prior_head_PxV, prior_cache,
                            hyper_N):
  """``method_key``: ``(name, static hyperparameters as (name, value) pairs)``;
  ``chunking``: ``(tokens per chunk, head-gradient accumulation)``."""
  if implementation == 'xla':
    return _forward(method_key, chunking, hidden_NxH, head_HxV, labels_N, weights_N,
                    prior_hidden_NxP, prior_head_PxV, prior_cache, hyper_N)
  return _EXTRA_IMPLEMENTATIONS[implementation](method_key[0], hidden_NxH, head_HxV, labels_N,
                                                weights_N, prior_hidden_NxP, prior_head_PxV,
                                                hyper_N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(implementation, method_key, chunking, hidden_NxH, head_HxV, labels_N, weights_N,
           prior_hidden_NxP, prior_head_PxV, prior_cache, hyper_N):
  total, aux, _ = _implementation_forward(implementation, method_key, chunking, hidden_NxH,
                                          head_HxV, labels_N, weights_N, prior_hidden_NxP,
                                          prior_head_PxV, prior_cache, hyper_N)
  return total, aux


def _forward(method_key, chunking, hidden_NxH, head_HxV, labels_N, weights_N,
             prior_hidden_NxP, prior_head_PxV, prior_cache, hyper_N, with_grads=True):
  """``(weighted total, aux, (grad_hidden, grad_head))``; without ``with_grads`` the chunks
  skip the two gradient matmuls and the grads are None (the one-call form's forward pass)."""
  method, static = targets_lib.METHODS[method_key[0]], dict(method_key[1])
  chunk_size, accumulation, dtype = _unpack_chunking(chunking)
  accumulator_dtype = jnp.float32 if accumulation == 'float32' else head_HxV.dtype
  n = labels_N.shape[0]
  pad = (-n) % chunk_size
  chunks = (n + pad) // chunk_size
  as_chunks = lambda x: _pad_tokens(x, pad).reshape((chunks, chunk_size) + x.shape[1:])
  xs = {
      'hidden': as_chunks(hidden_NxH),
      'labels': as_chunks(labels_N),
      'weights': as_chunks(weights_N.astype(dtype)),
      'hyper': {k: as_chunks(v) for k, v in hyper_N.items()},
  }
  if method.needs_prior and prior_cache is not None:
    xs['prior_cache'] = jax.tree.map(as_chunks, prior_cache)
  elif method.needs_prior:
    xs['prior_hidden'] = as_chunks(prior_hidden_NxP)

  def step(grad_head, x):
    loss, grad_logits, aux = _chunk_values(
        method, x['hidden'], head_HxV, x['labels'], x['weights'], x.get('prior_hidden'),
        prior_head_PxV, x.get('prior_cache'), x['hyper'], static, dtype)
    weighted = jnp.sum(loss * x['weights'])
    if not with_grads:
      return grad_head, (weighted, None, aux)
    grad_logits = grad_logits.astype(head_HxV.dtype)
    grad_hidden = jnp.dot(grad_logits, head_HxV.T, preferred_element_type=dtype)
    # A narrow accumulator takes the product in its own dtype: a float32 product would be an
    # H x V float32 temporary, the very array this option removes.
    grad_head = grad_head + jnp.dot(x['hidden'].T, grad_logits,
                                    preferred_element_type=accumulator_dtype)
    return grad_head, (weighted, grad_hidden.astype(hidden_NxH.dtype), aux)

  # zeros_like: keeps a shard_map type
  init = jnp.zeros_like(head_HxV, accumulator_dtype) if with_grads else None
  grad_head, (weighted, grad_hidden, aux) = jax.lax.scan(step, init, xs)
  unchunk = lambda x: x.reshape((chunks * chunk_size,) + x.shape[2:])[:n]
  aux = jax.tree.map(unchunk, aux)
  grads = (unchunk(grad_hidden), grad_head.astype(head_HxV.dtype)) if with_grads else None
  return jnp.sum(weighted), aux, grads


def _unpack_chunking(chunking):
  """``(tokens per chunk, head-gradient accumulation[, compute dtype name])``."""
  chunk_size, accumulation, *dtype = chunking
  return chunk_size, accumulation, jnp.dtype(dtype[0] if dtype else 'float32')


def explicit_mesh(*trees):
  """``(mesh, axes)``: the mesh of the first input sharded over axes of ``Explicit`` type, and
  those axes (``(None, ())`` when no input is). Reshaping tokens into chunks is not defined on
  an explicitly sharded token axis, so the fused losses run under ``jax.sharding.auto_axes``
  over these axes: the compiler partitions the chunked scan as on an ``Auto`` mesh."""
  for x in jax.tree.leaves(trees):
    sharding = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    if mesh is None or mesh.empty:
      continue
    explicit = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                     if kind == AxisType.Explicit)
    if explicit:
      return mesh, explicit
  return None, ()


def sharded_token_axes(labels_N) -> tuple[str, ...]:
  """The mesh axes an explicitly sharded ``[N]`` labels array splits its tokens over."""
  spec = getattr(getattr(jax.typeof(labels_N), 'sharding', None), 'spec', None)
  if not spec or spec[0] is None:
    return ()
  return tuple(spec[0]) if isinstance(spec[0], tuple) else (spec[0],)


def token_sharding(mesh, labels) -> NamedSharding:
  """The sharding of per-token outputs: the labels' own (their first axis's spec)."""
  spec = getattr(getattr(jax.typeof(labels), 'sharding', None), 'spec', None)
  return NamedSharding(mesh, PartitionSpec(*(tuple(spec) if spec is not None else ())))


def _fused_fwd(implementation, method_key, chunking, hidden_NxH, head_HxV, labels_N,
               weights_N, prior_hidden_NxP, prior_head_PxV, prior_cache, hyper_N):
  total, aux, grads = _implementation_forward(implementation, method_key, chunking,
                                              hidden_NxH, head_HxV, labels_N, weights_N,
                                              prior_hidden_NxP, prior_head_PxV, prior_cache,
                                              hyper_N)
  shapes = (labels_N, weights_N, prior_hidden_NxP, prior_head_PxV, prior_cache, hyper_N)
  return (total, aux), (grads, shapes)


def _fused_bwd(implementation, method_key, chunking, residuals, cotangents):
  del implementation, method_key, chunking
  (grad_hidden, grad_head), (labels, weights, prior_hidden, prior_head, prior_cache,
                             hyper) = residuals
  g_total, _ = cotangents  # the per-token outputs are stop-gradient'ed by the caller
  zeros = lambda x: None if x is None else jnp.zeros_like(x)
  labels_ct = None if labels is None else jnp.zeros(labels.shape, jax.dtypes.float0)
  return ((g_total * grad_hidden.astype(jnp.float32)).astype(grad_hidden.dtype),
          (g_total * grad_head.astype(jnp.float32)).astype(grad_head.dtype),
          labels_ct, zeros(weights), zeros(prior_hidden), zeros(prior_head),
          jax.tree.map(_zero_cotangent, prior_cache), jax.tree.map(jnp.zeros_like, hyper))


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.zeros(x.shape, jax.dtypes.float0)
  return jnp.zeros_like(x)


_fused.defvjp(_fused_fwd, _fused_bwd)


def q_cross_entropy_fused(hidden_NxH: Array, head_HxV: Array, labels_N: Array,
                          method: 'str | targets_lib.Method', *,
                          prior_hidden_NxP: Array | None = None,
                          prior_head_PxV: Array | None = None, weights_N: Array | None = None,
                          chunk_size: int = 1024, implementation: str = 'xla',
                          prior_cache: 'cached_prior_lib.CachedPrior | None' = None,
                          head_grad_accumulation: str = 'float32',
                          **hyperparameters) -> tuple[Array, FusedAux]:
  r"""Weighted sum over tokens of CE(Q, softmax(hidden @ head)), without N x V arrays.

  .. math::
    L = \sum_i w_i\, \mathrm{CE}(Q_i, p_i), \qquad p_i = \mathrm{softmax}(h_i W),\quad
    \frac{\partial L}{\partial h_i} = w_i (p_i - Q_i) W^\top

  Args:
    hidden_NxH: student hidden states (float32 or bfloat16).
    head_HxV: the student's output head.
    labels_N: integer labels in ``[0, V)`` where the weight is non-zero.
    method: a name of :data:`qtarget.targets.METHODS` (sft, label_smoothing, dft, beyond_log,
      profit, sft_kl, asft, distill, hybrid_distill, target_sft, eaft, or a registered design)
      or a :class:`qtarget.targets.Method` (registered on the way).
    prior_hidden_NxP: the prior's hidden states, for methods with a prior.
    prior_head_PxV: the prior's head (same vocabulary V).
    prior_cache: instead of the prior's hidden states and head, its cached top-k distribution
      (:class:`qtarget.cached_prior.CachedPrior` of ``[N, k]`` and ``[N]`` arrays), exact on
      the top k with the tail spread like the student's (the XLA implementation).
    weights_N: per-token weights carrying the mask and the normalization (None: all ones).
    chunk_size: tokens per chunk; temporaries are O(chunk_size x V) plus the H x V
      accumulator of the head gradient (the XLA implementation).
    head_grad_accumulation: how the XLA implementation sums the head gradient over chunks.
      'float32' (default): a float32 accumulator, H x V x 4 bytes of temporaries (0.87 GiB for
      Qwen2.5-1.5B's head); the result is rounded to the head's dtype once. 'head_dtype': the
      accumulator in the head's dtype (half the bytes for a bfloat16 head; no change for a
      float32 one). Each chunk's product G_j (float32 accumulation inside the matmul) is
      rounded to the head's dtype and added to the accumulator, so with c chunks and the
      dtype's unit roundoff u (2^-8 for bfloat16) the head gradient G = sum_j G_j satisfies,
      elementwise and to first order in u,
      ``|G_computed - G| <= u * sum_{j=1..c} (|G_j| + |G_1 + ... + G_j|) <= 2 c u sum_j |G_j|``
      (recursive summation with rounded summands; 'float32' has u |G|, its final rounding;
      tested against a float64 reference in tests/test_fused.py). In
      :func:`q_cross_entropy_fused_sharded` each device's sum is bounded so, and the devices'
      sums are added in float32 and rounded once more (u |G|); that sum's float32 H x V
      cotangent is a temporary of the sharded version.
    implementation: 'xla' (token chunks, any backend); after ``import
      qtarget.experimental.fused_pallas``, 'pallas' (its GPU kernels: vocabulary blocks;
      correct but slow on an H100) or 'pallas_interpret' (the same, interpreted on CPU).
    **hyperparameters: the method's, scalars or ``[N]`` arrays (traced: no recompilation);
      static ones (EAFT's ``k``) as Python ints.

  Returns:
    ``(loss, aux)``: the scalar weighted sum (differentiable with respect to the hidden states
    and the head; the prior gets no gradient) and :class:`FusedAux` per-token values.

  The loss is computed in float32 whatever the inputs (float64 inputs too; the dense
  :func:`qtarget.losses.q_cross_entropy` computes float64 in float64), and it has a custom VJP
  only: reverse mode (``jax.grad``, ``jax.vjp``), not forward mode (``jax.jvp``). Out-of-range
  labels at non-zero weight, and concrete weights that are negative or not finite, raise a
  ValueError; under ``jax.jit`` such labels, and traced hyperparameters outside their range,
  give a NaN loss instead.

  Example:
    >>> h, w = jnp.ones((4, 8)), jnp.eye(8, 16)
    >>> loss, aux = q_cross_entropy_fused(h, w, jnp.arange(4), 'dft')
    >>> aux.per_token_loss.shape
    (4,)
  """
  _check_weights_are_not_a_mask(weights_N)
  method_key, chunking, args = prepare(
      hidden_NxH, head_HxV, labels_N, method, prior_hidden_NxP=prior_hidden_NxP,
      prior_head_PxV=prior_head_PxV, weights_N=weights_N, chunk_size=chunk_size,
      implementation=implementation, prior_cache=prior_cache,
      head_grad_accumulation=head_grad_accumulation, hyperparameters=hyperparameters)
  call = functools.partial(_fused, implementation, method_key, chunking)
  mesh, explicit = explicit_mesh(args)
  token_axes = sharded_token_axes(labels_N) if explicit else ()
  if token_axes:  # each device scans its own tokens
    return q_cross_entropy_fused_sharded(
        hidden_NxH, head_HxV, labels_N, method, mesh=mesh, token_axes=token_axes,
        prior_hidden_NxP=prior_hidden_NxP, prior_head_PxV=prior_head_PxV, weights_N=weights_N,
        chunk_size=chunk_size, implementation=implementation, prior_cache=prior_cache,
        head_grad_accumulation=head_grad_accumulation, **hyperparameters)
  if explicit:
    per_token = token_sharding(mesh, labels_N)
    call = jax.sharding.auto_axes(call, axes=explicit, out_sharding=(
        NamedSharding(mesh, PartitionSpec()), FusedAux(*[per_token] * len(FusedAux._fields))))
  total, aux = call(*args)
  return total, jax.lax.stop_gradient(aux)


def prepare(hidden_NxH, head_HxV, labels_N, method, *, prior_hidden_NxP, prior_head_PxV,
            weights_N, chunk_size, implementation, prior_cache, head_grad_accumulation,
            hyperparameters, compute_dtype='float32'):
  """Checks the fused loss's inputs and puts them in the form its scan takes:
  ``(method_key, chunking, (hidden, head, labels, weights, prior hidden, prior head, prior
  cache, hyperparameters as [N] arrays))``. Shared by :func:`q_cross_entropy_fused` and the
  one-call :func:`qtarget.q_loss_fused`."""
  spec = targets_lib.resolve(method)
  method = spec.name
  _check_inputs(hidden_NxH, head_HxV, labels_N, weights_N, 'hidden_NxH', 'head_HxV')
  if spec.needs_prior and prior_cache is not None:
    validation.check_cached_prior(labels_N.shape, head_HxV.shape[1], prior_cache)
    if implementation != 'xla':
      raise ValueError("a cached prior needs implementation='xla'.")
    prior_cache = jax.tree.map(jax.lax.stop_gradient, cached_prior_lib.CachedPrior(*prior_cache))
    prior_hidden_NxP = prior_head_PxV = None
  elif spec.needs_prior:
    if prior_hidden_NxP is None or prior_head_PxV is None:
      raise ValueError(f'method {method!r} needs the prior: pass prior_hidden_NxP and '
                       'prior_head_PxV (or prior_cache).')
    if jnp.ndim(prior_hidden_NxP) == 2 and prior_hidden_NxP.shape[0] != hidden_NxH.shape[0]:
      raise ValueError(f'prior_hidden_NxP has {prior_hidden_NxP.shape[0]} rows and hidden_NxH '
                       f'{hidden_NxH.shape[0]}: the prior needs the hidden state of every token.')
    _check_inputs(prior_hidden_NxP, prior_head_PxV, labels_N, None, 'prior_hidden_NxP',
                  'prior_head_PxV')
    if prior_head_PxV.shape[1] != head_HxV.shape[1]:
      raise ValueError(f"the prior head's vocabulary size {prior_head_PxV.shape[1]} differs from "
                       f"the student's {head_HxV.shape[1]}.")
  else:
    prior_hidden_NxP = prior_head_PxV = prior_cache = None
  if implementation != 'xla' and implementation not in _EXTRA_IMPLEMENTATIONS:
    if implementation in KNOWN_IMPLEMENTATIONS:
      raise ValueError(f'implementation {implementation!r} is experimental: import '
                       f'{KNOWN_IMPLEMENTATIONS[implementation]} first.')
    raise ValueError(f'implementation must be one of {tuple(KNOWN_IMPLEMENTATIONS)}, got '
                     f'{implementation!r}.')
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}.')
  if head_grad_accumulation not in HEAD_GRAD_ACCUMULATIONS:
    raise ValueError(f'head_grad_accumulation must be one of {HEAD_GRAD_ACCUMULATIONS}, got '
                     f'{head_grad_accumulation!r}.')
  if head_grad_accumulation != 'float32' and implementation != 'xla':
    raise ValueError(f"head_grad_accumulation={head_grad_accumulation!r} is an option of "
                     f"implementation='xla'; the {implementation!r} kernels accumulate their own "
                     'way.')
  n = labels_N.shape[0]
  spec.check_hyperparameters(hyperparameters, (n,), head_HxV.shape[1])
  if implementation != 'xla' and (spec.static_hyperparameters or spec.trust_reads_distribution):
    raise ValueError(f'the Pallas kernels take trust rules of the label probability alone; '
                     f"method {method!r} needs implementation='xla'.")
  _check_labels_where_weighted(labels_N, head_HxV.shape[1], weights_N)
  traced, static = spec.split_hyperparameters(hyperparameters)
  hyper_N = {name: jnp.broadcast_to(jnp.asarray(jax.lax.stop_gradient(v), compute_dtype), (n,))
             for name, v in traced.items()}
  weights_N = (jnp.ones((n,), compute_dtype) if weights_N is None
               else jax.lax.stop_gradient(jnp.asarray(weights_N, compute_dtype)))
  if prior_hidden_NxP is not None:
    prior_hidden_NxP = jax.lax.stop_gradient(prior_hidden_NxP)
    prior_head_PxV = jax.lax.stop_gradient(prior_head_PxV)
  chunk_size = min(chunk_size, max(n, 1))
  method_key = (method, tuple(sorted(static.items())))
  chunking = (chunk_size, head_grad_accumulation, compute_dtype)
  return method_key, chunking, (hidden_NxH, head_HxV, labels_N, weights_N, prior_hidden_NxP,
                                prior_head_PxV, prior_cache, hyper_N)


def q_cross_entropy_fused_sharded(hidden_NxH: Array, head_HxV: Array, labels_N: Array,
                                  method: 'str | targets_lib.Method', *, mesh,
                                  token_axes: tuple,
                                  prior_hidden_NxP: Array | None = None,
                                  prior_head_PxV: Array | None = None,
                                  weights_N: Array | None = None, chunk_size: int = 1024,
                                  implementation: str = 'xla',
                                  prior_cache: 'cached_prior_lib.CachedPrior | None' = None,
                                  head_grad_accumulation: str = 'float32',
                                  **hyperparameters) -> tuple[Array, FusedAux]:
  """:func:`q_cross_entropy_fused`, data-parallel over the mesh axes ``token_axes``.

  Each device scans only its own tokens (the token axis split over ``token_axes``, in mesh
  order) with the whole head, gathered once; its head gradient is summed over those axes once
  per call, not per chunk. Same arguments and result as :func:`q_cross_entropy_fused`, plus:

  Args:
    mesh: a ``jax.sharding.Mesh``.
    token_axes: mesh axis names that split the N tokens; N must be divisible by their size.
  """
  token_axes = tuple(token_axes)
  spec = targets_lib.resolve(method)
  spec.check_hyperparameters(hyperparameters, labels_N.shape, head_HxV.shape[1])
  _check_weights_are_not_a_mask(weights_N)
  _check_weights(weights_N)
  traced, static = spec.split_hyperparameters(hyperparameters)
  n = labels_N.shape[0]
  shards = math.prod(mesh.shape[a] for a in token_axes)
  if n % shards:
    raise ValueError(f'{n} tokens do not split over the mesh axes {token_axes} '
                     f'({shards} devices).')
  tokens, rows, whole = PartitionSpec(token_axes), PartitionSpec(token_axes, None), PartitionSpec()
  # Scalars (hyperparameters) and absent weights enter whole and are broadcast on each device:
  # broadcast outside, they would be replicated arrays declared split.
  args = {'hidden': hidden_NxH, 'head': head_HxV, 'labels': labels_N,
          'hyper': {name: jnp.asarray(v, jnp.float32) if jnp.ndim(v) == 0
                    else jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))
                    for name, v in traced.items()}}
  specs = {'hidden': rows, 'head': whole, 'labels': tokens,
           'hyper': {name: whole if jnp.ndim(v) == 0 else tokens for name, v in traced.items()}}
  if weights_N is not None:
    args['weights'], specs['weights'] = jnp.asarray(weights_N, jnp.float32), tokens
  if prior_hidden_NxP is not None:
    args.update(prior_hidden=prior_hidden_NxP, prior_head=prior_head_PxV)
    specs.update(prior_hidden=rows, prior_head=whole)
  if prior_cache is not None:
    args['prior_cache'] = cached_prior_lib.CachedPrior(*prior_cache)
    specs['prior_cache'] = cached_prior_lib.CachedPrior(rows, rows, tokens)
  if any(kind == AxisType.Explicit for kind in mesh.axis_types):
    # shard_map takes explicitly sharded inputs only as its specs lay them out.
    args = jax.tree.map(lambda x, spec: jax.sharding.reshard(x, NamedSharding(mesh, spec)),
                        args, specs)

  _check_labels_where_weighted(labels_N, head_HxV.shape[1], weights_N)

  def local(a):
    # The head is the same on every device; marking it varying makes the transpose of this
    # cast the one sum of the head gradient over the token axes, done in float32.
    varying = lambda x: jax.lax.pcast(x.astype(jnp.float32), token_axes,
                                      to='varying').astype(x.dtype)
    local_n = a['labels'].shape[0]
    hyper = {name: jnp.broadcast_to(v, (local_n,)) for name, v in a['hyper'].items()}
    loss, aux = q_cross_entropy_fused(
        a['hidden'], varying(a['head']), a['labels'], method,
        prior_hidden_NxP=a.get('prior_hidden'),
        prior_head_PxV=None if 'prior_head' not in a else varying(a['prior_head']),
        weights_N=a.get('weights'), chunk_size=chunk_size, implementation=implementation,
        prior_cache=a.get('prior_cache'), head_grad_accumulation=head_grad_accumulation,
        **hyper, **static)
    return jax.lax.psum(loss, token_axes), aux

  aux_specs = FusedAux(*([tokens] * len(FusedAux._fields)))
  return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=(whole, aux_specs))(args)


def _check_inputs(hidden, head, labels, weights, hidden_name, head_name):
  for name, x in ((hidden_name, hidden), (head_name, head)):
    if jnp.ndim(x) != 2:
      raise ValueError(f'{name} must be 2-D, got shape {jnp.shape(x)}.')
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(f'{name} must be floating-point, got {jnp.result_type(x)}.')
  if hidden.shape[1] != head.shape[0]:
    raise ValueError(f'{hidden_name} of shape {hidden.shape} and {head_name} of shape '
                     f'{head.shape} do not chain (hidden size {hidden.shape[1]} vs '
                     f'{head.shape[0]}).')
  if jnp.ndim(labels) != 1 or labels.shape[0] != hidden.shape[0]:
    raise ValueError(f'labels_N of shape {jnp.shape(labels)} must be [N] with N = '
                     f'{hidden.shape[0]} tokens.')
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f'labels_N must be integers, got {jnp.result_type(labels)}.')
  if weights is not None and jnp.shape(weights) != jnp.shape(labels):
    raise ValueError(f'weights_N of shape {jnp.shape(weights)} must match labels_N '
                     f'{jnp.shape(labels)}.')
  _check_weights(weights)


def _check_weights_are_not_a_mask(weights) -> None:
  if weights is not None and jnp.result_type(weights) == jnp.bool_:
    raise TypeError(
        'weights_N is a float weight per token (the normalisation included): a boolean mask '
        'here would make a mean a sum. Pass weights_N=mask / mask.sum(), or use '
        'qtarget.q_loss_fused(..., where=mask) and reduce with qtarget.token_mean.')


def _check_weights(weights) -> None:
  """Concrete weights must be finite and non-negative (traced ones cannot be checked)."""
  if weights is None or not validation.is_concrete(weights):
    return
  values = np.asarray(weights, np.float32)
  bad = ~(np.isfinite(values) & (values >= 0))
  if bad.any():
    index = int(np.argmax(bad))
    raise ValueError(f'weights_N must be finite and non-negative; {int(bad.sum())} are not, the '
                     f'first {values[index]} at index {index}.')


def _check_labels_where_weighted(labels_N, vocab_size, weights_N) -> None:
  validation.check_label_range(
      labels_N, vocab_size, None if weights_N is None else jnp.asarray(weights_N) != 0,
      mask_hint='Give padding positions weight 0 in `weights_N`.')
