r"""The fused Q cross-entropy as Pallas kernels for GPUs (Triton): vocabulary blocks, no N x V.

Two kernels, both tiled over (tokens x vocabulary block) and both looping over the hidden size:

1. ``_stats_kernel`` (grid: token tiles) streams the vocabulary once and keeps, per token, running
   log-sum-exps of the student's logits ``z``, of the prior's logits ``zp`` and of the residual's
   exponent ``w = a z + b zp`` (``a``, ``b`` the method's powers; 0 and 0 is uniform), the
   residual-weighted sum of ``z``, the prior's entropy, ``z[label]`` and the argmax. The residual
   cross-entropy follows without a second pass:
   :math:`-\sum_v r_v \log p_v = \mathrm{lse}(z) - \sum_v r_v z_v`.
2. ``_grad_kernel`` (grid: token tiles x vocabulary blocks) recomputes one block of ``z`` and
   ``zp``, forms ``G = weight (p - Q)`` for it, and adds ``G W^T`` into the hidden gradient and
   ``h^T G`` into the head gradient with atomic float adds (so the summation order, and the last
   bits, vary from run to run).

Matmuls: 2 student-head and 1 prior-head products in the forward statistics are repeated in the
gradient kernel, plus the two gradient products: 1.5x the floor of
:mod:`qtarget.fused` (which keeps a chunk of logits instead). The trust, which may depend on
``p(label)``, is computed between the kernels on ``[N]`` vectors.

**Status:** checked for equality with the dense loss in Pallas' interpret mode on CPU
(``tests/test_fused_pallas.py``) and, compiled with Triton, on an H100 (jax 0.11.2), where it is
correct but 21x the matmul floor at N, H, V = 16384, 576, 49152 (``benchmarks/RESULTS.md``; not
profiled: the gradient kernel's atomic adds of every tile product are the likely cost).
Experimental: jax deprecates the Triton backend of Pallas, and the XLA path is faster. Importing
this module registers ``implementation='pallas'`` and ``'pallas_interpret'`` with
:func:`qtarget.fused.q_cross_entropy_fused`; nothing else in the package imports it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qtarget import fused
from qtarget import targets as targets_lib

Array = jax.Array
DEFAULT_BLOCKS = {'tokens': 32, 'vocab': 128, 'hidden': 64}
_STATS = ('max_s', 'sum_s', 'max_p', 'sum_p', 'dot_p', 'max_w', 'sum_w', 'dot_w', 'label_logit',
          'best', 'best_index')


def _power_times(power, x):
  return jnp.where(power == 0, 0.0, power * x)


def _dot(x, y):
  # float32 inputs: full precision (Triton would otherwise use TF32 on tensor cores).
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  return jnp.dot(x, y, preferred_element_type=jnp.float32, precision=precision)


def _logits_block(x_ref, w_ref, rows, v0, depth, blocks):
  """``x[rows] @ w[:, v0:v0+BV]`` in float32, looping over the hidden size in blocks."""
  bk, bv = blocks['hidden'], blocks['vocab']

  def body(k, acc):
    x = x_ref[rows, pl.ds(k * bk, bk)]
    w = w_ref[pl.ds(k * bk, bk), pl.ds(v0, bv)]
    return acc + _dot(x, w)

  return jax.lax.fori_loop(0, depth // bk, body,
                           jnp.zeros((blocks['tokens'], bv), jnp.float32))


def _stats_kernel(h_ref, w_ref, hp_ref, wp_ref, labels_ref, a_ref, b_ref, *out_refs, vocab,
                  hidden, prior_hidden, padded_vocab, blocks, has_prior):
  bt, bv = blocks['tokens'], blocks['vocab']
  rows = pl.ds(pl.program_id(0) * bt, bt)
  labels, a, b = labels_ref[rows], a_ref[rows], b_ref[rows]
  minus_inf = jnp.full((bt,), -jnp.inf, jnp.float32)
  zero = jnp.zeros((bt,), jnp.float32)

  def online(c, key, x, valid, values=None):
    """Folds a block into running max, sum of exp and (optionally) exp-weighted sum of values."""
    new_max = jnp.maximum(c[f'max_{key}'], x.max(axis=1))
    e = jnp.where(valid, jnp.exp(x - new_max[:, None]), 0.0)
    old = c[f'max_{key}']
    scale = jnp.where(old == -jnp.inf, 0.0, jnp.exp(old - new_max))
    c[f'sum_{key}'] = c[f'sum_{key}'] * scale + e.sum(axis=1)
    if values is not None:
      c[f'dot_{key}'] = (c[f'dot_{key}'] * scale
                         + jnp.sum(jnp.where(valid, e * values, 0.0), axis=1))
    c[f'max_{key}'] = new_max

  def body(j, c):
    v0 = j * bv
    cols = v0 + jax.lax.broadcasted_iota(jnp.int32, (bt, bv), 1)
    valid = cols < vocab
    z_raw = _logits_block(h_ref, w_ref, rows, v0, hidden, blocks)
    z = jnp.where(valid, z_raw, -jnp.inf)
    exponent = _power_times(a[:, None], z_raw)
    c = dict(c)
    if has_prior:
      zp_raw = _logits_block(hp_ref, wp_ref, rows, v0, prior_hidden, blocks)
      exponent = exponent + _power_times(b[:, None], zp_raw)
      online(c, 'p', jnp.where(valid, zp_raw, -jnp.inf), valid, zp_raw)
    online(c, 's', z, valid)
    online(c, 'w', jnp.where(valid, exponent, -jnp.inf), valid, z_raw)
    c['label_logit'] = c['label_logit'] + jnp.sum(
        jnp.where(cols == labels[:, None], z_raw, 0.0), axis=1)
    block_best = z.max(axis=1)
    block_index = jnp.min(jnp.where(z == block_best[:, None], cols, padded_vocab), axis=1)
    better = block_best > c['best']
    c['best_index'] = jnp.where(better, block_index, c['best_index'])
    c['best'] = jnp.where(better, block_best, c['best'])
    return c

  init = {'max_s': minus_inf, 'sum_s': zero, 'max_p': minus_inf, 'sum_p': zero, 'dot_p': zero,
          'max_w': minus_inf, 'sum_w': zero, 'dot_w': zero, 'label_logit': zero,
          'best': minus_inf, 'best_index': jnp.zeros((bt,), jnp.int32)}
  final = jax.lax.fori_loop(0, padded_vocab // bv, body, init)
  for name, ref in zip(_STATS, out_refs):
    ref[rows] = final[name]


def _grad_kernel(h_ref, w_ref, hp_ref, wp_ref, labels_ref, a_ref, b_ref, coef_ref, lse_s_ref,
                 lse_w_ref, grad_h_init, grad_w_init, grad_h_ref, grad_w_ref, *, vocab, hidden,
                 prior_hidden, blocks, has_prior):
  del grad_h_init, grad_w_init  # aliased to the outputs: the zero-initialized accumulators
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  bt, bv, bk = blocks['tokens'], blocks['vocab'], blocks['hidden']
  rows = pl.ds(pl.program_id(0) * bt, bt)
  v0 = pl.program_id(1) * bv
  cols = v0 + jax.lax.broadcasted_iota(jnp.int32, (bt, bv), 1)
  valid = cols < vocab
  labels, a, b = labels_ref[rows], a_ref[rows], b_ref[rows]
  weight, trust = coef_ref[0, rows], coef_ref[1, rows]
  z = _logits_block(h_ref, w_ref, rows, v0, hidden, blocks)
  exponent = _power_times(a[:, None], z)
  if has_prior:
    exponent = exponent + _power_times(
        b[:, None], _logits_block(hp_ref, wp_ref, rows, v0, prior_hidden, blocks))
  probs = jnp.exp(z - lse_s_ref[rows][:, None])
  residual = jnp.exp(exponent - lse_w_ref[rows][:, None])
  target = (jnp.where(cols == labels[:, None], trust[:, None], 0.0)
            + (1.0 - trust[:, None]) * residual)
  grad = jnp.where(valid & (weight[:, None] != 0), weight[:, None] * (probs - target), 0.0)
  grad = grad.astype(w_ref.dtype)

  def body(k, carry):
    depth = pl.ds(k * bk, bk)
    w = w_ref[depth, pl.ds(v0, bv)]
    pltriton.atomic_add(grad_h_ref, (rows, depth),
                        _dot(grad, w.T))
    x = h_ref[rows, depth]
    pltriton.atomic_add(grad_w_ref, (depth, pl.ds(v0, bv)),
                        _dot(x.T, grad))
    return carry

  jax.lax.fori_loop(0, hidden // bk, body, 0)


def _pad_to(x, axis, multiple):
  pad = (-x.shape[axis]) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def forward(method_name, hidden_NxH, head_HxV, labels_N, weights_N, prior_hidden_NxP,
            prior_head_PxV, hyper_N, *, blocks=None, interpret=False):
  """Total weighted loss, :class:`qtarget.fused.FusedAux` and the gradients of hidden and head.

  Same contract as :func:`qtarget.fused._forward` (inputs already checked and detached).
  """
  blocks = {**DEFAULT_BLOCKS, **(blocks or {})}
  method = targets_lib.METHODS[method_name]
  has_prior = method.needs_prior
  n, vocab = labels_N.shape[0], head_HxV.shape[1]
  bt, bv, bk = blocks['tokens'], blocks['vocab'], blocks['hidden']
  model_power, prior_power = method.residual_powers(**hyper_N)
  a = jnp.broadcast_to(jnp.asarray(model_power, jnp.float32), (n,))
  b = jnp.broadcast_to(jnp.asarray(prior_power, jnp.float32), (n,))

  h = _pad_to(_pad_to(hidden_NxH, 0, bt), 1, bk)
  w = _pad_to(_pad_to(head_HxV, 0, bk), 1, bv)
  if has_prior:
    hp = _pad_to(_pad_to(prior_hidden_NxP, 0, bt), 1, bk)
    wp = _pad_to(_pad_to(prior_head_PxV, 0, bk), 1, bv)
  else:  # never read; small placeholders keep one kernel signature
    hp, wp = jnp.zeros((h.shape[0], bk), h.dtype), jnp.zeros((bk, w.shape[1]), w.dtype)
  labels = _pad_to(labels_N.astype(jnp.int32), 0, bt)
  a_p, b_p = _pad_to(a, 0, bt), _pad_to(b, 0, bt)
  n_pad, padded_vocab = h.shape[0], w.shape[1]
  static = dict(vocab=vocab, hidden=h.shape[1], prior_hidden=hp.shape[1], blocks=blocks,
                has_prior=has_prior)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  vector = lambda dtype=jnp.float32: jax.ShapeDtypeStruct((n_pad,), dtype)
  stats = pl.pallas_call(
      functools.partial(_stats_kernel, padded_vocab=padded_vocab, **static),
      grid=(n_pad // bt,), in_specs=[any_spec] * 7, out_specs=[any_spec] * len(_STATS),
      out_shape=[vector(jnp.int32 if name == 'best_index' else jnp.float32)
                 for name in _STATS],
      interpret=interpret, name='q_loss_stats')(h, w, hp, wp, labels, a_p, b_p)
  s = {name: value[:n] for name, value in zip(_STATS, stats)}

  lse_s = s['max_s'] + jnp.log(s['sum_s'])
  lse_w = s['max_w'] + jnp.log(s['sum_w'])
  label_log_prob = s['label_logit'] - lse_s
  in_range = (labels_N >= 0) & (labels_N < vocab)
  label_log_prob = jnp.where(in_range, label_log_prob, jnp.nan)
  trust = method.checked_trust(label_log_prob, None, **hyper_N).astype(jnp.float32)
  # Both are >= 0 exactly; differences of two float32 numbers near the largest logit can round
  # a hair below.
  residual_ce = jnp.maximum(lse_s - s['dot_w'] / s['sum_w'], 0.0)
  label_nll = jnp.where(in_range, jnp.maximum(-label_log_prob, 0.0), jnp.nan)
  loss = (jnp.where(trust == 0, 0.0, trust * label_nll)
          + jnp.where(trust == 1, 0.0, (1 - trust) * residual_ce))
  weights = weights_N.astype(jnp.float32)
  loss = jnp.where(weights == 0, 0.0, loss)
  if has_prior:  # -sum pi log pi = lse(zp) - sum pi zp
    prior_entropy = s['max_p'] + jnp.log(s['sum_p']) - s['dot_p'] / s['sum_p']
  else:
    prior_entropy = jnp.zeros((n,), jnp.float32)

  coef = jnp.stack([_pad_to(weights, 0, bt), _pad_to(jnp.where(weights == 0, 0.0, trust), 0, bt)])
  grad_h, grad_w = pl.pallas_call(
      functools.partial(_grad_kernel, **static),
      grid=(n_pad // bt, padded_vocab // bv), in_specs=[any_spec] * 12,
      out_specs=[any_spec] * 2,
      out_shape=[jax.ShapeDtypeStruct(h.shape, jnp.float32),
                 jax.ShapeDtypeStruct(w.shape, jnp.float32)],
      input_output_aliases={10: 0, 11: 1}, interpret=interpret, name='q_loss_grad')(
          h, w, hp, wp, labels, a_p, b_p, coef, _pad_to(lse_s, 0, bt), _pad_to(lse_w, 0, bt),
          jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
  grads = (grad_h[:n, :hidden_NxH.shape[1]].astype(hidden_NxH.dtype),
           grad_w[:head_HxV.shape[0], :vocab].astype(head_HxV.dtype))
  aux = fused.FusedAux(loss, trust, label_log_prob, s['best_index'], prior_entropy)
  return jnp.sum(loss * weights), aux, grads


fused.register_implementation('pallas', functools.partial(forward, interpret=False))
fused.register_implementation('pallas_interpret', functools.partial(forward, interpret=True))
