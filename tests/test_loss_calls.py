"""The one-call losses (qtarget.q_loss, q_loss_fused, token_mean) against the two-call form,
jax.grad, optax, bad input, checkify, and meshes of Explicit and Auto axes."""

import re

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import qtarget
from qtarget import cached_prior
from qtarget import fused
from qtarget import losses
from qtarget import targets

import cases

B, T, H, P_HIDDEN, V = 2, 8, 16, 12, 32
METHODS = [case for case in cases.CASES if case.name != 'weighted']


def _batch(seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 6)
  return dict(
      hidden=jax.random.normal(k[0], (B, T, H), dtype),
      head=(jax.random.normal(k[1], (H, V)) / 2).astype(dtype),
      prior_hidden=jax.random.normal(k[2], (B, T, P_HIDDEN), dtype),
      prior_head=(jax.random.normal(k[3], (P_HIDDEN, V)) / 2).astype(dtype),
      labels=jax.random.randint(k[4], (B, T), 0, V),
      mask=jax.random.bernoulli(k[5], 0.7, (B, T)))


def _two_call_mean(case, hidden, head, d, prior_logits=None):
  logits = hidden @ head
  prior = d['prior_hidden'] @ d['prior_head'] if prior_logits is None else prior_logits
  target = targets.get(case.name)(logits, d['labels'], prior_logits=prior,
                                  **case.hyperparameters)
  loss = losses.q_cross_entropy(logits, d['labels'], target, where=d['mask'])
  return loss.sum() / d['mask'].sum()


def test_the_readme_snippet_is_six_lines_and_equals_the_two_call_form():
  d = _batch()
  logits, prior_logits = d['hidden'] @ d['head'], d['prior_hidden'] @ d['prior_head']
  labels, mask = d['labels'], d['mask']
  snippet = '''\
import qtarget
loss = qtarget.q_loss(logits, labels, 'target_sft', where=mask, prior=prior_logits, eta=0.5)
'''
  assert len(snippet.splitlines()) <= 6
  namespace = dict(logits=logits, labels=labels, mask=mask, prior_logits=prior_logits)
  exec(snippet, namespace)  # pylint: disable=exec-used
  target = targets.target_sft(logits, labels, prior_logits=prior_logits, eta=0.5)
  np.testing.assert_allclose(namespace['loss'],
                             losses.q_cross_entropy(logits, labels, target, where=mask),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('case', METHODS, ids=lambda c: c.name)
def test_dense_and_fused_gradients_equal_the_two_call_form(case):
  d = _batch()
  prior = qtarget.FusedPrior(d['prior_hidden'], d['prior_head'])
  hp = case.hyperparameters

  def dense(hidden, head):
    loss = qtarget.q_loss(hidden @ head, d['labels'], case.name, where=d['mask'],
                          prior=d['prior_hidden'] @ d['prior_head'], **hp)
    return qtarget.token_mean(loss, d['mask'])

  def fused_form(hidden, head):
    loss = qtarget.q_loss_fused(hidden, head, d['labels'], case.name, where=d['mask'],
                                prior=prior, chunk_size=5, **hp)
    return qtarget.token_mean(loss, d['mask'])

  reference = jax.value_and_grad(lambda h, w: _two_call_mean(case, h, w, d), (0, 1))
  value, grads = jax.jit(reference)(d['hidden'], d['head'])
  for form in (dense, fused_form):
    got_value, got_grads = jax.jit(jax.value_and_grad(form, (0, 1)))(d['hidden'], d['head'])
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    for got, want in zip(got_grads, grads):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('form', ['dense', 'fused'])
def test_cached_prior_gradients_equal_the_two_call_form(form):
  d = _batch(1)
  cache = cached_prior.from_logits(d['prior_hidden'] @ d['prior_head'], k=6)
  case = cases.Case('target_sft', {'eta': 0.7}, True, True, None)

  def one_call(hidden, head):
    if form == 'dense':
      loss = qtarget.q_loss(hidden @ head, d['labels'], 'target_sft', where=d['mask'],
                            prior=cache, eta=0.7)
    else:
      loss = qtarget.q_loss_fused(hidden, head, d['labels'], 'target_sft', where=d['mask'],
                                  prior=cache, eta=0.7, chunk_size=3)
    return qtarget.token_mean(loss, d['mask'])

  want = jax.grad(lambda h, w: _two_call_mean(case, h, w, d, prior_logits=cache), (0, 1))(
      d['hidden'], d['head'])
  got = jax.grad(one_call, (0, 1))(d['hidden'], d['head'])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_per_token_cotangents_reach_each_token():
  """Any reduction, not only the mean: a weighted sum's gradient equals jax.grad's."""
  d = _batch(2)
  weights = jax.random.uniform(jax.random.key(9), (B, T), minval=-1.0, maxval=2.0)
  prior = qtarget.FusedPrior(d['prior_hidden'], d['prior_head'])

  def weighted(form):
    def loss(hidden, head):
      if form == 'dense':
        per_token = qtarget.q_loss(hidden @ head, d['labels'], 'target_sft', where=d['mask'],
                                   prior=d['prior_hidden'] @ d['prior_head'], eta=0.4)
      else:
        per_token = qtarget.q_loss_fused(hidden, head, d['labels'], 'target_sft',
                                         where=d['mask'], prior=prior, eta=0.4, chunk_size=4)
      return jnp.sum(per_token * weights)
    return jax.grad(loss, (0, 1))(d['hidden'], d['head'])

  for got, want in zip(weighted('fused'), weighted('dense')):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_metrics_agree_across_forms_and_are_zero_where_masked():
  d = _batch(3)
  loss_d, dense_metrics = qtarget.q_loss(
      d['hidden'] @ d['head'], d['labels'], 'target_sft', where=d['mask'],
      prior=d['prior_hidden'] @ d['prior_head'], eta=0.5, return_metrics=True)
  loss_f, fused_metrics = qtarget.q_loss_fused(
      d['hidden'], d['head'], d['labels'], 'target_sft', where=d['mask'],
      prior=qtarget.FusedPrior(d['prior_hidden'], d['prior_head']), eta=0.5,
      return_metrics=True)
  np.testing.assert_allclose(loss_f, loss_d, rtol=1e-5, atol=1e-6)
  for got, want in zip(fused_metrics, dense_metrics):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  logits = d['hidden'] @ d['head']
  p_y = jnp.take_along_axis(jax.nn.softmax(logits), d['labels'][..., None], -1)[..., 0]
  np.testing.assert_allclose(dense_metrics.trust, jnp.where(d['mask'], p_y, 0), rtol=1e-5)
  assert np.all(np.asarray(dense_metrics.prior_entropy)[~np.asarray(d['mask'])] == 0)
  assert np.all(np.asarray(dense_metrics.prior_entropy)[np.asarray(d['mask'])] > 0)


def test_token_mean_under_gradient_accumulation_equals_the_global_mean():
  per_token = jnp.arange(12.0).reshape(4, 3)
  mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
  global_mean = qtarget.token_mean(per_token, mask)
  np.testing.assert_allclose(global_mean, (0 + 1 + 2 + 3 + 9 + 10) / 6)
  count = int(mask.sum())
  accumulated = sum(qtarget.token_mean(per_token[i:i + 2], mask[i:i + 2], num_tokens=count)
                    for i in (0, 2))
  np.testing.assert_allclose(accumulated, global_mean, rtol=1e-6)
  assert float(qtarget.token_mean(per_token, jnp.zeros_like(mask))) == 0.0


@pytest.mark.parametrize('dtype, rtol, atol', [(jnp.float32, 1e-6, 1e-6),
                                               (jnp.bfloat16, 2e-2, 2e-2)])
def test_sft_equals_optax_integer_label_cross_entropy(dtype, rtol, atol):
  """The fused call as a drop-in for a hard-label CE on hidden @ head, values and gradients.

  bfloat16: both sides see the same bfloat16 inputs; optax computes in bfloat16 from bfloat16
  logits, we in float32 from a float32-accumulated matmul, hence the bound (2e-2: a few
  bfloat16 ulps of the loss, about 5)."""
  d = _batch(4, dtype)

  def ours(hidden, head):
    return qtarget.token_mean(qtarget.q_loss_fused(hidden, head, d['labels'], 'sft',
                                                   where=d['mask'], chunk_size=4), d['mask'])

  def theirs(hidden, head):
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        (hidden @ head).astype(jnp.float32 if dtype == jnp.float32 else dtype), d['labels'])
    return jnp.sum(jnp.where(d['mask'], per_token, 0)) / d['mask'].sum()

  value, grads = jax.value_and_grad(ours, (0, 1))(d['hidden'], d['head'])
  want_value, want_grads = jax.value_and_grad(theirs, (0, 1))(d['hidden'], d['head'])
  np.testing.assert_allclose(np.float32(value), np.float32(want_value), rtol=rtol)
  for got, want in zip(grads, want_grads):
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=rtol, atol=atol)


def _forms(d):
  logits = d['hidden'] @ d['head']
  return {
      'dense': lambda labels, method='target_sft', where=d['mask'], prior=logits * 2, **hp:
          qtarget.q_loss(logits, labels, method, where=where, prior=prior, **hp),
      'fused': lambda labels, method='target_sft', where=d['mask'], prior=qtarget.FusedPrior(
          d['prior_hidden'], d['prior_head']), **hp:
          qtarget.q_loss_fused(d['hidden'], d['head'], labels, method, where=where, prior=prior,
                               **hp),
  }


@pytest.mark.parametrize('form', ['dense', 'fused'])
def test_bad_input_gets_the_named_errors(form):
  d = _batch(5)
  call = _forms(d)[form]
  labels = d['labels'].at[1, 2].set(V + 3)
  with pytest.raises(ValueError, match=r'outside \[0, 32\).*\(1, 2\)'):
    call(labels.at[1, 2].set(V + 3), where=jnp.ones((B, T), bool), eta=0.5)
  with pytest.raises(ValueError, match='where of shape'):
    call(d['labels'], where=jnp.ones((B, T + 1), bool), eta=0.5)
  with pytest.raises(TypeError, match='boolean'):
    call(d['labels'], where=jnp.ones((B, T), jnp.float32), eta=0.5)
  with pytest.raises(ValueError, match='unknown method'):
    call(d['labels'], method='no_such_method')
  with pytest.raises(TypeError, match='missing'):
    call(d['labels'])
  with pytest.raises(ValueError, match='outside its valid range'):
    call(d['labels'], eta=1.5)
  other_vocabulary = (d['hidden'] @ d['head'])[..., :V - 1] if form == 'dense' else (
      qtarget.FusedPrior(d['prior_hidden'], d['prior_head'][:, :V - 1]))
  with pytest.raises(ValueError, match='vocabulary size'):
    call(d['labels'], prior=other_vocabulary, eta=0.5)
  with pytest.raises(ValueError, match='needs the prior'):
    call(d['labels'], prior=None, eta=0.5)


def test_a_prior_of_the_other_form_is_refused():
  d = _batch(5)
  with pytest.raises(TypeError, match='FusedPrior'):
    qtarget.q_loss(d['hidden'] @ d['head'], d['labels'], 'distill',
                   prior=qtarget.FusedPrior(d['prior_hidden'], d['prior_head']))
  with pytest.raises(TypeError, match='FusedPrior'):
    qtarget.q_loss_fused(d['hidden'], d['head'], d['labels'], 'distill',
                         prior=d['prior_hidden'] @ d['prior_head'])


@pytest.mark.parametrize('form', ['dense', 'fused'])
def test_checked_mode_names_the_position(form):
  d = _batch(6)
  call = _forms(d)[form]

  def run(labels, eta, prior=None):
    kwargs = {} if prior is None else {'prior': prior}
    f = jax.jit(lambda labels, eta: call(labels, eta=eta, checked=True, **kwargs).sum())
    error, value = checkify.checkify(f)(labels, eta)
    return error.get(), value

  message, value = run(d['labels'], 0.5)
  assert message is None and np.isfinite(value)
  labels = d['labels'].at[1, 2].set(V).at[0, 0].set(-1)
  where = jnp.ones((B, T), bool)
  f = jax.jit(lambda labels: call(labels, where=where, eta=0.5, checked=True).sum())
  message = checkify.checkify(f)(labels)[0].get()
  assert 'label -1 at position [0 0]' in message, message
  message, _ = run(d['labels'], jnp.full((B, T), 0.5).at[1, 3].set(1.5))
  assert 'eta=1.5 at position [1 3]' in message, message
  if form == 'dense':
    bad_prior = (d['hidden'] @ d['head']).at[1, 4, 7].set(jnp.nan)
  else:
    bad_prior = qtarget.FusedPrior(d['prior_hidden'].at[1, 4, 0].set(jnp.nan), d['prior_head'])
  message, _ = run(d['labels'].at[1, 4].set(0), 0.5, prior=bad_prior)
  assert 'NaN or +inf at position [1 4]' in message, message


def test_checked_mode_outside_checkify_fails_loudly():
  d = _batch(6)
  with pytest.raises(ValueError, match='checkify'):
    jax.jit(lambda x: qtarget.q_loss(x, d['labels'], 'dft', checked=True))(
        d['hidden'] @ d['head'])


def _mesh(axis_type):
  return jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(axis_type,) * 2)


@pytest.mark.parametrize('axis_type', [AxisType.Explicit, AxisType.Auto], ids=str)
def test_fused_losses_on_a_mesh_with_scalar_hyperparameters_and_default_weights(axis_type):
  mesh = _mesh(axis_type)
  d = _batch(7)
  n = B * T
  rows = lambda x: x.reshape((n,) + x.shape[2:])
  tokens = lambda x: jax.device_put(x, NamedSharding(mesh, P('data', *([None] * (x.ndim - 1)))))
  hidden, labels = tokens(rows(d['hidden'])), tokens(rows(d['labels']))
  prior_hidden = tokens(rows(d['prior_hidden']))
  head = jax.device_put(d['head'], NamedSharding(mesh, P(None, 'tensor')))
  prior_head = d['prior_head']
  reference = fused.q_cross_entropy_fused(rows(d['hidden']), d['head'], rows(d['labels']),
                                          'target_sft', prior_hidden_NxP=rows(d['prior_hidden']),
                                          prior_head_PxV=prior_head, eta=0.5, chunk_size=4)[0]
  reference_grad = jax.grad(lambda h: fused.q_cross_entropy_fused(
      h, d['head'], rows(d['labels']), 'target_sft', prior_hidden_NxP=rows(d['prior_hidden']),
      prior_head_PxV=prior_head, eta=0.5, chunk_size=4)[0])(rows(d['hidden']))
  with jax.set_mesh(mesh):
    plain = jax.jit(jax.value_and_grad(lambda h, w: fused.q_cross_entropy_fused(
        h, w, labels, 'target_sft', prior_hidden_NxP=prior_hidden, prior_head_PxV=prior_head,
        eta=0.5, chunk_size=4)[0]))
    sharded = jax.jit(jax.value_and_grad(lambda h, w: fused.q_cross_entropy_fused_sharded(
        h, w, labels, 'target_sft', mesh=mesh, token_axes=('data',),
        prior_hidden_NxP=prior_hidden, prior_head_PxV=prior_head, eta=0.5, chunk_size=2)[0]))
    one_call = jax.jit(jax.value_and_grad(lambda h, w: qtarget.q_loss_fused(
        h, w, labels, 'target_sft', prior=qtarget.FusedPrior(prior_hidden, prior_head),
        eta=0.5, chunk_size=4).sum()))
    for fn in (plain, sharded, one_call):
      value, grad = fn(hidden, head)
      np.testing.assert_allclose(value, reference, rtol=1e-5)
      np.testing.assert_allclose(grad, reference_grad, rtol=1e-5, atol=1e-6)


def test_dense_form_on_an_explicit_mesh():
  mesh = jax.make_mesh((2, 4), ('data', 'tensor'), axis_types=(AxisType.Explicit,) * 2)
  d = _batch(8)
  logits, prior = d['hidden'] @ d['head'], d['prior_hidden'] @ d['prior_head']
  want = qtarget.q_loss(logits, d['labels'], 'target_sft', where=d['mask'], prior=prior,
                        eta=0.5)
  batch = lambda x: jax.device_put(x, NamedSharding(mesh, P('data', *([None] * (x.ndim - 1)))))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda z, y, m, q: qtarget.q_loss(z, y, 'target_sft', where=m, prior=q,
                                                    eta=0.5))(
        batch(logits), batch(d['labels']), batch(d['mask']), batch(prior))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.sharding.spec[0] == 'data'


def _temporaries(n, hidden_size, vocab, chunk):
  hidden = jax.ShapeDtypeStruct((n, hidden_size), jnp.float32)
  head = jax.ShapeDtypeStruct((hidden_size, vocab), jnp.float32)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32)

  def loss(h, w, y):
    return qtarget.q_loss_fused(h, w, y, 'target_sft', prior=qtarget.FusedPrior(h, w),
                                eta=0.5, chunk_size=chunk).sum()

  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(hidden, head, labels).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_fused_one_call_keeps_no_tokens_x_vocabulary_array():
  n, hidden_size, vocab, chunk = 2048, 64, 4096, 128
  small, large = _temporaries(n, hidden_size, vocab, chunk), _temporaries(
      4 * n, hidden_size, vocab, chunk)
  # A few chunk x V arrays, far below one N x V float32 array (32 MiB) ...
  assert small < 8 * chunk * vocab * 4, small
  # ... and only O(N x H) terms grow with the tokens.
  assert large - small < 4 * (3 * n) * hidden_size * 4 * 2, (small, large)


def test_docstring_examples():
  import doctest  # pylint: disable=import-outside-toplevel
  from qtarget import loss_calls  # pylint: disable=import-outside-toplevel
  result = doctest.testmod(loss_calls, extraglobs={'jnp': jnp},
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted >= 3 and result.failed == 0


def test_an_explicit_mesh_divides_the_tokens_between_devices():
  """Read from the compiled program: each of 8 devices runs 1/8 of the chunks, and the only
  collective is the head gradient's one all-reduce (no token array is gathered)."""
  n, hidden_size, vocab, chunk = 4096, 64, 2048, 128
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  sharded = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype,
                                                            sharding=NamedSharding(mesh, spec))
  args = (sharded((n, hidden_size), jnp.float32, P('data')),
          sharded((hidden_size, vocab), jnp.float32, P()), sharded((n,), jnp.int32, P('data')))
  calls = {
      'one_call': lambda h, w, y: qtarget.q_loss_fused(h, w, y, 'dft', chunk_size=chunk).sum(),
      'weighted_sum': lambda h, w, y: fused.q_cross_entropy_fused(h, w, y, 'dft',
                                                                  chunk_size=chunk)[0],
  }
  for name, loss in calls.items():
    with jax.set_mesh(mesh):
      text = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().as_text()
    trips = re.findall(r'known_trip_count[^\n]*?"n":"(\d+)"', text)
    assert trips == [str(n // 8 // chunk)], (name, trips)
    collectives = re.findall(r' (all-gather|all-reduce|all-to-all|reduce-scatter|'
                             r'collective-permute)(?:-start)?\(', text)
    assert collectives == ['all-reduce'], (name, collectives)


def test_a_boolean_mask_as_the_weighted_sum_s_weights_is_refused():
  d = _batch(9)
  rows = lambda x: x.reshape((B * T,) + x.shape[2:])
  for call in (fused.q_cross_entropy_fused,
               lambda *a, **k: fused.q_cross_entropy_fused_sharded(
                   *a, mesh=_mesh(AxisType.Auto), token_axes=('data',), **k)):
    with pytest.raises(TypeError, match='boolean mask'):
      call(rows(d['hidden']), d['head'], rows(d['labels']), 'sft', weights_N=rows(d['mask']))
