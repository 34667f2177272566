r"""Target-SFT, or any method of :data:`qtarget.targets.METHODS`, trained by Tunix's SFT trainer.

Tunix's ``PeftTrainer`` runs one jitted step per batch: ``loss_fn(model, **inputs)``, its
gradient with respect to the model's ``nnx.Param`` variables, and its optax optimizer's update
of them. Its extension point is the loss function (``with_loss_fn``). Here the model it holds
is a :class:`StudentAndPrior`: the student, a frozen prior whose weights are
:class:`PriorWeight` variables (not ``nnx.Param``: no gradient, no optimizer state), the method
and its hyperparameters. :func:`loss_fn` runs the student and the prior on the batch inside
that same step (the prior under ``stop_gradient``), takes each token's loss from
:func:`qtarget.q_loss` and returns the mean over the response tokens, as ``qtarget.train``'s
step does:

.. math::
  L = \frac{1}{\sum_t m_t} \sum_t m_t\, \mathrm{CE}(Q_t, p_t)

Example::

  model = StudentAndPrior(student, 'target_sft', eta=0.5)  # prior: a frozen copy of student
  trainer = make_trainer(model, optax.adamw(1e-4), peft_trainer.TrainingConfig(
      eval_every_n_steps=100, max_steps=1000))
  trainer.train(batches)
  trained = model.student

A batch is a dict of ``[B, T]`` arrays in ``qtarget.train``'s layout (:data:`BATCH_KEYS`):
``tokens``, ``targets`` (the next tokens), ``loss_mask`` (True on response tokens), and
optionally ``segment_ids`` (packed rows; 0 is padding) and ``positions``. Tunix's own
``TrainingInput`` (``input_tokens``, ``input_mask``) is turned into one by :func:`model_inputs`
(``make_trainer(..., pad_id=...)``).

Hyperparameters that are swept (``eta``, ``lam``, ...) are variables of the model, so they are
arguments of Tunix's compiled step: ``model.hyperparameters['eta'].set_value(jnp.float32(0.3))``
changes them without a recompile (a float32 array, as they are created; a Python float would
compile once more). Differences from ``qtarget.train`` that come from Tunix:

- with ``gradient_accumulation_steps`` Tunix averages the micro-batches' gradients
  (``optax.MultiSteps``), each micro-batch's loss divided by its own count of response tokens;
  ``qtarget.train`` divides every micro-batch by the global count;
- Tunix's checkpoints hold the whole model state, the prior's weights included;
- Tunix trains only ``nnx.LoRAParam`` variables when a model has any; the LoRA adapters of
  :class:`qtarget.models.llama.Llama` are ``nnx.Param`` to Tunix, so it trains every weight of
  such a student.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tunix.sft import peft_trainer

import qtarget
from qtarget import targets
from qtarget.models import attention

Array = jax.Array
BATCH_KEYS = ('tokens', 'targets', 'loss_mask', 'segment_ids', 'positions')


class PriorWeight(nnx.Variable):
  """A weight of the frozen prior: read by the step, never differentiated nor updated."""


class Hyperparameter(nnx.Variable):
  """A traced hyperparameter of the method (``eta``, ``lam``, ...)."""


def decoder_logits(model: nnx.Module, batch: dict) -> Array:
  """Logits ``[B, T, V]`` of a :class:`qtarget.models.llama.Llama` (or a model with its call)."""
  return model(batch['tokens'], segment_ids_BxT=batch['segment_ids'],
               positions_BxT=batch['positions'])


def tunix_logits(model: nnx.Module, batch: dict) -> Array:
  """Logits ``[B, T, V]`` of a model with Tunix's call, ``model(tokens, positions, cache,
  attention_mask) -> (logits, cache)``, causal within the batch's segments."""
  mask_BxTxT = attention.causal_segment_mask(batch['segment_ids'])
  logits, _ = model(batch['tokens'], batch['positions'], None, mask_BxTxT)
  return logits


def frozen(model: nnx.Module, copy: bool = False) -> nnx.Module:
  """``model`` with its ``nnx.Param`` variables as :class:`PriorWeight` (arrays copied when
  ``copy``); the original model is left as it is."""
  graphdef, state = nnx.split(model)
  copied = jnp.copy if copy else (lambda x: x)

  def freeze(variable):
    if isinstance(variable, nnx.Param):
      return PriorWeight(copied(variable.get_value()), **variable.get_metadata())
    return variable.replace(copied(variable.get_value()))

  return nnx.merge(graphdef, jax.tree.map(freeze, state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))


class StudentAndPrior(nnx.Module):
  """The model Tunix's trainer holds: the student, its frozen prior, the method.

  Args:
    student: the model to train (its ``nnx.Param`` variables are what Tunix updates).
    method: a name of :data:`qtarget.targets.METHODS` or a :class:`qtarget.targets.Method`.
    prior: the prior model (a teacher, or a checkpoint other than the student's); None takes a
      frozen copy of the student as it is now (the initial model). Ignored by methods without a
      prior. Its weights become :class:`PriorWeight` variables (without a copy).
    forward: ``forward(model, batch) -> logits [B, T, V]`` for both models:
      :func:`decoder_logits` (qtarget's decoder) or :func:`tunix_logits` (Tunix's models).
    **hyperparameters: the method's (``eta=0.5``), checked here; floating ones become
      :class:`Hyperparameter` variables, integer ones that set shapes (EAFT's ``k``) stay
      static.
  """

  def __init__(self, student: nnx.Module, method, *, prior: nnx.Module | None = None,
               forward: Callable[[nnx.Module, dict], Array] = decoder_logits,
               **hyperparameters):
    spec = targets.resolve(method)
    spec.check_hyperparameters(hyperparameters, ())
    traced, static = spec.split_hyperparameters(hyperparameters)
    self.method = spec.name
    self.forward = forward
    self.student = student
    if not spec.needs_prior:
      prior = None
    elif prior is None:
      prior = frozen(student, copy=True)
    else:
      prior = frozen(prior)
    self.prior = nnx.data(prior)
    self.hyperparameters = nnx.Dict({name: Hyperparameter(jnp.asarray(value, jnp.float32))
                                     for name, value in traced.items()})
    self.static_hyperparameters = tuple(sorted(static.items()))


def _full_batch(tokens, segment_ids, positions) -> dict:
  b, t = tokens.shape
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}


def per_token_loss(model: StudentAndPrior, tokens: Array, targets: Array, loss_mask: Array,
                   segment_ids: Array | None = None, positions: Array | None = None) -> Array:
  """Each token's loss ``[B, T]`` (0 where ``loss_mask`` is False), from :func:`qtarget.q_loss`."""
  batch = _full_batch(tokens, segment_ids, positions)
  mask = jnp.asarray(loss_mask).astype(bool)
  logits = model.forward(model.student, batch)
  prior_logits = None
  if model.prior is not None:
    # Tunix's gradient reaches only nnx.Param; stop_gradient also keeps the prior's forward
    # out of the backward pass. A prior with padding rows is cut to the student's vocabulary.
    prior_logits = jax.lax.stop_gradient(model.forward(model.prior, batch))
    prior_logits = prior_logits[..., :logits.shape[-1]]
  hyper = {name: variable.get_value() for name, variable in model.hyperparameters.items()}
  return qtarget.q_loss(logits, targets, model.method, where=mask, prior=prior_logits,
                        **hyper, **dict(model.static_hyperparameters))


def loss_fn(model: StudentAndPrior, tokens: Array, targets: Array, loss_mask: Array,
            segment_ids: Array | None = None, positions: Array | None = None) -> Array:
  """The scalar loss Tunix differentiates: the mean of :func:`per_token_loss` over the
  response tokens (``loss_mask``), 0 for a batch without any."""
  per_token = per_token_loss(model, tokens=tokens, targets=targets, loss_mask=loss_mask,
                             segment_ids=segment_ids, positions=positions)
  return qtarget.token_mean(per_token, jnp.asarray(loss_mask).astype(bool))


def model_inputs(training_input: peft_trainer.TrainingInput, pad_id: int) -> dict:
  """A batch (:data:`BATCH_KEYS`) from Tunix's ``TrainingInput``.

  Tunix's SFT loss scores ``input_tokens[:, 1:]`` under ``input_mask[:, 1:]`` from the logits
  of the positions before; here ``targets`` and ``loss_mask`` are those, shifted left (the last
  position scores nothing). Tokens equal to ``pad_id`` are padding (segment 0), left or right;
  positions count the real tokens.
  """
  tokens = jnp.asarray(training_input.input_tokens)
  real = tokens != pad_id
  next_token = lambda x, fill: jnp.concatenate(
      [x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)
  input_mask = jnp.asarray(training_input.input_mask).astype(bool)
  return {'tokens': tokens,
          'targets': next_token(tokens, pad_id),
          'loss_mask': next_token(input_mask & real, False),
          'segment_ids': real.astype(jnp.int32),
          'positions': jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)}


def make_trainer(model: StudentAndPrior, optimizer: optax.GradientTransformation,
                 training_config: peft_trainer.TrainingConfig, *,
                 pad_id: int | None = None) -> peft_trainer.PeftTrainer:
  """Tunix's ``PeftTrainer`` of ``model`` with :func:`loss_fn` (for training and evaluation).

  Batches are dicts of :data:`BATCH_KEYS` arrays; with ``pad_id`` they are Tunix
  ``TrainingInput`` instead, converted by :func:`model_inputs` inside the step.
  """
  trainer = peft_trainer.PeftTrainer(model, optimizer, training_config).with_loss_fn(loss_fn)
  if pad_id is not None:
    trainer.with_gen_model_input_fn(functools.partial(model_inputs, pad_id=pad_id))
  return trainer
