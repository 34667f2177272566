"""Target-SFT trained by Tunix's SFT trainer (qtarget.integrations.tunix): its first step is
qtarget.train's step, the adapter's loss is q_loss's, and with method 'sft' on Tunix's inputs
and models it is Tunix's own SFT."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

_EAGER_SHARDING = flax.config.flax_always_shard_variable
pytest.importorskip('tunix', reason='needs the tunix extra (setup.cfg says how to install it)')

# pylint: disable=g-import-not-at-top,wrong-import-position
from tunix.models.llama3 import model as tunix_llama
from tunix.sft import peft_trainer
from tunix.sft import utils as tunix_utils

# Importing Tunix turns flax's eager sharding of annotated variables off for the process; the
# rest of the suite keeps flax's setting (Tunix's models are built below with it off).
flax.config.update('flax_always_shard_variable', _EAGER_SHARDING)

import qtarget
import test_train_step as cases
from qtarget import train
from qtarget.integrations import tunix as qtunix
from qtarget.models import llama

ETA = 0.5


def _student(config, seed=0):
  arch = dict(config.model.architecture)
  return llama.Llama(llama.LlamaConfig(**arch), rngs=nnx.Rngs(seed))


def _params(module):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


@pytest.mark.parametrize('prior', ['initial', 'separate'])
def test_first_step_equals_our_train_step(prior):
  """One step of Tunix's PeftTrainer (its jit, gradient and optax update) on the adapter's loss
  gives qtarget.train's loss and parameters: same batch, weights and AdamW schedule."""
  config = cases.tiny_config(method='target_sft', hparams={'eta': ETA})
  prior_seed = 0 if prior == 'initial' else 1  # initial: a second copy of the student's weights
  state = train.create_state(config, _student(config), _student(config, prior_seed))
  assert state.spec.prior == 'separate'
  batch = cases.make_batch()
  ours, our_metrics = jax.jit(train.train_step)(state, jax.tree.map(jnp.asarray, batch))

  student = _student(config)
  model = qtunix.StudentAndPrior(
      student, 'target_sft', prior=None if prior == 'initial' else _student(config, prior_seed),
      eta=ETA)
  prior_before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model.prior))]
  initial = _params(student)
  trainer = qtunix.make_trainer(model, state.spec.tx, peft_trainer.TrainingConfig(
      eval_every_n_steps=1000, max_steps=1, pbar_description=None))
  trainer.train([batch])

  losses = trainer.metrics_logger.get_metric_history('', 'loss', 'train')
  assert losses.shape == (1,)
  np.testing.assert_allclose(losses[0], our_metrics['loss'], rtol=1e-5)
  got = _params(model.student)
  want = [np.asarray(x) for x in jax.tree.leaves(ours.params)]
  assert len(got) == len(want) == len(initial)
  lr = float(our_metrics['learning_rate'])
  for got_leaf, want_leaf, before in zip(got, want, initial):
    assert not np.array_equal(want_leaf, before)
    # The update itself, not only the parameters (which an update lost to rounding would pass),
    # to a thousandth of AdamW's step (lr): a float32 step of a weight near 1 is 1.2e-7.
    np.testing.assert_allclose(got_leaf - before, want_leaf - before, rtol=1e-5, atol=1e-3 * lr)
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5)
  # The prior did not move and Tunix keeps optimizer state for the student only.
  for got_leaf, want_leaf in zip(jax.tree.leaves(nnx.state(model.prior)), prior_before):
    np.testing.assert_array_equal(got_leaf, want_leaf)
  moments = [x for x in jax.tree.leaves(nnx.state(trainer.optimizer, nnx.optimizer.OptState))
             if np.ndim(x) > 0]
  assert len(moments) == 2 * len(initial)  # Adam's mu and nu, one of each per parameter


def _tiny_batch(rows=4, seq=12):
  return {key: value[:rows, :seq] for key, value in cases.make_batch(seed=1).items()}


def test_adapter_loss_is_the_token_mean_of_q_loss():
  config = cases.tiny_config()
  student, prior = _student(config), _student(config, 1)
  model = qtunix.StudentAndPrior(student, 'target_sft', prior=prior, eta=ETA)
  batch = jax.tree.map(jnp.asarray, _tiny_batch())
  mask = batch['loss_mask']

  @nnx.jit
  def run(model, prior):
    logits, prior_logits = (m(batch['tokens'], segment_ids_BxT=batch['segment_ids'],
                              positions_BxT=batch['positions'])
                            for m in (model.student, prior))
    expected = qtarget.q_loss(logits, batch['targets'], 'target_sft', where=mask,
                              prior=prior_logits, eta=ETA)
    # Tunix differentiates the model's nnx.Param: the student's weights, not the prior's.
    loss_and_grads = nnx.value_and_grad(qtunix.loss_fn)(model, **batch)
    return expected, qtunix.per_token_loss(model, **batch), loss_and_grads

  expected, per_token, (loss, grads) = run(model, prior)
  np.testing.assert_allclose(per_token, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss, jnp.sum(expected) / jnp.sum(mask), rtol=1e-6)
  assert set(nnx.to_pure_dict(grads)) == {'student'}
  assert all(isinstance(v, qtunix.PriorWeight)
             for v in jax.tree.leaves(nnx.state(model.prior),
                                      is_leaf=lambda x: isinstance(x, nnx.Variable)))
  # The prior was not copied (the caller's model keeps its weights and type), the student's
  # initial copy was.
  assert isinstance(prior.embed, nnx.Param)
  initial = qtunix.StudentAndPrior(student, 'target_sft', eta=ETA)
  assert initial.prior is not student
  np.testing.assert_array_equal(initial.prior.embed.get_value(), student.embed.get_value())
  assert initial.prior.embed.get_value() is not student.embed.get_value()


def test_hyperparameters_are_traced():
  config = cases.tiny_config()
  model = qtunix.StudentAndPrior(_student(config), 'target_sft', prior=_student(config, 1),
                                 eta=0.2)
  batch = jax.tree.map(jnp.asarray, _tiny_batch())
  traces = []

  def counted(model, **batch):
    traces.append(1)  # runs once per trace, not per call
    return qtunix.loss_fn(model, **batch)

  step = nnx.jit(counted)
  first = float(step(model, **batch))
  model.hyperparameters['eta'].set_value(jnp.float32(0.8))  # a float32 array, as at creation
  second = float(step(model, **batch))
  assert first != second
  assert len(traces) == 1


def test_methods_without_a_prior_hold_none_and_bad_hyperparameters_raise():
  config = cases.tiny_config()
  model = qtunix.StudentAndPrior(_student(config), 'dft', prior=_student(config, 1))
  assert model.prior is None
  batch = jax.tree.map(jnp.asarray, _tiny_batch())
  assert np.isfinite(nnx.jit(qtunix.loss_fn)(model, **batch))
  with pytest.raises(TypeError, match='missing'):
    qtunix.StudentAndPrior(_student(config), 'target_sft')
  with pytest.raises(ValueError, match='eta'):
    qtunix.StudentAndPrior(_student(config), 'target_sft', eta=1.5)
  with pytest.raises(ValueError, match='unknown method'):
    qtunix.StudentAndPrior(_student(config), 'not_a_method')


def test_with_tunix_inputs_and_models_sft_is_tunix_own_sft():
  """Method 'sft' on Tunix's TrainingInput (make_trainer's pad_id) and one of Tunix's models
  (tunix_logits) is Tunix's own SFT: its default loss and input function, the same step."""
  vocab, pad_id = 64, 0
  tiny = tunix_llama.ModelConfig(num_layers=1, vocab_size=vocab, embed_dim=32, hidden_dim=64,
                                 num_heads=2, head_dim=16, num_kv_heads=1, rope_theta=10000,
                                 norm_eps=1e-5)
  with nnx.use_eager_sharding(False):  # Tunix's weights carry mesh axes; there is no mesh
    students = [tunix_llama.Llama3(tiny, rngs=nnx.Rngs(0)) for _ in range(2)]
  for student in students:  # Tunix initializes some weights to zeros: draw all of them
    keys = iter(jax.random.split(jax.random.key(0), 64))
    for _, variable in nnx.to_flat_state(nnx.state(student, nnx.Param)):
      value = variable.get_value()
      variable.set_value(0.1 * jax.random.normal(next(keys), value.shape, value.dtype))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, (3, 10)).astype(np.int32)
  tokens[0, 7:] = pad_id  # right padding
  tokens[1, :2] = pad_id  # left padding
  input_mask = np.zeros_like(tokens, bool)
  input_mask[:, 4:] = True  # the completion
  input_mask &= tokens != pad_id
  training_input = peft_trainer.TrainingInput(input_tokens=tokens, input_mask=input_mask)

  def tunix_model_inputs(x):  # the input function of Tunix's SFT examples
    real = x.input_tokens != pad_id
    return {'input_tokens': x.input_tokens, 'input_mask': x.input_mask,
            'positions': tunix_utils.build_positions_from_mask(real),
            'attention_mask': tunix_utils.make_causal_attn_mask(real)}

  config = peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=1,
                                       pbar_description=None)
  theirs = peft_trainer.PeftTrainer(students[0], optax.sgd(0.5), config)
  theirs.with_gen_model_input_fn(tunix_model_inputs)
  model = qtunix.StudentAndPrior(students[1], 'sft', forward=qtunix.tunix_logits)
  ours = qtunix.make_trainer(model, optax.sgd(0.5), config, pad_id=pad_id)
  initial = _params(students[0])
  for trainer in (theirs, ours):
    trainer.train([training_input])

  np.testing.assert_allclose(ours.metrics_logger.get_metric_history('', 'loss', 'train'),
                             theirs.metrics_logger.get_metric_history('', 'loss', 'train'),
                             rtol=1e-5)
  for got, want, before in zip(_params(model.student), _params(students[0]), initial):
    assert not np.array_equal(want, before)
    # Two loss formulas round differently: updates of about 1e-4 agree to a few float32
    # steps of the weights (7e-9 at 0.1).
    np.testing.assert_allclose(got - before, want - before, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, want, rtol=1e-5)
