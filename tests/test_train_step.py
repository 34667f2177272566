"""The pure train step: sharding, accumulation, the frozen prior, traced hyperparameters."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qtarget import config_files
from qtarget import train
from qtarget.train import step as step_lib
from qtarget.models import llama

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / 'configs'
VOCAB, SEQ = 128, 16


def tiny_config(**overrides):
  config = config_files.load_module(CONFIGS / 'tiny.py').get_config()
  config.model.architecture.vocab_size = VOCAB
  config.batch_size = 8
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _models(config):
  arch = dict(config.model.architecture)
  student = llama.Llama(llama.LlamaConfig(**arch, **train.model_overrides(config.model)),
                        rngs=nnx.Rngs(0))
  prior = None
  if config.model.lora_rank == 0:
    prior = llama.Llama(llama.LlamaConfig(**arch), rngs=nnx.Rngs(1))
  return student, prior


def make_batch(seed=0, rows=8):
  """Uneven response lengths: the loss mask covers a different span in each row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (rows, SEQ)).astype(np.int32)
  targets = np.roll(tokens, -1, axis=1)
  starts = rng.integers(2, SEQ - 2, rows)
  ends = np.minimum(starts + rng.integers(1, 8, rows), SEQ)
  mask = (np.arange(SEQ) >= starts[:, None]) & (np.arange(SEQ) < ends[:, None])
  segments = np.ones((rows, SEQ), np.int32)
  segments[0, SEQ // 2:] = 2  # one packed row
  positions = np.tile(np.arange(SEQ, dtype=np.int32), (rows, 1))
  positions[0, SEQ // 2:] -= SEQ // 2
  return {'tokens': tokens, 'targets': targets, 'loss_mask': mask, 'segment_ids': segments,
          'positions': positions}


def _single_device_step(state, batch):
  return jax.jit(train.train_step)(state, jax.tree.map(jnp.asarray, batch))


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() >= 8, 'conftest sets 8 CPU devices'
  config = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 4})
  # SGD: the parameter change is the gradient itself (Adam's first step is lr * sign(g), which
  # a gradient near zero flips on rounding alone).
  state = _with_sgd(train.create_state(config, *_models(config)))
  batch = make_batch()
  expected_state, expected_metrics = _single_device_step(state, batch)

  mesh = train.build_mesh(config.mesh)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  step_fn, shardings = train.jit_train_step(jax.eval_shape(lambda: state), mesh,
                                            dict(config.sharding_rules))
  sharded_state = train.place(state, shardings)
  sharded_batch = {k: jax.device_put(v, train.batch_sharding(mesh)) for k, v in batch.items()}
  new_state, metrics = step_fn(sharded_state, sharded_batch)

  for name in ('loss', 'nll', 'grad_norm'):
    np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, err_msg=name)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected_state.params)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  # The parameters really are sharded over fsdp: an embed-axis kernel is split four ways.
  kernel = new_state.params['layers']['mlp']['gate']['kernel'][...]  # [layers, embed, mlp]
  assert kernel.sharding.spec[1] == 'fsdp'
  assert kernel.addressable_shards[0].data.shape == (
      kernel.shape[0], kernel.shape[1] // 4, kernel.shape[2])


def _with_sgd(state):
  """The same state with plain SGD (lr 1), so the update is minus the gradient itself."""
  tx = optax.sgd(1.0)
  return state.replace(spec=dataclasses.replace(state.spec, tx=tx),
                       opt_state=tx.init(state.params))


def test_accumulation_equals_the_whole_batch():
  batch = make_batch(seed=3)  # uneven response lengths across rows
  for optimizer in ('sgd', 'adamw'):
    results = []
    for accum in (1, 4):
      config = tiny_config(accum_steps=accum)
      state = train.create_state(config, *_models(config))
      if optimizer == 'sgd':
        state = _with_sgd(state)
      results.append(_single_device_step(state, batch))
    (whole, whole_metrics), (split, split_metrics) = results
    assert whole.spec.accum_steps == 1 and split.spec.accum_steps == 4
    for name in ('loss', 'nll', 'trust', 'grad_norm', 'response_tokens'):
      np.testing.assert_allclose(split_metrics[name], whole_metrics[name], rtol=1e-5,
                                 err_msg=name)
    # SGD: the gradients themselves agree. AdamW's first step is about lr * sign(g)
    # (lr = 3.3e-4 here), so float rounding of a gradient near zero can move its entry by a
    # fraction of a step (measured: 1e-6 on 1 of 4096 entries; 1.3e-5, 4% of a step, on 1 of
    # 8192 when compiled at -O0). A tenth of a step still fails an update applied twice or
    # skipped, and all but 0.1% of the entries must agree to 1e-6.
    lr = float(whole_metrics['learning_rate'])
    atol = 1e-7 if optimizer == 'sgd' else 0.1 * lr
    differences = []
    for got, want in zip(jax.tree.leaves(split.params), jax.tree.leaves(whole.params)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=optimizer)
      differences.append(np.abs(np.asarray(got) - np.asarray(want)).ravel())
    assert np.mean(np.concatenate(differences) > 1e-6) <= 1e-3, optimizer


def test_separate_prior_is_frozen():
  config = tiny_config()
  state = train.create_state(config, *_models(config))
  assert state.spec.prior == 'separate'
  prior_before = jax.tree.map(np.array, state.prior)
  for step in range(2):
    state, _ = _single_device_step(state, make_batch(seed=step))
  for got, want in zip(jax.tree.leaves(state.prior), jax.tree.leaves(prior_before)):
    np.testing.assert_array_equal(got, want)
  # Optimizer state exists for the trainable parameters only.
  param_count = len(jax.tree.leaves(state.params))
  adam_state = state.opt_state[1][0]
  assert len(jax.tree.leaves(adam_state.mu)) == param_count
  assert jax.tree.structure(adam_state.mu) == jax.tree.structure(state.params)


def test_lora_student_uses_itself_without_adapters_as_prior():
  config = tiny_config(**{'model.lora_rank': 4})
  student, _ = _models(config)
  state = train.create_state(config, student, None)
  assert state.spec.prior == 'lora_off'
  assert all(isinstance(v, llama.LoRAParam) for v in jax.tree.leaves(
      state.params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  frozen_before = jax.tree.map(np.array, state.frozen)
  new_state, metrics = _single_device_step(state, make_batch())
  for got, want in zip(jax.tree.leaves(new_state.frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(got, want)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.params),
                                                      jax.tree.leaves(state.params))]
  assert any(changed)
  # At step 0 the adapters are zero: the student is its own prior, so Target-SFT's residual
  # p^(1-eta) prior^eta is p, and the trust p_y is the same as DFT's.
  dft_state = train.create_state(tiny_config(**{'model.lora_rank': 4, 'method': 'dft',
                                                'hparams': {}}), student, None)
  _, dft_metrics = _single_device_step(dft_state, make_batch())
  np.testing.assert_allclose(metrics['loss'], dft_metrics['loss'], rtol=1e-5)


def test_prior_with_padding_rows_is_cut_to_the_student_vocabulary():
  # Qwen2.5's 1.5B and 7B share a tokenizer but pad their embeddings to different sizes.
  config = tiny_config()
  student, _ = _models(config)
  arch = dict(config.model.architecture)
  padded_prior = llama.Llama(llama.LlamaConfig(**{**arch, 'vocab_size': VOCAB + 8}),
                             rngs=nnx.Rngs(1))
  state = train.create_state(config, student, padded_prior)
  batch = jax.tree.map(jnp.asarray, make_batch())
  logits = step_lib._prior_logits(state, batch)
  assert logits.shape[-1] == VOCAB
  np.testing.assert_array_equal(logits, padded_prior(batch['tokens'],
                                                     segment_ids_BxT=batch['segment_ids'],
                                                     positions_BxT=batch['positions'])[..., :VOCAB])
  _, metrics = _single_device_step(state, make_batch())
  assert np.isfinite(metrics['loss'])
  padded = step_lib.match_vocabulary(jnp.zeros((2, VOCAB - 8)), VOCAB)
  assert padded.shape == (2, VOCAB) and np.all(np.isneginf(padded[:, -8:]))


def test_hyperparameter_sweep_does_not_recompile():
  config = tiny_config()
  state = train.create_state(config, *_models(config))
  step_fn = jax.jit(train.train_step)
  batch = jax.tree.map(jnp.asarray, make_batch())
  losses, cache_sizes = [], []
  for eta in (0.0, 0.5, 1.0):
    swept = state.replace(hyperparameters={'eta': jnp.asarray(eta, jnp.float32)})
    losses.append(float(step_fn(swept, batch)[1]['loss']))
    cache_sizes.append(step_fn._cache_size())  # the jit cache is shared with other tests
  assert cache_sizes[0] == cache_sizes[1] == cache_sizes[2]
  assert len(set(losses)) == 3


def test_metrics_are_consistent():
  config = tiny_config(method='sft', hparams={})
  state = train.create_state(config, *_models(config))
  _, metrics = _single_device_step(state, make_batch())
  # SFT: trust 1, the loss is the NLL, nothing goes to the residual.
  np.testing.assert_allclose(metrics['trust'], 1.0)
  np.testing.assert_allclose(metrics['loss'], metrics['nll'], rtol=1e-6)
  assert metrics['response_tokens'] == make_batch()['loss_mask'].sum()
  assert 0.0 <= metrics['accuracy'] <= 1.0 and metrics['grad_norm'] > 0


@pytest.mark.parametrize('overrides, message', [
    ({'method': 'sfft'}, "unknown method 'sfft'"),
    ({'hparams': {'lam': 0.1}}, r"takes hyperparameters \['eta'\]"),
    ({'hparams': {'eta': 1.5}}, 'eta=1.5 is outside'),
    ({'method': 'weighted', 'hparams': {}}, 'per-token weights'),
    ({'accum_steps': 3}, 'not divisible by accum_steps'),
])
def test_bad_config(overrides, message):
  config = tiny_config(**overrides)
  with pytest.raises((train.ConfigError, ValueError), match=message):
    train.create_state(config, *_models(config))


def test_mesh_errors():
  config = tiny_config(**{'mesh.data': 3, 'mesh.fsdp': 1})
  with pytest.raises(train.ConfigError, match=r'mesh \[3, 1, 1\] needs 3 devices'):
    train.build_mesh(config.mesh)


@pytest.mark.parametrize('lora_rank', [0, 4], ids=['separate_prior', 'lora_off_prior'])
def test_fused_loss_step_equals_dense_step(lora_rank):
  results = []
  for loss in ('dense', 'fused'):
    config = tiny_config(**{'loss': loss, 'loss_chunk_size': 24, 'model.lora_rank': lora_rank})
    student, prior = _models(config)
    state = train.create_state(config, student, prior)
    if lora_rank:  # non-zero adapters, so student and prior differ
      state = state.replace(params=jax.tree.map(lambda x: x + 0.01, state.params))
    results.append(_single_device_step(_with_sgd(state), make_batch(seed=7)))
  (dense, dense_metrics), (fast, fast_metrics) = results
  for name in ('loss', 'nll', 'trust', 'accuracy', 'prior_entropy', 'grad_norm'):
    np.testing.assert_allclose(fast_metrics[name], dense_metrics[name], rtol=1e-5, err_msg=name)
  for got, want in zip(jax.tree.leaves(fast.params), jax.tree.leaves(dense.params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # SGD: the gradients agree


@pytest.mark.parametrize('lora_rank, loss', [
    pytest.param(0, 'dense', id='separate_prior-dense'),
    pytest.param(4, 'fused', id='lora_off_prior-fused'),
    # the other two pairs repeat both parts: slow
    pytest.param(4, 'dense', id='lora_off_prior-dense', marks=pytest.mark.slow),
    pytest.param(0, 'fused', id='separate_prior-fused', marks=pytest.mark.slow)])
def test_remat_step_equals_plain_step(lora_rank, loss):
  # Rematerialization set on both models: the student recomputes its layers, the frozen prior
  # never does (no gradient flows through it; flax's remat also refuses to update a module built
  # outside the gradient's trace, which failed the Target-SFT step on a GPU before).
  results = []
  for remat in ('none', 'full'):
    config = tiny_config(**{'loss': loss, 'loss_chunk_size': 24, 'model.lora_rank': lora_rank,
                            'model.remat': remat})
    student, prior = _models(config)
    if prior is not None:
      prior = llama.Llama(dataclasses.replace(prior.config, remat=remat), rngs=nnx.Rngs(1))
    state = train.create_state(config, student, prior)
    if lora_rank:  # non-zero adapters, so student and prior differ
      state = state.replace(params=jax.tree.map(lambda x: x + 0.01, state.params))
    results.append(_single_device_step(_with_sgd(state), make_batch(seed=5)))
  (plain, plain_metrics), (remat, remat_metrics) = results
  assert remat.graphdef != plain.graphdef  # the remat flag really differs between the two
  for name in ('loss', 'nll', 'prior_entropy', 'grad_norm'):
    np.testing.assert_allclose(remat_metrics[name], plain_metrics[name], rtol=1e-5, err_msg=name)
  for got, want in zip(jax.tree.leaves(remat.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_method_with_a_prior_refuses_the_live_student_as_its_prior():
  # Before, create_state used the live student as the prior (Target-SFT silently became DFT).
  config = tiny_config()
  student, _ = _models(config)
  with pytest.raises(train.ConfigError, match=r"method 'target_sft' needs a prior and none was "
                                              r'given: pass prior_model'):
    train.create_state(config, student, None)
  # A method without a prior needs none.
  assert train.create_state(tiny_config(method='sft', hparams={}), student, None).spec.prior == 'none'


@pytest.mark.parametrize('loss', ['dense', 'fused'])
@pytest.mark.parametrize('method, hparams', [
    ('target_sft', {'eta': 0.5}),
    # Every prior method's loss equals the online one at k = V in test_cached_prior; here, in
    # the default run, Target-SFT's whole step does.
    pytest.param('sft_kl', {'lam': 0.3}, marks=pytest.mark.slow),
    pytest.param('distill', {}, marks=pytest.mark.slow)])
def test_cached_prior_with_k_equal_to_the_vocabulary_is_the_online_prior(loss, method, hparams):
  """prior.source='cached' with k = V: the step reads the prior's rows from the batch and gives
  the online prior's loss, metrics (the entropy aside: the cache logs its bucket entropy) and
  gradients (SGD: the update is the gradient)."""
  from qtarget import cached_prior  # pylint: disable=g-import-not-at-top
  batch = make_batch(seed=7)
  config = tiny_config(**{'loss': loss, 'loss_chunk_size': 24, 'method': method,
                          'hparams': hparams})
  student, prior = _models(config)
  online = _with_sgd(train.create_state(config, student, prior))
  hidden = prior.hidden(jnp.asarray(batch['tokens']), segment_ids_BxT=jnp.asarray(
      batch['segment_ids']), positions_BxT=jnp.asarray(batch['positions']))
  rows = cached_prior.from_logits(prior.logits(hidden), VOCAB)
  cached_config = tiny_config(**{'loss': loss, 'loss_chunk_size': 24, 'method': method,
                                 'hparams': hparams, 'prior.source': 'cached'})
  cached = _with_sgd(train.create_state(cached_config, _models(cached_config)[0]))
  assert cached.spec.prior == 'cached' and not jax.tree.leaves(cached.prior)
  with pytest.raises(KeyError):  # the step needs the rows: a batch without them fails loudly
    _single_device_step(cached, batch)
  results = [_single_device_step(online, batch),
             _single_device_step(cached, {**batch, **dict(zip(train.CACHED_PRIOR_KEYS, rows))})]
  (want, want_metrics), (got, got_metrics) = results
  for name in ('loss', 'nll', 'trust', 'accuracy', 'grad_norm'):
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-6, err_msg=name)
  for g, w in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('loss', ['dense', 'fused'])
def test_cached_prior_padding_rows_change_nothing(loss):
  """Outside the response the batch carries padding rows (what the pipeline puts where packing
  pads with zeros): the step is finite and equal to one with the prior's real rows there."""
  from qtarget import cached_prior  # pylint: disable=g-import-not-at-top
  from qtarget.data import prior_cache_files  # pylint: disable=g-import-not-at-top
  batch = make_batch(seed=9)
  config = tiny_config(**{'loss': loss, 'loss_chunk_size': 24, 'prior.source': 'cached',
                          'prior.cache.k': 8})
  _, prior = _models(tiny_config())
  hidden = prior.hidden(jnp.asarray(batch['tokens']), segment_ids_BxT=jnp.asarray(
      batch['segment_ids']), positions_BxT=jnp.asarray(batch['positions']))
  real = dict(zip(train.CACHED_PRIOR_KEYS, (np.asarray(x) for x in cached_prior.from_logits(
      prior.logits(hidden), 8))))
  mask = batch['loss_mask']
  zeros = {key: np.where(mask.reshape(mask.shape + (1,) * (value.ndim - 2)), value, 0)
           for key, value in real.items()}  # packing's zero padding outside the response
  padded = prior_cache_files.fill_unmasked({**batch, **zeros}, 8)
  state = _with_sgd(train.create_state(config, _models(config)[0]))
  (want, want_metrics), (got, got_metrics) = (
      _single_device_step(state, {**batch, **real}), _single_device_step(state, padded))
  assert np.isfinite(float(got_metrics['loss'])) and np.isfinite(float(got_metrics['grad_norm']))
  for name in ('loss', 'nll', 'trust', 'grad_norm', 'prior_entropy'):
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-6, err_msg=name)
  for g, w in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
