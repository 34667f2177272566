"""Attention implementations against the reference, and scanned layers against the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget.models import attention
from qtarget.models import llama
from tests import test_models

# Row 0 packs three segments, row 1 is left-padded, row 2 right-padded, row 3 one segment.
SEGMENTS = np.array([[1] * 5 + [2] * 7 + [3] * 4,
                     [0] * 6 + [1] * 10,
                     [1] * 9 + [2] * 3 + [0] * 4,
                     [1] * 16], np.int32)


def _positions(segments):
  """RoPE positions restarting at each segment, as the packer writes them."""
  positions = np.zeros_like(segments)
  for r, row in enumerate(segments):
    for t in range(1, len(row)):
      positions[r, t] = 0 if row[t] != row[t - 1] else positions[r, t - 1] + 1
  return positions


def _qkv(heads=6, kv_heads=2, dim=16):
  keys = jax.random.split(jax.random.key(0), 4)
  b, t = SEGMENTS.shape
  q = jax.random.normal(keys[0], (b, t, heads, dim))
  k = jax.random.normal(keys[1], (b, t, kv_heads, dim))
  v = jax.random.normal(keys[2], (b, t, kv_heads, dim))
  cotangent = jax.random.normal(keys[3], (b, t, heads, dim)) * (SEGMENTS > 0)[..., None, None]
  return q, k, v, cotangent


@pytest.mark.parametrize('implementation', ['xla', 'auto'])
def test_attention_equals_the_reference(implementation):
  q, k, v, cotangent = _qkv()
  mask = attention.causal_segment_mask(jnp.asarray(SEGMENTS))

  def run(name):
    out, pullback = jax.vjp(lambda q, k, v: attention.attention(q, k, v, mask, name), q, k, v)
    return (out,) + pullback(cotangent)  # the cotangent is zero on padding queries

  real = SEGMENTS > 0
  want = run('reference')
  got = run(implementation)
  for label, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    g, w = np.asarray(g), np.asarray(w)
    if label == 'out':  # a padding query's output is unspecified
      g, w = g[real], w[real]
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=label)
  # The reference really masks: a key in another segment changes nothing, one in the same
  # segment does.
  moved = k.at[0, 3].add(10.0)  # segment 1 of row 0
  out = attention.attention(q, moved, v, mask, implementation)
  np.testing.assert_allclose(out[0, 5:], want[0][0, 5:], atol=1e-5)  # segments 2 and 3
  assert not np.allclose(out[0, 3:5], want[0][0, 3:5], atol=1e-3)


# Splash attention works on blocks of 128: the same four kinds of row, 128 long.
SEGMENTS_128 = np.array([[1] * 40 + [2] * 56 + [3] * 32,
                         [0] * 48 + [1] * 80,
                         [1] * 72 + [2] * 24 + [0] * 32,
                         [1] * 128], np.int32)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_single_query_attention_equals_the_reference(dtype):
  """A decoding step's attention (one query per row against its cache) equals the reference
  under a cache mask with padding and unwritten slots."""
  keys = jax.random.split(jax.random.key(1), 3)
  b, s, heads, kv_heads, dim = 3, 11, 6, 2, 16
  q = jax.random.normal(keys[0], (b, 1, heads, dim)).astype(dtype)
  k = jax.random.normal(keys[1], (b, s, kv_heads, dim)).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, kv_heads, dim)).astype(dtype)
  mask = np.zeros((b, 1, s), bool)
  mask[0, 0, :] = True  # a full cache
  mask[1, 0, 4:9] = True  # left padding, then unwritten slots
  mask[2, 0, 3] = True  # a single real slot
  got = attention.single_query_attention(q, k, v, jnp.asarray(mask))
  want = attention.masked_attention(q, k, v, jnp.asarray(mask))
  assert got.dtype == dtype and got.shape == want.shape
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  else:  # the weights are rounded as the reference rounds them: almost every value is equal
    assert np.mean(got == want) >= 0.99, np.mean(got == want)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


def test_splash_attention_equals_the_reference():
  """Pallas splash attention (interpreted on the CPU): values and gradients, packed segments,
  left and right padding, grouped-query heads."""
  keys = jax.random.split(jax.random.key(1), 4)
  b, t = SEGMENTS_128.shape
  q = jax.random.normal(keys[0], (b, t, 4, 16))
  k, v = (jax.random.normal(key, (b, t, 2, 16)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape) * (SEGMENTS_128 > 0)[..., None, None]
  segments = jnp.asarray(SEGMENTS_128)

  def run(name, mask):
    out, pullback = jax.vjp(lambda q, k, v: attention.attention(q, k, v, mask, name), q, k, v)
    return (out,) + pullback(cotangent)

  want = run('reference', attention.causal_segment_mask(segments))
  got = run('splash_interpret', attention.Segments(segments))
  real = SEGMENTS_128 > 0
  for label, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    g, w = np.asarray(g), np.asarray(w)
    if label == 'out':
      g, w = g[real], w[real]
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=label)
  with pytest.raises(ValueError, match='takes Segments'):
    attention.attention(q, k, v, attention.causal_segment_mask(segments), 'splash_interpret')


@pytest.mark.parametrize('kv_heads', [2, 1])  # 1: fewer KV heads than the tensor axis
def test_splash_attention_runs_per_device_on_a_mesh(kv_heads):
  """Under a step's layout the kernel runs inside shard_map on each device's rows and heads:
  the compiled program moves no activation between devices, and the values are the same."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from qtarget import hlo  # pylint: disable=g-import-not-at-top
  from qtarget.models import layout  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2), ('fsdp', 'tensor'), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as build_mesh makes it
  rules = dict(layout.DEFAULT_ACTIVATION_RULES)
  keys = jax.random.split(jax.random.key(2), 3)
  b, t = SEGMENTS_128.shape
  q = jax.random.normal(keys[0], (b, t, 4, 16))
  k, v = (jax.random.normal(key, (b, t, kv_heads, 16)) for key in keys[1:])
  segments = jnp.asarray(SEGMENTS_128)
  heads = NamedSharding(mesh, PartitionSpec('fsdp', None, 'tensor', None))
  kv_sharding = heads if kv_heads % 2 == 0 else NamedSharding(mesh, PartitionSpec('fsdp'))
  rows = NamedSharding(mesh, PartitionSpec('fsdp', None))

  def sharded(q, k, v, segments):
    with layout.activation_layout(mesh, rules):
      return attention.attention(q, k, v, attention.Segments(segments), 'splash_interpret')

  step = jax.jit(sharded, in_shardings=(heads, kv_sharding, kv_sharding, rows),
                 out_shardings=heads)
  compiled = step.lower(q, k, v, segments).compile()
  assert not hlo.collective_summary(compiled.as_text()), hlo.collective_summary(
      compiled.as_text())
  out = step(jax.device_put(q, heads), jax.device_put(k, kv_sharding),
             jax.device_put(v, kv_sharding), jax.device_put(segments, rows))
  want = attention.attention(q, k, v, attention.causal_segment_mask(segments), 'reference')
  real = SEGMENTS_128 > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=1e-5)


def test_a_model_with_splash_attention_equals_the_reference_model():
  """The scanned decoder with splash attention (no [B, T, T] mask built) against the reference:
  logits on real tokens and every parameter's gradient."""
  splash = test_models._model(attention='splash_interpret')
  reference = test_models._model(attention='reference')
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, SEGMENTS_128.shape), jnp.int32)
  kwargs = dict(segment_ids_BxT=jnp.asarray(SEGMENTS_128),
                positions_BxT=jnp.asarray(_positions(SEGMENTS_128)))
  real = SEGMENTS_128 > 0

  def loss(model):
    logits = model(tokens, **kwargs)
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) * real) / real.sum(), logits

  (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(splash)
  (want_value, want_logits), want_grads = nnx.value_and_grad(loss, has_aux=True)(reference)
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(want_logits)[real],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_splash_needs_its_block_length_and_a_tpu():
  with pytest.raises(ValueError, match='multiple of 128, got 100'):
    attention.resolve('splash_interpret', jnp.float32, 16, 100)
  with pytest.raises(ValueError, match="'splash' is a TPU kernel"):
    attention.resolve('splash', jnp.bfloat16, 128, 256)


def test_unknown_attention_is_refused():
  with pytest.raises(ValueError, match="attention must be one of"):
    llama.LlamaConfig(**{**test_models.TINY.__dict__, 'attention': 'flash'})
  with pytest.raises(ValueError, match='unknown attention implementation'):
    attention.attention(*_qkv()[:3], attention.causal_segment_mask(jnp.asarray(SEGMENTS)),
                        'flash')


def _pair(**overrides):
  """The same weights as a scanned and as a looped model."""
  scanned = test_models._model(scan_layers=True, **overrides)
  looped = test_models._model(scan_layers=False, **overrides)
  nnx.update(looped, nnx.state(scanned))
  return scanned, looped


def _loss_and_grads(model, lora=True):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, SEGMENTS.shape), jnp.int32)
  kwargs = dict(segment_ids_BxT=jnp.asarray(SEGMENTS),
                positions_BxT=jnp.asarray(_positions(SEGMENTS)), lora=lora)

  def loss(model):
    logits = model(tokens, **kwargs)
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) * (SEGMENTS > 0)) / SEGMENTS.size

  return nnx.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize('case', [
    'plain', 'lora', 'lora_off_prior',
    'remat_full',  # the unrolled loop's remat (prevent_cse); save_dots is slow

    pytest.param('remat_save_dots', marks=pytest.mark.slow)])
def test_scanned_layers_equal_the_loop(case):
  overrides = {'lora': dict(lora_rank=4), 'lora_off_prior': dict(lora_rank=4),
               'remat_full': dict(remat='full'),
               'remat_save_dots': dict(remat='save_dots')}.get(case, {})
  scanned, looped = _pair(**overrides)
  if 'lora' in case:  # adapters that do something
    for _, variable in nnx.iter_graph(scanned):
      if isinstance(variable, llama.LoRAParam):
        variable.set_value(jnp.full_like(variable.get_value(), 0.05))
    nnx.update(looped, nnx.state(scanned))
  lora = case != 'lora_off_prior'
  loss_scan, grads_scan = _loss_and_grads(scanned, lora)
  loss_loop, grads_loop = _loss_and_grads(looped, lora)
  np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-5)
  leaves_scan, leaves_loop = jax.tree.leaves(grads_scan), jax.tree.leaves(grads_loop)
  assert len(leaves_scan) == len(leaves_loop) > 0
  for g1, g2 in zip(leaves_scan, leaves_loop):
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-5)
  if case == 'lora_off_prior':  # the adapters get no gradient when switched off
    adapters = nnx.state(grads_scan, llama.LoRAParam)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(adapters))
  if case == 'lora':
    adapters = nnx.state(grads_scan, llama.LoRAParam)
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(adapters))


def test_remat_policies_match_no_remat():
  reference = _loss_and_grads(test_models._model(remat='none'))
  for policy in ('full', 'save_dots', True):
    loss, grads = _loss_and_grads(test_models._model(remat=policy))
    np.testing.assert_allclose(loss, reference[0], rtol=1e-6)
    for g1, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
      np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='remat must be one of'):
    test_models._model(remat='some')


def test_scan_compiles_one_block():
  """The scanned model's program holds one copy of the block (a while loop), the loop's L."""
  def count_dots(scan_layers):
    model = test_models._model(scan_layers=scan_layers, num_layers=4)
    tokens = jnp.zeros((1, 8), jnp.int32)
    text = nnx.jit(lambda m: m.hidden(tokens)).lower(model).as_text()
    return text.count('dot_general'), 'while' in text
  scanned_dots, scanned_loop = count_dots(True)
  looped_dots, looped_loop = count_dots(False)
  assert scanned_loop and not looped_loop
  assert looped_dots == 4 * scanned_dots


@pytest.mark.parametrize('frozen_weights, expected', [('compute_dtype', jnp.bfloat16),
                                                      ('param_dtype', jnp.float32)])
def test_frozen_weights_dtype_is_what_the_config_says(frozen_weights, expected):
  from qtarget import train  # pylint: disable=g-import-not-at-top
  from tests import test_train_step  # pylint: disable=g-import-not-at-top
  config = test_train_step.tiny_config(frozen_weights=frozen_weights)
  arch = {**config.model.architecture, 'compute_dtype': 'bfloat16'}
  # A LoRA student (frozen base) with a separate prior (frozen whole).
  student = llama.Llama(llama.LlamaConfig(**{**arch, 'lora_rank': 2}), rngs=nnx.Rngs(0))
  prior = llama.Llama(llama.LlamaConfig(**arch), rngs=nnx.Rngs(1))
  config.model.lora_rank = 2
  state = train.create_state(config, student, prior)
  frozen = jax.tree.leaves(state.frozen) + jax.tree.leaves(state.prior)
  assert frozen and all(x.dtype == expected for x in frozen)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # trained: float32
  _, metrics = jax.jit(train.train_step)(state, jax.tree.map(
      jnp.asarray, test_train_step.make_batch(rows=config.batch_size)))
  assert np.isfinite(float(metrics['loss']))


def test_unknown_frozen_weights_is_refused():
  from qtarget import train  # pylint: disable=g-import-not-at-top
  from tests import test_train_step  # pylint: disable=g-import-not-at-top
  config = test_train_step.tiny_config(frozen_weights='float16')
  with pytest.raises(train.ConfigError, match="frozen_weights must be one of"):
    train.create_state(config, *test_train_step._models(config))


def test_head_matmul_gradients():
  """float32: autodiff's gradient exactly; bfloat16: within bfloat16 rounding of it, and the
  backward matmuls take bfloat16 operands (no float32 matmul the size of the head)."""
  keys = jax.random.split(jax.random.key(1), 3)
  hidden = jax.random.normal(keys[0], (2, 5, 32))
  weights = jax.random.normal(keys[1], (32, 40)) * 0.2
  cotangent = jax.random.normal(keys[2], (2, 5, 40))
  plain = lambda h, w: jnp.einsum('bth,hv->btv', h, w, preferred_element_type=jnp.float32)
  want = jax.vjp(plain, hidden, weights)[1](cotangent)
  got = jax.vjp(llama.head_matmul, hidden, weights)[1](cotangent)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  h16, w16 = hidden.astype(jnp.bfloat16), weights.astype(jnp.bfloat16)
  got16 = jax.vjp(llama.head_matmul, h16, w16)[1](cotangent)
  for g, w in zip(got16, want):
    assert g.dtype == jnp.bfloat16
    # Inputs and cotangent each rounded to bfloat16 (relative 2^-8), sums in float32.
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=3 * 2**-8 * np.abs(w).max())
  def operand_types(matmul):
    text = jax.jit(jax.grad(lambda h, w: jnp.sum(matmul(h, w) ** 2), argnums=(0, 1))).lower(
        h16, w16).as_text()
    signatures = [line.split(':')[-1].split('->')[0] for line in text.splitlines()
                  if 'dot_general' in line]
    return [('f32' if 'xf32>' in s else '') + ('bf16' if 'xbf16>' in s else '')
            for s in signatures]
  assert operand_types(llama.head_matmul) == ['bf16'] * 3
  assert 'f32' in operand_types(plain)  # what autodiff alone does: float32 backward matmuls


def test_auto_attention_resolves_by_backend_dtype_and_head_size(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert attention.resolve('auto', jnp.bfloat16, 128) == 'cudnn'
  assert attention.resolve('auto', jnp.float32, 128) == 'xla'  # cuDNN flash: 16-bit only
  assert attention.resolve('auto', jnp.bfloat16, 256) == 'xla'
  assert attention.resolve('reference', jnp.bfloat16, 128) == 'reference'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert attention.resolve('auto', jnp.bfloat16, 128, 2048) == 'splash'
  assert attention.resolve('auto', jnp.bfloat16, 128, 100) == 'xla'  # splash: blocks of 128
  assert attention.resolve('splash', jnp.bfloat16, 128, 2048) == 'splash'


def test_loaded_models_get_lora_adapters_at_the_init_scale(tmp_path):
  """A = N(0, 1/in_features) per layer of the stacked variable, B = 0 (as a fresh model's)."""
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  config = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=3,
                             num_heads=4, num_kv_heads=2)
  checkpoints.export_hf(llama.Llama(config, rngs=nnx.Rngs(0)), tmp_path)
  model = checkpoints.load_hf(tmp_path, lora_rank=8)
  for module, name, fan_in in (('attn', 'q', 64), ('mlp', 'down', 96)):
    dense = getattr(getattr(model.layers, module), name)
    a, b = np.asarray(dense.lora_a[...]), np.asarray(dense.lora_b[...])
    assert a.shape == (3, fan_in, 8) and not b.any()
    np.testing.assert_allclose(a.std(), 1 / np.sqrt(fan_in), rtol=0.15)


@pytest.mark.slow  # a trainer-level repeat of test_fused's bound
def test_fused_head_gradient_accumulation_from_the_config():
  """The trainer passes loss_head_grad_accumulation to the fused loss: with a bfloat16 model
  the one-step update differs from the float32 accumulator's by bfloat16 rounding only."""
  from qtarget import train  # pylint: disable=g-import-not-at-top
  from tests import test_train_step  # pylint: disable=g-import-not-at-top
  batch = jax.tree.map(jnp.asarray, test_train_step.make_batch(rows=8))
  updates = {}
  for accumulation in ('float32', 'head_dtype'):
    config = test_train_step.tiny_config(loss='fused', loss_chunk_size=16,
                                         loss_head_grad_accumulation=accumulation)
    config.model.compute_dtype = 'bfloat16'
    state = train.create_state(config, *test_train_step._models(config))
    assert state.spec.head_grad_accumulation == accumulation
    new_state, metrics = jax.jit(train.train_step)(state, batch)
    updates[accumulation] = (float(metrics['loss']), float(metrics['grad_norm']))
  assert updates['float32'][0] == updates['head_dtype'][0]  # the forward pass is the same
  assert updates['float32'][1] != updates['head_dtype'][1]  # the head gradient is not
  np.testing.assert_allclose(updates['head_dtype'][1], updates['float32'][1], rtol=2e-2)
  config = test_train_step.tiny_config(loss_head_grad_accumulation='bfloat16')
  with pytest.raises(train.ConfigError, match="loss_head_grad_accumulation must be"):
    train.create_state(config, *test_train_step._models(config))
