r"""One call per loss: from logits (or hidden states and a head), labels, a mask and a prior to
each token's loss, for every method of :data:`qtarget.targets.METHODS`.

Two forms with one vocabulary, exported from :mod:`qtarget`::

  q_loss(logits, labels, method, *, where=None, prior=None, **hyperparameters)
  q_loss_fused(hidden, head, labels, method, *, where=None, prior=None, **hyperparameters)

``prior`` is the prior's logits (dense form), a :class:`FusedPrior` of its hidden states and
head (fused form), or a :class:`qtarget.cached_prior.CachedPrior` (either form). Both return
the per-token loss CE(Q, p) in the shape of ``labels`` and leave the reduction to the caller,
as optax's losses do (:func:`token_mean` is the mean over unmasked tokens); the gradient with
respect to the logits (or the hidden states and the head) is ``(p - Q)`` times the cotangent.
Masking is one boolean ``where`` of the labels' shape: masked positions give loss 0 and
gradient 0 whatever they hold. The loss is computed in float32, or float64 for float64 inputs.

These calls are thin: the dense one is :func:`qtarget.targets.build` followed by
:func:`qtarget.losses.q_cross_entropy`, the fused one runs :mod:`qtarget.fused`'s token-chunk
scan, and both raise the same errors for bad concrete input. ``checked=True`` adds
``jax.experimental.checkify`` checks for what cannot raise under ``jax.jit`` (a label out of
range, a traced hyperparameter out of range, a non-finite prior or input), each naming the
first failing position; wrap the jitted function in ``checkify.checkify`` to use them.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qtarget import cached_prior as cached_prior_lib
from qtarget import fused as fused_lib
from qtarget import losses as losses_lib
from qtarget import targets as targets_lib
from qtarget import validation

Array = jax.Array
CachedPrior = cached_prior_lib.CachedPrior


class FusedPrior(NamedTuple):
  """The prior of the fused form: its hidden states ``[..., P]`` (the labels' shape plus its
  hidden size) and its output head ``[P, V]`` (the student's vocabulary)."""
  hidden: Array
  head: Array


class TokenMetrics(NamedTuple):
  """Per-token values for logging, in the labels' shape (not differentiable; 0 at masked
  positions, but ``predicted``).

  Attributes:
    trust: the target's mass on the label.
    label_log_prob: log p(label) under the student.
    predicted: the student's most likely token (int32).
    prior_entropy: the prior's entropy (a cached prior's with its tail as one bucket, a lower
      bound); 0 for methods without a prior.
  """
  trust: Array
  label_log_prob: Array
  predicted: Array
  prior_entropy: Array


def q_loss(logits: Array, labels: Array, method: 'str | targets_lib.Method', *,
           where: Array | None = None, prior: 'Array | CachedPrior | None' = None,
           return_metrics: bool = False, checked: bool = False,
           **hyperparameters) -> 'Array | tuple[Array, TokenMetrics]':
  r"""Per-token loss of a method, from the student's logits: CE(Q, softmax(logits)).

  .. math::
    Q = \gamma\,\mathrm{onehot}(y) + (1 - \gamma)\, r, \qquad
    L = -\gamma \log p_y - (1 - \gamma) \textstyle\sum_v r_v \log p_v, \qquad
    \partial L / \partial z = p - Q

  Args:
    logits: ``[..., V]`` the student's logits (any float dtype).
    labels: ``[...]`` integer token ids, in ``[0, V)`` where ``where`` is True.
    method: a name of :data:`qtarget.targets.METHODS` ('sft', 'dft', 'distill',
      'target_sft', ...) or a :class:`qtarget.targets.Method`.
    where: optional ``[...]`` boolean mask (True: the token counts).
    prior: for methods with a prior: its logits ``[..., V]`` (same vocabulary), or a
      :class:`~qtarget.cached_prior.CachedPrior` of its top-k.
    return_metrics: also return :class:`TokenMetrics`.
    checked: add ``checkify`` checks (see the module docstring).
    **hyperparameters: the method's (``eta=0.5``), numbers or arrays broadcasting to labels.

  Returns:
    ``[...]`` per-token losses, float32 (float64 for float64 logits); with
    ``return_metrics``, ``(loss, TokenMetrics)``.

  Example:
    >>> logits, prior = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 3.0, 0.0]])
    >>> q_loss(logits, jnp.array([0]), 'target_sft', prior=prior, eta=0.5)
    Array([0.3856094], dtype=float32)
  """
  spec = targets_lib.resolve(method)
  if isinstance(prior, FusedPrior):
    raise TypeError('a FusedPrior (hidden states and head) is the prior of q_loss_fused; '
                    'q_loss takes the prior\'s logits or a CachedPrior.')
  validation.check_labels(logits, labels)
  validation.check_where(where, labels)
  if checked:
    _check_traced(spec, labels, jnp.shape(logits)[-1], where, hyperparameters,
                  {'logits': logits, 'prior': prior})
  target = targets_lib.build(spec, logits, labels, prior_logits=prior, **hyperparameters)
  loss = losses_lib.q_cross_entropy(logits, labels, target, where=where)
  if not return_metrics:
    return loss
  dtype = validation.compute_dtype(jnp.result_type(logits))
  log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(logits).astype(dtype), axis=-1)
  prior_entropy = jnp.zeros(jnp.shape(labels), dtype)
  if spec.needs_prior and isinstance(prior, CachedPrior):
    prior_entropy = cached_prior_lib.bucket_entropy(prior).astype(dtype)
  elif spec.needs_prior:
    prior_log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(prior).astype(dtype), axis=-1)
    prior_entropy = -jnp.sum(jnp.where(jnp.isneginf(prior_log_probs), 0.0,
                                       jnp.exp(prior_log_probs) * prior_log_probs), axis=-1)
  metrics = TokenMetrics(target.trust, targets_lib.label_log_probs(log_probs, labels),
                         jnp.argmax(log_probs, axis=-1).astype(jnp.int32), prior_entropy)
  return loss, _masked(metrics, where)


def q_loss_fused(hidden: Array, head: Array, labels: Array, method: 'str | targets_lib.Method',
                 *, where: Array | None = None, prior: 'FusedPrior | CachedPrior | None' = None,
                 return_metrics: bool = False, checked: bool = False, chunk_size: int = 1024,
                 **hyperparameters) -> 'Array | tuple[Array, TokenMetrics]':
  r""":func:`q_loss` of ``logits = hidden @ head``, without a tokens x vocabulary array.

  The tokens are walked in chunks of ``chunk_size``: each chunk's logits (and the prior's)
  exist only inside the chunk, so temporaries are O(chunk_size x V) plus, in the backward
  pass, the head gradient's float32 H x V accumulator. The forward pass computes the loss (one
  head matmul, and one for the prior's); the backward pass recomputes the chunk's logits and
  forms ``cotangent x (p - Q)`` for the two gradient matmuls, so a per-token cotangent (any
  reduction) is exact. :func:`qtarget.fused.q_cross_entropy_fused` is the weighted sum
  instead, one head matmul cheaper where the token weights are known in advance.

  Args:
    hidden: ``[..., H]`` the student's last hidden states (float32 or bfloat16).
    head: ``[H, V]`` the student's output head.
    labels: ``[...]`` integer token ids (``hidden``'s shape without its last axis).
    method: as in :func:`q_loss`.
    where: as in :func:`q_loss`.
    prior: for methods with a prior: a :class:`FusedPrior` (the prior's hidden states
      ``[..., P]`` and head ``[P, V]``) or a :class:`~qtarget.cached_prior.CachedPrior`.
    return_metrics, checked, **hyperparameters: as in :func:`q_loss`.
    chunk_size: tokens per chunk.

  Returns:
    As :func:`q_loss`: ``[...]`` per-token losses (and :class:`TokenMetrics`).

  Under ``jax.jit`` on a mesh (``jax.set_mesh``): with tokens split over axes of ``Explicit``
  type (``jax.make_mesh``'s default), each device scans its own tokens under ``shard_map``
  with the whole head, gathered once, and the head's gradient is summed over those axes once;
  on ``Auto`` axes the compiler places the scan and gathers the tokens to every device (correct,
  not divided: :func:`qtarget.fused.q_cross_entropy_fused_sharded` divides it there).

  Example:
    >>> hidden, head = jnp.ones((2, 3, 4)), jnp.eye(4, 6)
    >>> q_loss_fused(hidden, head, jnp.zeros((2, 3), jnp.int32), 'sft').shape
    (2, 3)
  """
  spec = targets_lib.resolve(method)
  if jnp.ndim(hidden) < 2 or jnp.ndim(head) != 2:
    raise ValueError(f'hidden must be [..., H] and head [H, V]; got shapes {jnp.shape(hidden)} '
                     f'and {jnp.shape(head)}.')
  if jnp.shape(labels) != jnp.shape(hidden)[:-1]:
    raise ValueError(f'labels of shape {jnp.shape(labels)} must be hidden\'s shape without its '
                     f'last axis, {jnp.shape(hidden)[:-1]}.')
  validation.check_where(where, labels)
  validation.check_label_range(labels, jnp.shape(head)[-1], where)  # positions in labels' shape
  if prior is not None and not isinstance(prior, (FusedPrior, CachedPrior)):
    raise TypeError('q_loss_fused takes prior=FusedPrior(hidden, head) or a CachedPrior, got '
                    f'{type(prior).__name__}.')
  for name, value in hyperparameters.items():
    if name in spec.hyperparameters:
      validation.check_hyperparameter(name, value, jnp.shape(labels), float('-inf'),
                                      float('inf'))
  if checked:
    _check_traced(spec, labels, jnp.shape(head)[-1], where, hyperparameters,
                  {'hidden': hidden, 'prior': prior})
  shape, n = jnp.shape(labels), int(jnp.size(labels))
  rows = lambda x: jnp.reshape(x, (n,) + jnp.shape(x)[len(shape):])
  hyper_N = {name: rows(jnp.broadcast_to(jnp.asarray(value), shape)) if jnp.ndim(value) else value
             for name, value in hyperparameters.items()}
  prior_hidden = prior_head = cache = None
  if isinstance(prior, FusedPrior):
    prior_hidden, prior_head = rows(prior.hidden), prior.head
  elif isinstance(prior, CachedPrior):
    cache = jax.tree.map(rows, prior)
  dtype = validation.compute_dtype(jnp.result_type(hidden, head))
  method_key, chunking, args = fused_lib.prepare(
      rows(hidden), head, rows(labels), spec, prior_hidden_NxP=prior_hidden,
      prior_head_PxV=prior_head, weights_N=None if where is None else rows(where),
      chunk_size=chunk_size, implementation='xla', prior_cache=cache,
      head_grad_accumulation='float32', hyperparameters=hyper_N, compute_dtype=dtype.name)
  call = functools.partial(_per_token, method_key, chunking)
  mesh, explicit = fused_lib.explicit_mesh(args)
  token_axes = fused_lib.sharded_token_axes(args[2]) if explicit else ()
  if token_axes:
    call = _split_over_tokens(mesh, token_axes, method_key, chunking, args)
  elif explicit:
    per_token = fused_lib.token_sharding(mesh, args[2])
    call = jax.sharding.auto_axes(call, axes=explicit, out_sharding=(
        per_token, fused_lib.FusedAux(*[per_token] * len(fused_lib.FusedAux._fields))))
  loss_N, aux = call(*args)
  loss = jnp.reshape(loss_N, shape)
  if not return_metrics:
    return loss
  aux = jax.tree.map(lambda x: jnp.reshape(jax.lax.stop_gradient(x), shape), aux)
  metrics = TokenMetrics(aux.trust, aux.label_log_prob, aux.predicted, aux.prior_entropy)
  return loss, _masked(metrics, where)


def token_mean(per_token_loss: Array, where: Array | None = None,
               num_tokens: 'Array | int | None' = None) -> Array:
  """The mean over unmasked tokens: ``sum(loss * where) / count``.

  ``count`` is ``where``'s number of True entries (all tokens without ``where``), or
  ``num_tokens`` when given. Under gradient accumulation give every micro-batch the global
  batch's count of unmasked tokens: the micro-batches' gradients then add up to the gradient
  of the global mean, whatever the micro-batches' own counts (a mean of per-micro-batch means
  would weigh tokens unequally). A count of 0 gives 0, not NaN.

  Example:
    >>> token_mean(jnp.array([1.0, 2.0, 9.0]), jnp.array([True, True, False]))
    Array(1.5, dtype=float32)
  """
  validation.check_where(where, per_token_loss)
  if where is None:
    total, count = jnp.sum(per_token_loss), jnp.size(per_token_loss)
  else:
    total, count = jnp.sum(jnp.where(where, per_token_loss, 0.0)), jnp.sum(where)
  if num_tokens is not None:
    count = num_tokens
  return total / jnp.maximum(jnp.asarray(count, total.dtype), 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _per_token(method_key, chunking, hidden_NxH, head_HxV, labels_N, weights_N,
               prior_hidden_NxP, prior_head_PxV, prior_cache, hyper_N):
  _, aux, _ = fused_lib._forward(  # pylint: disable=protected-access
      method_key, chunking, hidden_NxH, head_HxV, labels_N, weights_N, prior_hidden_NxP,
      prior_head_PxV, prior_cache, hyper_N, with_grads=False)
  return aux.per_token_loss, aux


def _per_token_fwd(method_key, chunking, *args):
  return _per_token(method_key, chunking, *args), args


def _per_token_bwd(method_key, chunking, inputs, cotangents):
  hidden, head, labels, weights, prior_hidden, prior_head, prior_cache, hyper = inputs
  loss_cotangent, _ = cotangents  # the metrics are stop-gradient'ed by the caller
  # The chunks again, each token's logit gradient (p - Q) scaled by its cotangent.
  _, _, (grad_hidden, grad_head) = fused_lib._forward(  # pylint: disable=protected-access
      method_key, chunking, hidden, head, labels, weights * loss_cotangent, prior_hidden,
      prior_head, prior_cache, hyper)
  zeros = lambda x: None if x is None else jnp.zeros_like(x)
  return (grad_hidden, grad_head, jnp.zeros(labels.shape, jax.dtypes.float0), zeros(weights),
          zeros(prior_hidden), zeros(prior_head),
          jax.tree.map(fused_lib._zero_cotangent, prior_cache),  # pylint: disable=protected-access
          jax.tree.map(jnp.zeros_like, hyper))


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def _split_over_tokens(mesh, token_axes, method_key, chunking, args):
  """``_per_token`` under ``shard_map``: each device scans its own tokens with the whole head
  (gathered once); the head's gradient is summed over ``token_axes`` once, in float32."""
  tokens, rows, whole = P(token_axes), P(token_axes, None), P()
  cache_specs = None if args[6] is None else CachedPrior(rows, rows, tokens)
  specs = (rows, whole, tokens, tokens, None if args[4] is None else rows,
           None if args[5] is None else whole, cache_specs, {name: tokens for name in args[7]})

  def local(hidden, head, labels, weights, prior_hidden, prior_head, cache, hyper):
    varying = lambda x: None if x is None else jax.lax.pcast(
        x.astype(jnp.float32), token_axes, to='varying').astype(x.dtype)
    local_chunking = (min(chunking[0], labels.shape[0]),) + tuple(chunking[1:])
    return _per_token(method_key, local_chunking, hidden, varying(head), labels, weights,
                      prior_hidden, varying(prior_head), cache, hyper)

  aux_specs = fused_lib.FusedAux(*[tokens] * len(fused_lib.FusedAux._fields))
  split = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(tokens, aux_specs))
  # shard_map takes explicitly sharded inputs only as its specs lay them out.
  reshard = lambda x, spec: jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return lambda *inputs: split(*jax.tree.map(reshard, inputs, specs))


def _masked(metrics: TokenMetrics, where: Array | None) -> TokenMetrics:
  if where is None:
    return metrics
  zero = lambda x: jnp.where(where, x, jnp.zeros((), x.dtype))
  return TokenMetrics(zero(metrics.trust), zero(metrics.label_log_prob), metrics.predicted,
                      zero(metrics.prior_entropy))


def _first(bad: Array) -> tuple[Array, Array]:
  """Whether any entry is bad, and the index (an array of coordinates) of the first."""
  flat = jnp.argmax(jnp.ravel(bad))
  return jnp.any(bad), jnp.array(jnp.unravel_index(flat, jnp.shape(bad)))


def _check_traced(spec, labels, vocab_size, where, hyperparameters, inputs) -> None:
  """``checkify`` checks of what a traced input can get wrong, each naming a position."""
  unmasked = (lambda bad: bad) if where is None else (lambda bad: bad & where)
  labels = jnp.asarray(labels)
  out_of_range = unmasked((labels < 0) | (labels >= vocab_size))
  any_bad, position = _first(out_of_range)
  checkify.check(~any_bad, 'qtarget: label {label} at position {position} is outside '
                 f'[0, {vocab_size}) (vocabulary size {vocab_size}).',
                 label=labels[tuple(position)] if labels.ndim else labels, position=position)
  for name, valid in spec.hyperparameters.items():
    if name not in hyperparameters:
      continue
    value = jnp.broadcast_to(jnp.asarray(hyperparameters[name]), jnp.shape(labels))
    any_bad, position = _first(unmasked(~valid.contains(value)))
    interval = (f"{'(' if valid.low_open else '['}{valid.low:g}, {valid.high:g}"
                f"{')' if valid.high_open else ']'}")
    checkify.check(~any_bad, f'qtarget: hyperparameter {name}={{value}} at position '
                   f'{{position}} is outside its valid range {interval}.',
                   value=value[tuple(position)] if value.ndim else value, position=position)
  for name, value in inputs.items():
    if value is None:
      continue
    if isinstance(value, CachedPrior):
      leaves = {'prior.log_probs': value.log_probs, 'prior.tail_log_mass': value.tail_log_mass}
    elif isinstance(value, FusedPrior):
      leaves = {'prior.hidden': value.hidden}
    else:
      leaves = {name: value}
    for leaf_name, leaf in leaves.items():
      leaf = jnp.asarray(leaf)
      # Per token: NaN, or +inf (a -inf logit or log-probability excludes a token: allowed).
      bad = jnp.isnan(leaf) | jnp.isposinf(leaf)
      if leaf.ndim > labels.ndim:
        bad = jnp.any(bad, axis=tuple(range(labels.ndim, leaf.ndim)))
      any_bad, position = _first(unmasked(bad))
      checkify.check(~any_bad, f'qtarget: {leaf_name} is NaN or +inf at position {{position}}.',
                     position=position)
