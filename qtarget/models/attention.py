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
- ``'splash'``: Pallas splash attention (TPU): causal with segment ids, no mask array at all
  (:class:`Segments` replaces it); grouped-query heads run as a multi-query kernel per KV head;
  inside a step's layout it runs per device under ``shard_map`` (batch over the data axes, KV
  heads over ``tensor`` when they divide). Sequence lengths must be multiples of 128.
  ``'splash_interpret'`` runs the same kernel in Pallas' interpreter on any backend (slow; for
  tests on CPU).
- ``'auto'``: ``'cudnn'`` on a GPU when the dtype and head size allow it, ``'splash'`` on a TPU
  when the length is a multiple of 128, else ``'xla'``.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import PartitionSpec

from qtarget.models import layout

IMPLEMENTATIONS = ('auto', 'reference', 'xla', 'cudnn', 'splash', 'splash_interpret')
_SPLASH_BLOCK = 512  # largest query/key block; halved until it divides the length (>= 128)


class Segments(NamedTuple):
  """What splash attention takes instead of a mask: the segment ids ``[B, T]``."""
  ids_BxT: Array


def causal_segment_mask(segment_ids_BxT: Array) -> Array:
  """``[B, T, T]``: query i sees key j <= i of the same non-padding segment (0 = padding).

  A padding query sees only itself, so no row is empty (its output is ignored).
  """
  t = segment_ids_BxT.shape[1]
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  real_key = segment_ids_BxT[:, None, :] > 0
  return (causal & same & real_key) | jnp.eye(t, dtype=bool)


def _platform() -> str:
  """The platform the program is for: the active mesh's devices (an ahead-of-time TPU
  compile runs on a CPU host), else the default backend."""
  mesh = layout.active_mesh()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def resolve(implementation: str, dtype, head_dim: int, length: int | None = None) -> str:
  """The concrete implementation for ``'auto'``; a clear error for an unknown name or a
  length splash attention cannot take."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention implementation {implementation!r}; choose from '
                     f'{IMPLEMENTATIONS}.')
  if implementation.startswith('splash') and length is not None and length % 128:
    raise ValueError(f'attention {implementation!r} needs a sequence length that is a multiple '
                     f'of 128, got {length}; pad the rows (data.seq_len) or choose another.')
  backend = _platform()
  if implementation == 'splash' and backend != 'tpu':
    raise ValueError(f"attention 'splash' is a TPU kernel (this program is for {backend!r}); "
                     "'splash_interpret' runs it interpreted.")
  if implementation != 'auto':
    return implementation
  cudnn_ok = (backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim <= 128 and head_dim % 8 == 0)
  if cudnn_ok:
    return 'cudnn'
  if backend == 'tpu' and length is not None and length % 128 == 0:
    return 'splash'
  return 'xla'


def uses_segments(implementation: str, dtype, head_dim: int, length: int) -> bool:
  """Whether the implementation takes :class:`Segments` rather than a mask."""
  return resolve(implementation, dtype, head_dim, length).startswith('splash')


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, group: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as masks)
  block = _SPLASH_BLOCK
  while length % block:
    block //= 2
  sizes = {name: block for name in ('block_q', 'block_kv', 'block_kv_compute', 'block_q_dkv',
                                    'block_kv_dkv', 'block_kv_dkv_compute', 'block_q_dq',
                                    'block_kv_dq')}
  mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * group)
  with jax.ensure_compile_time_eval():  # concrete block tables: the cached kernel holds no tracer
    return splash.make_splash_mqa_single_device(
        mask=mask, block_sizes=splash.BlockSizes(**sizes), interpret=interpret)


def _splash_local(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, interpret):
  """Splash attention on one device's rows: a multi-query kernel per KV head and row."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash)
  b, t, n, d = q_BxTxNxD.shape
  kv_heads = k_BxTxKxD.shape[2]
  group = n // kv_heads
  kernel = _splash_kernel(t, group, interpret)
  q = (q_BxTxNxD / math.sqrt(d)).astype(q_BxTxNxD.dtype)  # splash does not scale the scores
  q = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
  k, v = k_BxTxKxD.transpose(0, 2, 1, 3), v_BxTxKxD.transpose(0, 2, 1, 3)  # [B, K, T, D]

  def one(q_GxTxD, k_TxD, v_TxD, segment_ids_T):
    ids = splash.SegmentIds(q=segment_ids_T, kv=segment_ids_T)
    return kernel(q_GxTxD, k_TxD, v_TxD, segment_ids=ids)

  out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(q, k, v, segment_ids_BxT)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def splash_attention(q_BxTxNxD: Array, k_BxTxKxD: Array, v_BxTxKxD: Array,
                     segment_ids_BxT: Array, interpret: bool = False) -> Array:
  """Splash attention, per device under ``shard_map`` inside a step's layout (a Pallas call
  is not partitioned by the compiler: unwrapped, every device would run the whole batch)."""
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = layout.active_mesh()
  if mesh is None:
    return local(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)
  rules = layout.active_rules()
  batch = layout.fit_spec(segment_ids_BxT.shape, layout.logical_to_spec(
      ('activation_batch', None), rules), mesh)[0]
  heads_spec = lambda x: layout.fit_spec(x.shape, layout.logical_to_spec(
      (None, None, 'activation_kv', None), rules), mesh)[2]
  heads = heads_spec(k_BxTxKxD)
  if heads is None and heads_spec(q_BxTxNxD) is not None:
    # The KV heads do not divide the tensor axis but the query heads do: give every query head
    # its own copy of its KV head (multi-head layout), rather than every device running all.
    group = q_BxTxNxD.shape[2] // k_BxTxKxD.shape[2]
    k_BxTxKxD, v_BxTxKxD = (jnp.repeat(x, group, axis=2) for x in (k_BxTxKxD, v_BxTxKxD))
    heads = heads_spec(q_BxTxNxD)
  qkv = PartitionSpec(batch, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(batch, None)),
                       out_specs=qkv, check_vma=False)(
                           q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)


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


def single_query_attention(q_Bx1xNxD: Array, k_BxSxKxD: Array, v_BxSxKxD: Array,
                           mask_Bx1xS: Array) -> Array:
  """:func:`masked_attention` for one new token per row (a KV-cache decoding step), as
  products and sums instead of dot products: batched dots of one query group against a row's
  cache are tiny matrix products, about 3.5x slower on a CPU (the same values up to rounding).
  :func:`cache_attention` uses it on CPU only: its speed on accelerators is not measured."""
  b, _, n, d = q_Bx1xNxD.shape
  kv_heads = k_BxSxKxD.shape[2]
  q = q_Bx1xNxD.reshape(b, 1, kv_heads, n // kv_heads, d).astype(jnp.float32)
  scores_BxSxKxG = jnp.sum(q * k_BxSxKxD.astype(jnp.float32)[:, :, :, None], axis=-1)
  scores_BxSxKxG = scores_BxSxKxG / math.sqrt(d)
  scores_BxSxKxG = jnp.where(mask_Bx1xS[:, 0, :, None, None], scores_BxSxKxG,
                             jnp.finfo(jnp.float32).min)
  # Rounded to the values' dtype as the reference's weights are (reduce_precision: XLA may drop
  # a cast down and back up), then summed in float32.
  weights = jax.nn.softmax(scores_BxSxKxG, axis=1)
  if v_BxSxKxD.dtype != jnp.float32:
    info = jnp.finfo(v_BxSxKxD.dtype)
    weights = jax.lax.reduce_precision(weights, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  out_BxKxGxD = jnp.sum(weights[..., None] * v_BxSxKxD.astype(jnp.float32)[:, :, :, None], axis=1)
  return out_BxKxGxD.reshape(b, 1, n, d).astype(v_BxSxKxD.dtype)


def cache_attention(q_BxTxNxD: Array, k_BxSxKxD: Array, v_BxSxKxD: Array,
                    mask_BxTxS: Array) -> Array:
  """Attention of new tokens to a KV cache under its mask: :func:`single_query_attention` for
  a decoding step on CPU, :func:`masked_attention` otherwise."""
  if q_BxTxNxD.shape[1] == 1 and _platform() == 'cpu':
    return single_query_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)
  return masked_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)


def attention(q_BxTxNxD: Array, k_BxTxKxD: Array, v_BxTxKxD: Array,
              mask_BxTxT: 'Array | Segments', implementation: str = 'auto') -> Array:
  """Causal grouped-query attention within packed segments, ``[B, T, N, D]``; ``mask_BxTxT``
  is :func:`causal_segment_mask` of the segment ids (built once per forward, not per layer),
  or for splash attention the :class:`Segments` themselves."""
  implementation = resolve(implementation, q_BxTxNxD.dtype, q_BxTxNxD.shape[-1],
                           q_BxTxNxD.shape[1])
  if implementation.startswith('splash'):
    if not isinstance(mask_BxTxT, Segments):
      raise ValueError('splash attention takes Segments (the segment ids), not a mask.')
    return splash_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT.ids_BxT,
                            interpret=implementation == 'splash_interpret')
  if isinstance(mask_BxTxT, Segments):
    mask_BxTxT = causal_segment_mask(mask_BxTxT.ids_BxT)
  mask = mask_BxTxT
  if implementation == 'reference':
    return masked_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, mask)
  # cuDNN also takes the causal flag, which lets it skip the tiles above the diagonal (1.3x
  # faster on an H100); the mask already implies it, so the values are the same.
  return jax.nn.dot_product_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, mask=mask[:, None],
                                      is_causal=implementation == 'cudnn',
                                      implementation=implementation)
