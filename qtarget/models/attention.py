"""Causal attention over packed segments, by one of several kernels chosen by name.

Every implementation computes the same function: query ``t`` of a row attends to keys ``s <= t``
of the same segment, segment ids ``1, 2, ...`` for packed examples and ``0`` for padding. A
padding query's output is unspecified (it is never read: padding keys are invisible to real
queries and padding positions carry no loss), so implementations may differ there.

- ``'reference'``: einsum scores in float32 over a materialised ``[B, T, S]`` mask. Slow and
  memory-hungry, kept as the definition the others are tested against.
- ``'xla'``: ``jax.nn.dot_product_attention(implementation='xla')`` with the same mask.
- ``'cudnn'``: cuDNN flash attention (GPU, bfloat16/float16) with the same mask, which cuDNN
  reads as a ``[B, 1, T, S]`` bias (built per layer: B T^2 elements); scores are never
  materialised (on an H100 at the Qwen2.5-1.5B shape 3.7x
  faster than the reference with 15x fewer temporaries, `benchmarks/RESULTS.md`). cuDNN's
  ragged layout (per-segment lengths and offsets, no mask at all) gave wrong values or
  allocated 190 GiB in jax 0.11.2, so it is not used.
- ``'auto'``: ``'cudnn'`` on a GPU when the dtype and head size allow it, else ``'xla'``.
"""

import math

import jax
import jax.numpy as jnp
from jax import Array

IMPLEMENTATIONS = ('auto', 'reference', 'xla', 'cudnn')


def causal_segment_mask(segment_ids_BxT: Array) -> Array:
  """``[B, T, T]``: query i sees key j <= i of the same non-padding segment (0 = padding).

  A padding query sees only itself, so no row is empty (its output is ignored).
  """
  t = segment_ids_BxT.shape[1]
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  real_key = segment_ids_BxT[:, None, :] > 0
  return (causal & same & real_key) | jnp.eye(t, dtype=bool)


def resolve(implementation: str, dtype, head_dim: int) -> str:
  """The concrete implementation for ``'auto'``; a clear error for an unknown name."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention implementation {implementation!r}; choose from '
                     f'{IMPLEMENTATIONS}.')
  if implementation != 'auto':
    return implementation
  cudnn_ok = (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim <= 128 and head_dim % 8 == 0)
  return 'cudnn' if cudnn_ok else 'xla'


def masked_attention(q_BxTxNxD: Array, k_BxSxKxD: Array, v_BxSxKxD: Array,
                     mask_BxTxS: Array) -> Array:
  """The reference: grouped-query attention under an explicit boolean mask (also used by
  KV-cache decoding, whose mask is not a segment mask)."""
  b, t, n, d = q_BxTxNxD.shape
  kv_heads = k_BxSxKxD.shape[2]
  q = q_BxTxNxD.reshape(b, t, kv_heads, n // kv_heads, d)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k_BxSxKxD,
                      preferred_element_type=jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxD.dtype)
  return jnp.einsum('bkgts,bskd->btkgd', weights, v_BxSxKxD).reshape(b, t, n, d)


def attention(q_BxTxNxD: Array, k_BxTxKxD: Array, v_BxTxKxD: Array, mask_BxTxT: Array,
              implementation: str = 'auto') -> Array:
  """Causal grouped-query attention within packed segments, ``[B, T, N, D]``; ``mask_BxTxT``
  is :func:`causal_segment_mask` of the segment ids (built once per forward, not per layer)."""
  implementation = resolve(implementation, q_BxTxNxD.dtype, q_BxTxNxD.shape[-1])
  mask = mask_BxTxT
  if implementation == 'reference':
    return masked_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, mask)
  # cuDNN also takes the causal flag, which lets it skip the tiles above the diagonal (1.3x
  # faster on an H100); the mask already implies it, so the values are the same.
  return jax.nn.dot_product_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, mask=mask[:, None],
                                      is_causal=implementation == 'cudnn',
                                      implementation=implementation)
