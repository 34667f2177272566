"""A Llama-family decoder in flax.nnx: Llama 2/3 (with RoPE scaling), Qwen2/2.5, SmolLM2.

RMSNorm, grouped-query attention, SwiGLU, rotary position embeddings; causal attention that
respects padding and packed segments (no attention across segments); a KV cache for batched
incremental decoding with left or right padding; LoRA adapters that a call can switch off, so
the frozen prior can be the same weights without the adapters.

The forward (`Llama.hidden`) returns the final hidden states; the head is a separate call
(`Llama.logits`, `Llama.head_weights_HxV`) so a loss can fuse it with the softmax. Layers are
stacked (every block variable has a leading ``layers`` axis) and run as one scanned block or an
unrolled loop (``scan_layers``). Every parameter carries logical axis names (``layers``,
``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``lora``) as ``logical_axes`` metadata, for
sharding rules kept as data; activations are constrained to logical names
(``activation_batch``, ...) that take effect only inside a step's layout
(:mod:`qtarget.models.layout`). Attention is chosen by ``attention``
(:mod:`qtarget.models.attention`).
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget.models import attention as attention_lib
from qtarget.models import layout

Array = jax.Array
# remat name -> jax.checkpoint policy (None: no jax.checkpoint at all).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_name(remat: bool | str) -> str:
  """A remat setting as a policy name (True/False mean 'full'/'none'); an unknown one raises."""
  if isinstance(remat, bool):
    remat = 'full' if remat else 'none'
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {tuple(REMAT_POLICIES)} (or True/False), got '
                     f'{remat!r}.')
  return remat


LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
# Logical names of activation axes (see qtarget.models.layout).
BTH = ('activation_batch', 'activation_length', 'activation_embed')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3's frequency-dependent RoPE scaling (``rope_type: llama3``)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of a decoder. Field names follow Hugging Face where they exist."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # biases on q, k, v (Qwen2)
  max_position_embeddings: int = 4096
  architecture: str = 'llama'  # 'llama' or 'qwen2': the Hugging Face class on export
  param_dtype: str = 'float32'  # master weights
  compute_dtype: str = 'float32'  # activations and matmuls (bfloat16 on accelerators)
  lora_rank: int = 0  # 0: no adapters
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  # Recompute in the backward pass: 'none' (keep every activation), 'full' (keep each layer's
  # input only) or 'save_dots' (keep matmul outputs, recompute the rest). True/False mean
  # 'full'/'none'.
  remat: bool | str = 'none'
  scan_layers: bool = True  # one compiled block scanned over stacked layers (False: a loop)
  attention: str = 'auto'  # qtarget.models.attention.IMPLEMENTATIONS

  def __post_init__(self):
    object.__setattr__(self, 'remat', remat_name(self.remat))
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f'attention must be one of {attention_lib.IMPLEMENTATIONS}, got '
                       f'{self.attention!r}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}.')
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f'unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}.')
    if self.architecture not in ('llama', 'qwen2'):
      raise ValueError(f"architecture must be 'llama' or 'qwen2', got {self.architecture!r}.")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def num_parameters(self) -> int:
    """Base parameters (no LoRA), counting tied embeddings once."""
    h, d = self.hidden_size, self.dim_per_head
    attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.attention_bias:
      attn += d * (self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * h * self.intermediate_size + 2 * h
    head = 0 if self.tie_word_embeddings else h * self.vocab_size
    return self.vocab_size * h + self.num_layers * layer + h + head


class LoRAParam(nnx.Param):
  """A LoRA adapter weight: trainable when the base weights are frozen."""


class KVCache(NamedTuple):
  """Keys and values of every layer for batched incremental decoding.

  Attributes:
    keys: ``[L, B, S, K, D]``, stacked over layers.
    values: ``[L, B, S, K, D]``.
    valid_BxS: whether a slot holds a real (non-padding) token.
    end_B: the next slot each row writes to.
  """
  keys: Array
  values: Array
  valid_BxS: Array
  end_B: Array


def _normal(key, shape, dtype, stddev=0.02):
  return (stddev * jax.random.normal(key, shape)).astype(dtype)


class Dense(nnx.Module):
  """``x @ kernel (+ bias)`` with an optional LoRA adapter ``x @ A @ B * alpha / rank``."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *,
               config: LlamaConfig, use_bias: bool, lora: bool, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.param_dtype)
    self.compute_dtype = jnp.dtype(config.compute_dtype)
    self.kernel = nnx.Param(_normal(rngs.params(), (in_features, out_features), dtype),
                            logical_axes=axes)
    self.bias = (nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],))
                 if use_bias else None)
    if lora and config.lora_rank > 0:
      rank = config.lora_rank
      self.lora_a = LoRAParam(_normal(rngs.params(), (in_features, rank), dtype,
                                      stddev=1.0 / math.sqrt(in_features)),
                              logical_axes=(axes[0], 'lora'))
      self.lora_b = LoRAParam(jnp.zeros((rank, out_features), dtype), logical_axes=('lora', axes[1]))
      self.lora_scale = config.lora_alpha / rank
    else:
      self.lora_a = self.lora_b = None

  def __call__(self, x: Array, lora: bool = True) -> Array:
    cast = lambda p: p[...].astype(self.compute_dtype)
    y = x @ cast(self.kernel)
    if self.bias is not None:
      y = y + cast(self.bias)
    if lora and self.lora_a is not None:
      y = y + (x @ cast(self.lora_a)) @ cast(self.lora_b) * self.lora_scale
    return y


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``, normalized in float32."""

  def __init__(self, dim: int, *, config: LlamaConfig):
    self.eps = config.rms_norm_eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(config.param_dtype)), logical_axes=('embed',))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """RoPE's inverse frequencies, with Llama 3's scaling when configured (float64, static)."""
  dim = config.dim_per_head
  inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  old_context = scaling.original_max_position_embeddings
  wavelength = 2 * math.pi / inv_freq
  low_freq_wavelength = old_context / scaling.low_freq_factor
  high_freq_wavelength = old_context / scaling.high_freq_factor
  smooth = ((old_context / wavelength - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor,
                  np.where(wavelength < high_freq_wavelength, inv_freq, interpolated))


def apply_rope(x_BxTxNxD: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
  """Rotates halves ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` (the HF layout)."""
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.cos(angles_BxTxF)[:, :, None, :]
  sin = jnp.sin(angles_BxTxF)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxD.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxNxD.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with rotary embeddings and an optional KV cache."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    h, d = config.hidden_size, config.dim_per_head
    self.config = config
    self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
    targets = config.lora_targets
    dense = lambda n_in, n_out, axes, bias, name: Dense(
        n_in, n_out, axes, config=config, use_bias=bias, lora=name in targets, rngs=rngs)
    self.q = dense(h, self.num_heads * d, ('embed', 'heads'), config.attention_bias, 'q')
    self.k = dense(h, self.num_kv_heads * d, ('embed', 'kv'), config.attention_bias, 'k')
    self.v = dense(h, self.num_kv_heads * d, ('embed', 'kv'), config.attention_bias, 'v')
    self.o = dense(self.num_heads * d, h, ('heads', 'embed'), False, 'o')

  def __call__(self, x_BxTxH, positions_BxT, mask_BxTxS, kv=None, lora=True):
    """Without ``kv``: causal attention within packed segments (``mask_BxTxS`` is their
    :func:`causal_segment_mask`, or for splash attention their ``attention.Segments``) by
    ``config.attention``. ``kv``: ``(keys, values, write_slots_BxT, layer)``, every layer's
    cache (``[L, B, S, K, D]``), of which this layer's is updated and attended to under
    ``mask_BxTxS`` (a cache mask is not a segment mask); the whole cache is returned, so that a
    scan over layers carries it and writes only the new tokens."""
    b, t, _ = x_BxTxH.shape
    heads = ('activation_batch', 'activation_length', 'activation_heads', None)
    kv_heads = ('activation_batch', 'activation_length', 'activation_kv', None)
    q = layout.constrain(self.q(x_BxTxH, lora).reshape(b, t, self.num_heads, self.head_dim),
                         heads)
    k = layout.constrain(self.k(x_BxTxH, lora).reshape(b, t, self.num_kv_heads, self.head_dim),
                         kv_heads)
    v = layout.constrain(self.v(x_BxTxH, lora).reshape(b, t, self.num_kv_heads, self.head_dim),
                         kv_heads)
    inv_freq = rope_inverse_frequencies(self.config)
    q = apply_rope(q, positions_BxT, inv_freq)
    k = apply_rope(k, positions_BxT, inv_freq)
    new_kv = None
    if kv is not None:
      cache_k, cache_v, slots_BxT, layer = kv
      rows = jnp.arange(b)[:, None]
      cache_k = cache_k.at[layer, rows, slots_BxT].set(k.astype(cache_k.dtype))
      cache_v = cache_v.at[layer, rows, slots_BxT].set(v.astype(cache_v.dtype))
      k, v = cache_k[layer].astype(q.dtype), cache_v[layer].astype(q.dtype)
      new_kv = (cache_k, cache_v)
    if kv is not None:
      out = attention_lib.cache_attention(q, k, v, mask_BxTxS)
    else:
      out = attention_lib.attention(q, k, v, mask_BxTxS, self.config.attention)
    out = layout.constrain(out.reshape(b, t, -1),
                           ('activation_batch', 'activation_length', 'activation_heads'))
    return layout.constrain(self.o(out, lora), BTH), new_kv


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    h, f = config.hidden_size, config.intermediate_size
    dense = lambda n_in, n_out, axes, name: Dense(
        n_in, n_out, axes, config=config, use_bias=False, lora=name in config.lora_targets,
        rngs=rngs)
    self.gate = dense(h, f, ('embed', 'mlp'), 'gate')
    self.up = dense(h, f, ('embed', 'mlp'), 'up')
    self.down = dense(f, h, ('mlp', 'embed'), 'down')

  def __call__(self, x, lora=True):
    columns = ('activation_batch', 'activation_length', 'activation_mlp')
    gated = layout.constrain(jax.nn.silu(self.gate(x, lora)) * self.up(x, lora), columns)
    return layout.constrain(self.down(gated, lora), BTH)


class Block(nnx.Module):
  """Pre-norm decoder layer."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, config=config)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config=config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, mask, kv=None, lora=True):
    attended, new_kv = self.attn(self.attn_norm(x), positions, mask, kv, lora)
    x = layout.constrain(x + attended, BTH)
    return layout.constrain(x + self.mlp(self.mlp_norm(x), lora), BTH), new_kv


causal_segment_mask = attention_lib.causal_segment_mask


@jax.custom_vjp
def head_matmul(hidden_xH: Array, weights_HxV: Array) -> Array:
  """``hidden @ weights`` in float32 from compute-dtype operands.

  Autodiff would run both backward matmuls with the float32 logits' cotangent, upcasting the
  bfloat16 operand: float32 matmuls at the size of the whole head. Here the cotangent is
  rounded to the compute dtype first (as the forward's inputs are) and accumulated in float32,
  so all three head matmuls run at the compute dtype's speed. In float32 this is autodiff's
  gradient exactly. (A custom VJP: reverse mode only; jax.jvp/jacfwd through it raise.)
  """
  return jnp.einsum('...h,hv->...v', hidden_xH, weights_HxV, preferred_element_type=jnp.float32)


def _head_matmul_forward(hidden_xH, weights_HxV):
  return head_matmul(hidden_xH, weights_HxV), (hidden_xH, weights_HxV)


def _head_matmul_backward(residuals, cotangent_xV):
  hidden_xH, weights_HxV = residuals
  cotangent_xV = cotangent_xV.astype(hidden_xH.dtype)
  d_hidden = jnp.einsum('...v,hv->...h', cotangent_xV, weights_HxV,
                        preferred_element_type=jnp.float32).astype(hidden_xH.dtype)
  batch = ''.join(chr(ord('a') + i) for i in range(hidden_xH.ndim - 1))
  d_weights = jnp.einsum(f'{batch}h,{batch}v->hv', hidden_xH, cotangent_xV,
                         preferred_element_type=jnp.float32).astype(weights_HxV.dtype)
  return d_hidden, d_weights


head_matmul.defvjp(_head_matmul_forward, _head_matmul_backward)


def _stacked_blocks(config: LlamaConfig, rngs: nnx.Rngs) -> 'Block':
  """One Block whose every variable has a leading layer axis (logical name ``layers``)."""
  blocks = [Block(config, rngs=rngs) for _ in range(config.num_layers)]
  graphdef, first = nnx.split(blocks[0])
  states = [first] + [nnx.split(block)[1] for block in blocks[1:]]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  for _, variable in nnx.to_flat_state(stacked):
    variable.set_metadata('logical_axes',
                          ('layers',) + tuple(variable.get_metadata()['logical_axes']))
  return nnx.merge(graphdef, stacked)


class Llama(nnx.Module):
  """The decoder. ``hidden`` for training, ``decode`` with a KV cache, ``logits`` for the head."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.param_dtype)
    self.embed = nnx.Param(_normal(rngs.params(), (config.vocab_size, config.hidden_size), dtype),
                           logical_axes=('vocab', 'embed'))
    self.layers = _stacked_blocks(config, rngs)  # [num_layers, ...] in every variable
    self.final_norm = RMSNorm(config.hidden_size, config=config)
    self.lm_head = (None if config.tie_word_embeddings else nnx.Param(
        _normal(rngs.params(), (config.hidden_size, config.vocab_size), dtype),
        logical_axes=('embed', 'vocab')))

  def _embed(self, tokens_BxT):
    # The table gathered whole (over fsdp) before the lookup, as every weight is when used;
    # else XLA gathers the batch's token ids to the table's shards instead.
    table = layout.constrain(self.embed[...], ('vocab', None))
    x = jnp.take(table, tokens_BxT, axis=0).astype(self.config.compute_dtype)
    return layout.constrain(x, BTH)

  def _layers(self, x, positions_BxT, mask_BxTxT, lora, remat):
    """The stacked blocks, scanned (one compiled block) or unrolled, each under the remat
    policy. jax.checkpoint of a pure function of the block's values rather than nnx.remat: a
    layer mutates nothing, and nnx.remat writes every variable back after the call, which fails
    for values from an outer trace (a LoRA student's frozen base weights, a frozen prior)."""
    graphdef, stacked = nnx.split(self.layers)

    def layer(x, values):
      block = nnx.merge(graphdef, values)
      return block(x, positions_BxT, mask_BxTxT, None, lora)[0]

    policy = REMAT_POLICIES[remat]
    if policy is not None:
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.config.scan_layers)
    if self.config.scan_layers:
      return jax.lax.scan(lambda x, values: (layer(x, values), None), x, stacked)[0]
    for i in range(self.config.num_layers):
      x = layer(x, jax.tree.map(lambda a, i=i: a[i], stacked))
    return x

  def hidden(self, tokens_BxT: Array, *, positions_BxT: Array | None = None,
             segment_ids_BxT: Array | None = None, lora: bool = True,
             remat: bool | str | None = None) -> Array:
    """Final hidden states ``[B, T, H]`` (after the last norm), in the compute dtype.

    Args:
      tokens_BxT: token ids.
      positions_BxT: RoPE positions; default ``0..T-1`` per row. Packed sequences restart them
        at each segment; left-padded rows start them at the first real token.
      segment_ids_BxT: 1, 2, ... for packed segments, 0 for padding; default all 1.
      lora: False runs the base weights alone (the frozen prior of a LoRA student).
      remat: a remat policy name (or True/False for 'full'/'none'); None takes
        ``config.remat``. A frozen prior passes False: no gradient flows through it, so there is
        nothing to recompute.
    """
    b, t = tokens_BxT.shape
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    remat = self.config.remat if remat is None else remat_name(remat)
    c = self.config
    if attention_lib.uses_segments(c.attention, c.compute_dtype, c.dim_per_head, t):
      mask = attention_lib.Segments(segment_ids_BxT)  # splash: no [B, T, T] mask at all
    else:
      mask = layout.constrain(causal_segment_mask(segment_ids_BxT),
                              ('activation_batch', None, None))
    x = self._layers(self._embed(tokens_BxT), positions_BxT, mask, lora, remat)
    return layout.constrain(self.final_norm(x), BTH)

  def head_weights_HxV(self) -> Array:
    """The output projection ``[H, V]`` (the transposed embedding when tied), compute dtype."""
    weights = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return weights.astype(self.config.compute_dtype)

  def logits(self, hidden_BxTxH: Array) -> Array:
    """``hidden @ head``, accumulated and returned in float32 (gradients: see head_matmul)."""
    logits = head_matmul(hidden_BxTxH, self.head_weights_HxV())
    if logits.ndim != 3:
      return logits
    return layout.constrain(logits, ('activation_batch', 'activation_length', 'activation_vocab'))

  def __call__(self, tokens_BxT, **kwargs) -> Array:
    """Logits ``[B, T, V]`` in float32; keyword arguments as in :meth:`hidden`."""
    return self.logits(self.hidden(tokens_BxT, **kwargs))

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache of ``max_length`` slots per row."""
    c = self.config
    shape = (batch_size, max_length, c.num_kv_heads, c.dim_per_head)
    dtype = dtype or c.compute_dtype
    return KVCache(keys=jnp.zeros((c.num_layers,) + shape, dtype),
                   values=jnp.zeros((c.num_layers,) + shape, dtype),
                   valid_BxS=jnp.zeros((batch_size, max_length), bool),
                   end_B=jnp.zeros((batch_size,), jnp.int32))

  def decode(self, tokens_BxT: Array, cache: KVCache, *, positions_BxT: Array,
             valid_BxT: Array | None = None, lora: bool = True) -> tuple[Array, KVCache]:
    """Runs new tokens against a cache: a prompt (T > 1) or one generated token per row.

    Row b writes its tokens to slots ``end_B[b] + 0..T-1``; a token attends to the real tokens in
    slots up to its own. Afterwards ``end_B[b]`` moves past the row's last real new token, so a
    right-padded prompt's padding is overwritten by the next token and a left-padded one is kept
    (and ignored, being marked invalid).

    Args:
      tokens_BxT: new token ids.
      cache: from :meth:`init_cache` or a previous call.
      positions_BxT: RoPE positions of the new tokens.
      valid_BxT: False for padding among the new tokens; default all True.
      lora: as in :meth:`hidden`.

    Returns:
      Hidden states ``[B, T, H]`` of the new tokens and the updated cache.
    """
    b, t = tokens_BxT.shape
    if valid_BxT is None:
      valid_BxT = jnp.ones((b, t), bool)
    slots_BxT = cache.end_B[:, None] + jnp.arange(t)
    rows = jnp.arange(b)[:, None]
    valid_BxS = cache.valid_BxS.at[rows, slots_BxT].set(valid_BxT)
    s = valid_BxS.shape[1]
    mask = valid_BxS[:, None, :] & (jnp.arange(s)[None, None, :] <= slots_BxT[:, :, None])
    mask |= jnp.arange(s)[None, None, :] == slots_BxT[:, :, None]  # never an empty row
    graphdef, stacked = nnx.split(self.layers)

    # The cache is carried (not scanned over): a step then writes only its new tokens' slots
    # instead of copying every layer's cache into a new stacked output.
    def layer(carry, inputs):
      x, keys, values = carry
      params, index = inputs
      x, (keys, values) = nnx.merge(graphdef, params)(
          x, positions_BxT, mask, (keys, values, slots_BxT, index), lora)
      return (x, keys, values), None

    (x, keys, values), _ = jax.lax.scan(
        layer, (self._embed(tokens_BxT), cache.keys, cache.values),
        (stacked, jnp.arange(self.config.num_layers)))
    last_real = jnp.max(jnp.where(valid_BxT, jnp.arange(1, t + 1), 0), axis=1)
    new_cache = KVCache(keys, values, valid_BxS, cache.end_B + last_real)
    return self.final_norm(x), new_cache
