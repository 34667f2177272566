"""The decoder alone (no torch): caching, padding, packing, LoRA, remat, sharding metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget.models import llama

TINY = llama.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                         num_heads=6, num_kv_heads=2, rope_theta=500.0)


def _model(**overrides):
  fields = {**TINY.__dict__, **overrides}
  model = llama.Llama(llama.LlamaConfig(**fields), rngs=nnx.Rngs(0))
  # Larger weights than the 0.02 init, so differences are not hidden by tiny activations.
  for path, variable in nnx.iter_graph(model):
    stacked = 'layers' in path  # a leading layer axis
    if isinstance(variable, nnx.Param) and variable.get_value().ndim - stacked == 2:
      variable.set_value(variable.get_value() * 5)
  return model


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


@nnx.jit
def _decode(model, tokens, cache, positions, valid=None):
  hidden, cache = model.decode(tokens, cache, positions_BxT=positions, valid_BxT=valid)
  return model.logits(hidden), cache


def _tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, TINY.vocab_size)


def test_kv_cache_decoding_matches_full_forward():
  model = _model()
  tokens = _tokens((3, 9))
  full = _forward(model, tokens)
  cache = model.init_cache(3, 12)
  prompt = 4
  logits, cache = _decode(model, tokens[:, :prompt], cache,
                          jnp.broadcast_to(jnp.arange(prompt), (3, prompt)))
  np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-4, rtol=1e-4)
  for step in range(prompt, 9):
    logits, cache = _decode(model, tokens[:, step:step + 1], cache, jnp.full((3, 1), step))
    np.testing.assert_allclose(logits[:, 0], full[:, step], atol=1e-4, rtol=1e-4,
                               err_msg=f'step {step}')


def _single_row_logits(model, row_tokens):
  return _forward(model, jnp.asarray(row_tokens)[None])[0]


@pytest.mark.parametrize('side', ['left', 'right'])
def test_batched_decoding_with_padding(side):
  """Prompts of different lengths, padded left or right, then generated token by token."""
  model = _model()
  rows = [list(_tokens((5,), 1)), list(_tokens((3,), 2)), list(_tokens((1,), 3))]
  continuation = _tokens((3, 4), 4)
  width = 5
  pad = lambda r: ([0] * (width - len(r)) + r) if side == 'left' else (r + [0] * (width - len(r)))
  tokens = jnp.asarray([pad(r) for r in rows])
  valid = jnp.asarray([pad([1] * len(r)) for r in rows]) == 1
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  cache = model.init_cache(3, width + 4)
  _, cache = _decode(model, tokens, cache, positions, valid)
  lengths = jnp.asarray([len(r) for r in rows])
  for step in range(4):
    logits, cache = _decode(model, continuation[:, step:step + 1], cache,
                            (lengths + step)[:, None])
    for b, row in enumerate(rows):
      expected = _single_row_logits(model, row + list(continuation[b, :step + 1]))[-1]
      np.testing.assert_allclose(logits[b, 0], expected, atol=1e-4, rtol=1e-4,
                                 err_msg=f'{side} padding, row {b}, step {step}')


def test_right_padding_does_not_change_real_positions():
  model = _model()
  tokens = _tokens((2, 7))
  segments = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])
  logits = model(tokens, segment_ids_BxT=segments)
  np.testing.assert_allclose(logits[1, :4], _single_row_logits(model, tokens[1, :4]), atol=1e-5)
  assert np.all(np.isfinite(logits))


def test_packed_segments_do_not_attend_across():
  model = _model()
  a, b = list(_tokens((4,), 5)), list(_tokens((3,), 6))
  packed = jnp.asarray([a + b + [0]])
  segments = jnp.asarray([[1] * 4 + [2] * 3 + [0]])
  positions = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0]])
  logits = model(packed, segment_ids_BxT=segments, positions_BxT=positions)[0]
  np.testing.assert_allclose(logits[:4], _single_row_logits(model, a), atol=1e-5)
  np.testing.assert_allclose(logits[4:7], _single_row_logits(model, b), atol=1e-5)


def test_lora_at_zero_and_switched_off_equal_the_base_model():
  base = _model()
  adapted = _model(lora_rank=4)
  # Same base weights: copy them over; B = 0 at init, so the adapter adds exactly zero.
  nnx.update(adapted, nnx.state(base, nnx.Param))
  tokens = _tokens((2, 6))
  np.testing.assert_array_equal(adapted(tokens), base(tokens))
  for _, variable in nnx.iter_graph(adapted):
    if isinstance(variable, llama.LoRAParam):
      variable.set_value(jnp.ones_like(variable.get_value()) * 0.1)
  assert not np.allclose(adapted(tokens), base(tokens), atol=1e-3)
  np.testing.assert_array_equal(adapted(tokens, lora=False), base(tokens))

  @nnx.jit
  def student_and_prior(model, tokens):  # one compiled function, both forwards
    return model(tokens), model(tokens, lora=False)

  student, prior = student_and_prior(adapted, tokens)
  np.testing.assert_allclose(prior, base(tokens), atol=1e-6)
  assert not np.allclose(student, prior, atol=1e-3)


def test_remat_gives_the_same_values_and_gradients():
  plain, remat = _model(), _model(remat=True)
  tokens = _tokens((2, 5))

  def loss(model):
    return jnp.mean(jax.nn.logsumexp(model(tokens), axis=-1))

  np.testing.assert_allclose(loss(remat), loss(plain), rtol=1e-6)
  grads_plain = nnx.jit(nnx.grad(loss))(plain)
  grads_remat = nnx.jit(nnx.grad(loss))(remat)
  for g1, g2 in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_with_float32_params():
  """bfloat16 compute against float32, bounded by bfloat16's precision.

  A bfloat16 rounding is off by at most u = 2^-8 relative. A logit z_v = sum_i h_i W_iv carries
  the error of h and W (two roundings) and of every rounding of the residual stream before it
  (the embedding, two adds per layer, the final norm): S = 2 L + 4 stages, each moving z_v by
  at most about u * sum_i |h_i W_iv| (its condition). So |z16 - z32| <= S u (|h| @ |W|)
  elementwise, to first order. The error must also reach a tenth of one stage somewhere: a
  bfloat16 config that silently computed in float32 would sit near 1e-6 of it.
  """
  model32 = _model()
  model16 = _model(compute_dtype='bfloat16')
  tokens = _tokens((2, 6))
  hidden = model16.hidden(tokens)
  assert hidden.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  logits16, logits32 = model16(tokens), model32(tokens)
  assert logits16.dtype == jnp.float32  # accumulated in float32 whatever the compute dtype
  condition = (np.abs(np.asarray(model32.hidden(tokens)))
               @ np.abs(np.asarray(model32.head_weights_HxV())))
  unit_roundoff, stages = 2.0 ** -8, 2 * TINY.num_layers + 4
  ratio = np.abs(np.asarray(logits16) - np.asarray(logits32)) / (unit_roundoff * condition)
  assert ratio.max() <= stages, ratio.max()
  assert ratio.max() >= 0.1, f'bfloat16 compute left almost no rounding error: {ratio.max()}'


def test_every_parameter_has_logical_axes():
  model = _model(lora_rank=2, attention_bias=True)
  known = {'layers', 'embed', 'mlp', 'heads', 'kv', 'vocab', 'lora'}
  count = 0
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param):
      axes = variable.get_metadata().get('logical_axes')
      assert axes is not None and len(axes) == variable.get_value().ndim, path
      assert set(axes) <= known, (path, axes)
      count += 1
  assert count > 20


def test_head_is_separate_and_tied():
  model = _model(tie_word_embeddings=True)
  tokens = _tokens((1, 4))
  np.testing.assert_allclose(model.head_weights_HxV(), model.embed[...].T)
  np.testing.assert_allclose(model(tokens), model.hidden(tokens) @ model.embed[...].T, atol=1e-5)


def test_parameter_count():
  model = _model(attention_bias=True)
  count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == model.config.num_parameters()


def test_llama3_rope_scaling_changes_only_low_frequencies():
  scaled = llama.LlamaConfig(**{**TINY.__dict__, 'rope_scaling': llama.RopeScaling(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)})
  base, adjusted = llama.rope_inverse_frequencies(TINY), llama.rope_inverse_frequencies(scaled)
  wavelength = 2 * np.pi / base
  np.testing.assert_allclose(adjusted[wavelength < 16], base[wavelength < 16])
  np.testing.assert_allclose(adjusted[wavelength > 64], base[wavelength > 64] / 8)


def test_config_errors():
  with pytest.raises(ValueError, match='not a multiple'):
    llama.LlamaConfig(**{**TINY.__dict__, 'num_kv_heads': 4})
  with pytest.raises(ValueError, match='unknown LoRA targets'):
    llama.LlamaConfig(**{**TINY.__dict__, 'lora_targets': ('qq',)})
