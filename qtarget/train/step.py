r"""The pure train step: student and prior forward, the target, the loss, the optax update.

:func:`train_step` runs the student forward, the prior forward (a separate frozen model, or the
student with its LoRA adapters switched off) under ``stop_gradient``, builds the configured
target from :mod:`qtarget.targets`, and applies the optax update. Micro-batches accumulate summed
losses, normalized once by the global count of response tokens, so a batch split in k gives the
same update as the whole. Micro-batches are strided (row r goes to micro-batch r mod k), so every
micro-step keeps rows on every batch device. Target hyperparameters live in the state as arrays:
a sweep does not recompile.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import struct

from qtarget import cached_prior
from qtarget import losses
from qtarget import targets
from qtarget.models import layout as layout_lib

Array = jax.Array
BATCH_KEYS = ('tokens', 'targets', 'loss_mask', 'segment_ids', 'positions')
# With a cached prior the batch also carries its rows ([B, T, k], [B, T, k], [B, T]).
CACHED_PRIOR_KEYS = ('prior_token_ids', 'prior_log_probs', 'prior_tail_log_mass')


def batch_keys(spec: 'StepSpec') -> tuple:
  """The arrays a batch of this step holds."""
  return BATCH_KEYS + (CACHED_PRIOR_KEYS if spec.prior == 'cached' else ())
METRIC_SUMS = ('loss', 'nll', 'trust', 'accuracy')  # summed over response tokens
ROWS = ('activation_batch', 'activation_length')


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static description of the step (part of the compiled program).

  Attributes:
    method: a name of :data:`qtarget.targets.METHODS` (built in or registered).
    prior: 'none' (the method needs none), 'lora_off' (the student without adapters),
      'separate' (a second frozen model) or 'cached' (its top-k rows come with the batch).
    accum_steps: micro-batches per optimizer step.
    static_hyperparameters: hyperparameters that set shapes (EAFT's k), as (name, value) pairs.
    vocab_size: the student's embedding rows (a prior's padding rows are cut to it).
    loss: 'dense' (logits, target, q_cross_entropy) or 'fused' (q_cross_entropy_fused).
    chunk_size: tokens per chunk of the fused loss.
    head_grad_accumulation: the fused loss's head-gradient accumulator, 'float32' or
      'head_dtype' (see :func:`qtarget.fused.q_cross_entropy_fused`).
    skip_nonfinite: keep the parameters and optimizer state when the loss or the gradient is
      not finite (the ``nonfinite`` metric says so); False applies every update and leaves the
      decision to the loop.
  """
  method: str
  prior: str
  accum_steps: int
  vocab_size: int
  loss: str
  tx: Any  # optax.GradientTransformation; hashed by identity
  schedule: Any
  static_hyperparameters: tuple = ()
  chunk_size: int = 1024
  head_grad_accumulation: str = 'float32'
  skip_nonfinite: bool = False


@struct.dataclass
class TrainState:
  """Everything the step reads and writes; ``graphdef`` and ``spec`` are static.

  ``params`` are the trainable parameters (all of them, or the LoRA adapters), ``frozen`` the
  student's other parameters (the base weights under LoRA; empty otherwise), ``prior`` a
  separate prior's parameters (empty unless ``spec.prior == 'separate'``).
  """
  step: Array
  params: nnx.State
  frozen: nnx.State
  prior: nnx.State
  opt_state: Any
  hyperparameters: dict
  graphdef: Any = struct.field(pytree_node=False)
  prior_graphdef: Any = struct.field(pytree_node=False)
  spec: StepSpec = struct.field(pytree_node=False)


def student_model(state: TrainState):
  return nnx.merge(state.graphdef, state.params, state.frozen)


def _prior_model(state: TrainState):
  """The frozen prior and the ``lora`` flag to run it with (constants of the step)."""
  if state.spec.prior == 'lora_off':
    return nnx.merge(state.graphdef, jax.lax.stop_gradient(state.params), state.frozen), False
  return nnx.merge(state.prior_graphdef, state.prior), True


def _prior_hidden(state: TrainState, micro: dict):
  """The frozen prior and its final hidden states for a micro-batch."""
  prior, lora = _prior_model(state)
  # No remat: nothing is differentiated through the prior (and flax's remat cannot update a
  # module built outside the gradient's trace).
  hidden = prior.hidden(micro['tokens'], segment_ids_BxT=micro['segment_ids'],
                        positions_BxT=micro['positions'], lora=lora, remat=False)
  return prior, hidden


def _cached_prior(micro: dict) -> cached_prior.CachedPrior:
  return cached_prior.CachedPrior(*(jax.lax.stop_gradient(micro[key])
                                    for key in CACHED_PRIOR_KEYS))


def _prior_logits(state: TrainState, micro: dict):
  """The prior's logits ``[B, T, V]``, or its :class:`CachedPrior` rows, or None."""
  if state.spec.prior == 'none':
    return None
  if state.spec.prior == 'cached':
    return _cached_prior(micro)
  prior, hidden = _prior_hidden(state, micro)
  return match_vocabulary(jax.lax.stop_gradient(prior.logits(hidden)), state.spec.vocab_size)


def _prior_hidden_and_head(state: TrainState, micro: dict):
  if state.spec.prior == 'none':
    return None, None
  prior, hidden = _prior_hidden(state, micro)
  head = prior.head_weights_HxV()[:, :state.spec.vocab_size]  # cut padding rows
  return jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(head)


def match_vocabulary(prior_logits, vocab_size: int):
  """The prior's logits ``[..., V']`` cut (or padded with -inf) to the student's ``vocab_size``
  rows: embedding sizes may differ by padding rows (Qwen2.5 pads 1.5B and 7B differently).
  ``python -m qtarget.cache_prior`` cuts its prior's logits the same way."""
  extra = vocab_size - prior_logits.shape[-1]
  if extra < 0:
    return prior_logits[..., :vocab_size]
  if extra > 0:
    pad = [(0, 0)] * (prior_logits.ndim - 1) + [(0, extra)]
    return jnp.pad(prior_logits, pad, constant_values=-jnp.inf)
  return prior_logits


def _micro_loss(params, state: TrainState, micro: dict, count):
  """Summed Q-loss of a micro-batch / the global response-token count, and metric sums."""
  if state.spec.loss == 'fused':
    return _micro_loss_fused(params, state, micro, count)
  prior_logits = _prior_logits(state, micro)
  model = nnx.merge(state.graphdef, params, state.frozen)
  logits = model(micro['tokens'], segment_ids_BxT=micro['segment_ids'],
                 positions_BxT=micro['positions'])
  mask, labels = micro['loss_mask'], micro['targets']
  hyper = {**state.hyperparameters, **dict(state.spec.static_hyperparameters)}
  target = targets.get(state.spec.method)(logits, labels, prior_logits=prior_logits, **hyper)
  per_token = losses.q_cross_entropy(logits, labels, target, where=mask)
  # Metrics from reductions over the vocabulary (no second B x T x V softmax): the label's
  # log-probability is its logit minus the log-normalizer; the prior's entropy is
  # logsumexp(z) - E_p[z].
  sg = jax.lax.stop_gradient
  # (label_log_probs gives NaN for a label outside the vocabulary.)
  label_logit = targets.label_log_probs(sg(logits), jnp.where(mask, labels, 0))
  label_log_prob = label_logit - jax.nn.logsumexp(sg(logits), axis=-1)
  prior_entropy = None
  if isinstance(prior_logits, cached_prior.CachedPrior):
    prior_entropy = cached_prior.bucket_entropy(prior_logits)
  elif prior_logits is not None:
    finite = jnp.isfinite(prior_logits)  # -inf: padding rows of a larger prior vocabulary
    prior_probs = jax.nn.softmax(prior_logits, axis=-1)
    prior_entropy = (jax.nn.logsumexp(prior_logits, axis=-1)
                     - jnp.sum(jnp.where(finite, prior_probs * prior_logits, 0.0), axis=-1))
  sums = _metric_sums(mask, sg(per_token), label_log_prob, target.trust,
                      jnp.argmax(logits, axis=-1) == labels, prior_entropy)
  return jnp.sum(per_token) / count, sums


def _token_axes(num_tokens: int) -> tuple | None:
  """Mesh axes the fused loss splits tokens over: the batch axes, and tensor when it divides
  them (so tensor-parallel devices do not repeat each other's loss work); None off a mesh."""
  mesh = layout_lib.active_mesh()
  if mesh is None:
    return None
  batch_spec = layout_lib.logical_to_spec(('activation_batch',), layout_lib.active_rules())[0]
  axes = tuple(a for a in layout_lib.mesh_axes(batch_spec) if a in mesh.shape)
  if 'tensor' not in axes and mesh.shape.get('tensor', 1) > 1:
    with_tensor = axes + ('tensor',)
    if num_tokens % math.prod(mesh.shape[a] for a in with_tensor) == 0:
      axes = with_tensor
  return axes or None


def _micro_loss_fused(params, state: TrainState, micro: dict, count):
  """The same loss through :func:`qtarget.fused.q_cross_entropy_fused` (no B x T x V logits),
  data-parallel on a mesh: each device scans its own tokens."""
  from qtarget import fused  # pylint: disable=g-import-not-at-top
  model = nnx.merge(state.graphdef, params, state.frozen)
  hidden = model.hidden(micro['tokens'], segment_ids_BxT=micro['segment_ids'],
                        positions_BxT=micro['positions'])
  mask, labels = micro['loss_mask'], micro['targets']
  flat = lambda x: None if x is None else x.reshape((-1,) + x.shape[2:])
  cache = None
  if state.spec.prior == 'cached':
    prior_hidden = prior_head = None
    cache = jax.tree.map(flat, _cached_prior(micro))
  else:
    prior_hidden, prior_head = _prior_hidden_and_head(state, micro)
  hyper = {name: jnp.broadcast_to(value, mask.shape).reshape(-1)
           for name, value in state.hyperparameters.items()}
  kwargs = dict(prior_hidden_NxP=flat(prior_hidden), prior_head_PxV=prior_head, prior_cache=cache,
                weights_N=flat(mask).astype(jnp.float32) / count,
                chunk_size=state.spec.chunk_size,
                head_grad_accumulation=state.spec.head_grad_accumulation, **hyper,
                **dict(state.spec.static_hyperparameters))
  token_axes = _token_axes(mask.size)
  if token_axes is None:
    loss, aux = fused.q_cross_entropy_fused(
        flat(hidden), model.head_weights_HxV(), flat(jnp.where(mask, labels, 0)),
        state.spec.method, **kwargs)
  else:
    loss, aux = fused.q_cross_entropy_fused_sharded(
        flat(hidden), model.head_weights_HxV(), flat(jnp.where(mask, labels, 0)),
        state.spec.method, mesh=layout_lib.active_mesh(), token_axes=token_axes, **kwargs)
  unflat = lambda x: layout_lib.constrain(x.reshape(mask.shape), ROWS)
  sums = _metric_sums(mask, unflat(aux.per_token_loss), unflat(aux.label_log_prob),
                      unflat(aux.trust), unflat(aux.predicted) == labels,
                      unflat(aux.prior_entropy) if state.spec.prior != 'none' else None)
  return loss, sums


def _metric_sums(mask, per_token_loss, label_log_prob, trust, correct, prior_entropy):
  masked_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0))
  sums = {'loss': masked_sum(per_token_loss), 'nll': masked_sum(-label_log_prob),
          'trust': masked_sum(trust), 'accuracy': masked_sum(correct.astype(jnp.float32))}
  if prior_entropy is not None:
    sums['prior_entropy'] = masked_sum(prior_entropy)
  return sums


def _constrain_like_parameters(tree):
  """Gradients (Variables with logical axes) held on the parameters' shards: each micro-step's
  gradient is reduced onto the accumulator's shards (a reduce-scatter on TPU) instead of
  summed whole on every device until the end. (The fused loss's head gradient is first summed
  whole over the token axes inside its shard_map, then sliced to the head's shards.)"""
  is_variable = lambda x: isinstance(x, nnx.Variable)

  def constrain(leaf):
    if not is_variable(leaf):
      return leaf
    axes = leaf.get_metadata().get('logical_axes')
    return leaf.replace(layout_lib.constrain(leaf.get_value(), axes or ()))

  return jax.tree.map(constrain, tree, is_leaf=is_variable)


def strided_micro_batches(batch: dict, accum_steps: int) -> dict:
  """``[B, ...]`` -> ``[accum_steps, B / accum_steps, ...]`` with row r in micro-batch
  r mod accum_steps: each device's rows split evenly, so every micro-step uses every device."""
  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return layout_lib.constrain(jnp.swapaxes(x, 0, 1), (None,) + ROWS)
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, layout=None) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch of ``accum_steps * micro`` rows.

  Args:
    state: the :class:`TrainState`.
    batch: ``[B, T]`` arrays (:data:`BATCH_KEYS`; a cached prior adds its ``[B, T, k]`` and
      ``[B, T]`` rows), B divisible by ``spec.accum_steps``.
    layout: a :class:`qtarget.train.sharding.Layout` (the mesh and its rules) that shards the
      activations; None leaves placement to XLA (one device). ``jit_train_step`` binds it.

  Returns:
    The new state and scalar metrics: means over response tokens (loss, nll, trust,
    accuracy, ...), and ``grad_norm``, ``learning_rate``, ``response_tokens`` (a count) and
    ``nonfinite`` (1 when the update was not finite).
  """
  if layout is None:
    return _train_step(state, batch)
  with layout_lib.activation_layout(layout.mesh, layout.rules_dict):
    return _train_step(state, batch)


def _train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  spec = state.spec
  count = jnp.maximum(jnp.sum(batch['loss_mask']), 1).astype(jnp.float32)
  micro_batches = strided_micro_batches(batch, spec.accum_steps)

  def accumulate(carry, micro):
    grads, sums = carry
    micro = jax.tree.map(lambda x: layout_lib.constrain(x, ROWS), micro)
    # Tied to this micro-batch, the weights are gathered inside each micro-step (ZeRO-3), not
    # hoisted out of the loop as whole copies that stay alive through every micro-step.
    (params, frozen, prior), micro = jax.lax.optimization_barrier(
        ((state.params, state.frozen, state.prior), micro))
    here = state.replace(params=params, frozen=frozen, prior=prior)
    (_, micro_sums), micro_grads = jax.value_and_grad(_micro_loss, has_aux=True)(
        params, here, micro, count)
    grads = jax.tree.map(jnp.add, grads, _constrain_like_parameters(micro_grads))
    sums = jax.tree.map(jnp.add, sums, micro_sums)
    return (grads, sums), None

  zero_grads = _constrain_like_parameters(jax.tree.map(jnp.zeros_like, state.params))
  names = METRIC_SUMS + (('prior_entropy',) if spec.prior != 'none' else ())
  zero_sums = {name: jnp.zeros((), jnp.float32) for name in names}
  (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), micro_batches)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
  if spec.skip_nonfinite:
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
  metrics = {name: value / count for name, value in sums.items()}
  metrics['residual_mass'] = 1.0 - metrics['trust']
  metrics['grad_norm'] = grad_norm
  metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
  metrics['learning_rate'] = spec.schedule(state.step)
  metrics['response_tokens'] = count
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics
