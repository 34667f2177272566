r"""Training: one pure, sharded train step with the prior inside it, and the loop around it.

    python -m qtarget.train --config configs/smollm2_demo.py [--config.key=value ...]

:func:`train_step` runs the student forward, the prior forward (a separate frozen model, or the
student with its LoRA adapters switched off) under ``stop_gradient``, builds the configured
target from :mod:`qtarget.targets`, and applies the optax update. Micro-batches accumulate summed
losses, normalized once by the global count of response tokens, so a batch split in k gives the
same update as the whole. Target hyperparameters live in the state as arrays: a sweep does not
recompile.

The loop builds the mesh (``data``, ``fsdp``, ``tensor``), jits the step with shardings derived
from ``jax.eval_shape`` and logical-axis rules, checkpoints with orbax (trainable parameters,
optimizer state, step and the data iterator; never the prior), resumes from the latest
checkpoint, logs to TensorBoard and JSON lines, evaluates before and after, and exports the
model to a Hugging Face directory.
"""

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qtarget import losses
from qtarget import targets
from qtarget.models import llama

Array = jax.Array
BATCH_KEYS = ('tokens', 'targets', 'loss_mask', 'segment_ids', 'positions')
MESH_AXES = ('data', 'fsdp', 'tensor')
METRIC_SUMS = ('loss', 'nll', 'trust', 'accuracy')  # summed over response tokens


class ConfigError(ValueError):
  """A configuration that cannot train; raised before any work starts."""


# The step.

@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static description of the step (part of the compiled program).

  Attributes:
    method: a name of :data:`qtarget.targets.CONSTRUCTORS`.
    prior: 'none' (the method needs none), 'lora_off' (the student without adapters) or
      'separate' (a second frozen model).
    accum_steps: micro-batches per optimizer step.
    static_hyperparameters: hyperparameters that set shapes (EAFT's k), as (name, value) pairs.
    vocab_size: the student's embedding rows (a prior's padding rows are cut to it).
    loss: 'dense' (logits, target, q_cross_entropy) or 'fused' (q_cross_entropy_fused).
    chunk_size: tokens per chunk of the fused loss.
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


def _prior_logits(state: TrainState, micro: dict) -> Array | None:
  if state.spec.prior == 'none':
    return None
  prior, hidden = _prior_hidden(state, micro)
  return _match_vocabulary(jax.lax.stop_gradient(prior.logits(hidden)), state.spec.vocab_size)


def _prior_hidden_and_head(state: TrainState, micro: dict):
  if state.spec.prior == 'none':
    return None, None
  prior, hidden = _prior_hidden(state, micro)
  head = prior.head_weights_HxV()[:, :state.spec.vocab_size]  # cut padding rows
  return jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(head)


def _match_vocabulary(prior_logits, vocab_size: int):
  """Cuts (or pads with -inf) the prior's padding rows to the student's embedding size."""
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
  sg = jax.lax.stop_gradient
  log_probs = jax.nn.log_softmax(sg(logits), axis=-1)
  prior_entropy = None
  if prior_logits is not None:
    prior_log_probs = jax.nn.log_softmax(prior_logits, axis=-1)
    prior_entropy = -jnp.sum(jnp.where(prior_log_probs > -jnp.inf,
                                       jnp.exp(prior_log_probs) * prior_log_probs, 0.0), axis=-1)
  sums = _metric_sums(mask, sg(per_token), targets.label_log_probs(log_probs, jnp.where(
      mask, labels, 0)), target.trust, jnp.argmax(logits, axis=-1) == labels, prior_entropy)
  return jnp.sum(per_token) / count, sums


def _micro_loss_fused(params, state: TrainState, micro: dict, count):
  """The same loss through :func:`qtarget.fused.q_cross_entropy_fused` (no B x T x V logits)."""
  from qtarget import fused  # pylint: disable=g-import-not-at-top
  model = nnx.merge(state.graphdef, params, state.frozen)
  hidden = model.hidden(micro['tokens'], segment_ids_BxT=micro['segment_ids'],
                        positions_BxT=micro['positions'])
  prior_hidden, prior_head = _prior_hidden_and_head(state, micro)
  mask, labels = micro['loss_mask'], micro['targets']
  flat = lambda x: None if x is None else x.reshape((-1,) + x.shape[2:])
  hyper = {name: jnp.broadcast_to(value, mask.shape).reshape(-1)
           for name, value in state.hyperparameters.items()}
  loss, aux = fused.q_cross_entropy_fused(
      flat(hidden), model.head_weights_HxV(), flat(jnp.where(mask, labels, 0)), state.spec.method,
      prior_hidden_NxP=flat(prior_hidden), prior_head_PxV=prior_head,
      weights_N=flat(mask).astype(jnp.float32) / count, chunk_size=state.spec.chunk_size,
      **hyper)
  unflat = lambda x: x.reshape(mask.shape)
  sums = _metric_sums(mask, unflat(aux.per_token_loss), unflat(aux.label_log_prob),
                      unflat(aux.trust), unflat(aux.predicted) == labels,
                      unflat(aux.prior_entropy) if prior_hidden is not None else None)
  return loss, sums


def _metric_sums(mask, per_token_loss, label_log_prob, trust, correct, prior_entropy):
  masked_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0))
  sums = {'loss': masked_sum(per_token_loss), 'nll': masked_sum(-label_log_prob),
          'trust': masked_sum(trust), 'accuracy': masked_sum(correct.astype(jnp.float32))}
  if prior_entropy is not None:
    sums['prior_entropy'] = masked_sum(prior_entropy)
  return sums


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch of ``accum_steps * micro`` rows.

  Args:
    state: the :class:`TrainState`.
    batch: ``[B, T]`` arrays (:data:`BATCH_KEYS`), B divisible by ``spec.accum_steps``.

  Returns:
    The new state and scalar metrics (means over response tokens).
  """
  spec = state.spec
  count = jnp.maximum(jnp.sum(batch['loss_mask']), 1).astype(jnp.float32)
  micro_batches = jax.tree.map(
      lambda x: x.reshape((spec.accum_steps, -1) + x.shape[1:]), batch)

  def accumulate(carry, micro):
    grads, sums = carry
    (_, micro_sums), micro_grads = jax.value_and_grad(_micro_loss, has_aux=True)(
        state.params, state, micro, count)
    grads = jax.tree.map(jnp.add, grads, micro_grads)
    sums = jax.tree.map(jnp.add, sums, micro_sums)
    return (grads, sums), None

  zero_grads = jax.tree.map(jnp.zeros_like, state.params)
  names = METRIC_SUMS + (('prior_entropy',) if spec.prior != 'none' else ())
  zero_sums = {name: jnp.zeros((), jnp.float32) for name in names}
  (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), micro_batches)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {name: value / count for name, value in sums.items()}
  metrics['residual_mass'] = 1.0 - metrics['trust']
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['learning_rate'] = spec.schedule(state.step)
  metrics['response_tokens'] = count
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


# Optimizer.

def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then cosine decay, after global-norm clipping.

  The warmup starts at peak / (warmup_steps + 1), so the first step already learns.
  """
  opt = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=opt.learning_rate / (opt.warmup_steps + 1), peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=max(config.steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.end_learning_rate_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                  mask=decay_mask))
  return tx, schedule


# Sharding.

def build_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all); one axis may be -1 (the rest)."""
  shape = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  devices = jax.devices() if devices is None else list(devices)
  if shape.count(-1) > 1:
    raise ConfigError(f'mesh {shape}: at most one axis may be -1.')
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise ConfigError(f'mesh {shape} does not divide the {len(devices)} devices.')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ConfigError(f'mesh {shape} needs {int(np.prod(shape))} devices; there are '
                      f'{len(devices)}.')
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes, rules: dict) -> PartitionSpec:
  """PartitionSpec of logical axis names under ``rules`` (name -> mesh axis or None)."""
  if axes is None:
    return PartitionSpec()
  mesh_axes, used = [], set()
  for name in axes:
    target = rules.get(name)
    # A mesh axis may shard only one dimension of an array.
    mesh_axes.append(None if target is None or target in used else target)
    if target is not None:
      used.add(target)
  return PartitionSpec(*mesh_axes)


def _fits(shape, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  # Replicate a dimension that the mesh axis does not divide (small tensors, odd vocabularies).
  fixed = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    fixed.append(axis if axis is None or dim % mesh.shape[axis] == 0 else None)
  return PartitionSpec(*fixed)


def state_shardings(abstract_state, mesh: Mesh, rules: dict):
  """Shardings for a state pytree: Variables by their logical axes, the rest replicated."""
  is_variable = lambda x: isinstance(x, nnx.Variable)

  def sharding(leaf):
    if is_variable(leaf):
      value = leaf.get_value()
      spec = _fits(value.shape, logical_to_spec(leaf.get_metadata().get('logical_axes'), rules),
                   mesh)
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(sharding, abstract_state, is_leaf=is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp'), None))


def jit_train_step(abstract_state, mesh: Mesh, rules: dict):
  """``train_step`` jitted with in/out shardings and the state donated."""
  shardings = state_shardings(abstract_state, mesh, rules)
  batch_shardings = {key: batch_sharding(mesh) for key in BATCH_KEYS}
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, replicated), donate_argnums=0), shardings


# Models.

def _model_overrides(model_config) -> dict:
  return dict(param_dtype=model_config.param_dtype, compute_dtype=model_config.compute_dtype,
              lora_rank=model_config.lora_rank, lora_alpha=model_config.lora_alpha,
              remat=model_config.remat)


def load_model(model_config, *, seed: int, with_lora: bool = True):
  """``(model, tokenizer)`` from a config's ``source``: 'gguf', 'hf' or 'random'."""
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  from qtarget import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  overrides = _model_overrides(model_config)
  if not with_lora:
    overrides['lora_rank'] = 0
  source = model_config.source
  if source == 'gguf':
    return checkpoints.load_gguf(model_config.path or None, seed=seed, **overrides)
  if source == 'hf':
    model = checkpoints.load_hf(model_config.path, seed=seed, **overrides)
    tokenizer = tokenizer_lib.Tokenizer.from_directory(model_config.path)
    tokenizer.check_model_vocabulary(model.config.vocab_size)
    return model, tokenizer
  if source == 'random':
    # A random model of the given shape, with the tokenizer of `tokenizer_path` (a GGUF or HF
    # directory; empty: SmolLM2's).
    arch = dict(model_config.architecture)
    model = llama.Llama(llama.LlamaConfig(**arch, **overrides), rngs=nnx.Rngs(seed))
    path = model_config.tokenizer_path
    if path and pathlib.Path(path).is_dir():
      tokenizer = tokenizer_lib.Tokenizer.from_directory(path)
    else:
      import gguf  # pylint: disable=g-import-not-at-top
      tokenizer = tokenizer_lib.Tokenizer.from_gguf(
          gguf.GGUFReader(str(path or checkpoints.smollm2_gguf_path())))
    tokenizer.check_model_vocabulary(model.config.vocab_size)
    return model, tokenizer
  raise ConfigError(f"model.source must be 'gguf', 'hf' or 'random', got {source!r}.")


def _check_same_vocabulary(student_tokenizer, prior_tokenizer):
  """The prior must share the student's tokenizer; embedding sizes may differ by padding rows
  (Qwen2.5 pads 1.5B and 7B differently), which the step cuts or pads with -inf."""
  student_vocab = student_tokenizer.backend.get_vocab()
  prior_vocab = prior_tokenizer.backend.get_vocab()
  if student_vocab != prior_vocab:
    differing = sorted(set(student_vocab.items()) ^ set(prior_vocab.items()))[:3]
    raise ConfigError(
        f"the prior's tokenizer ({len(prior_vocab)} tokens) differs from the student's "
        f'({len(student_vocab)} tokens), for example at {differing}: the prior must share the '
        "student's tokenizer and vocabulary.")


def _trainable_filter(model_config):
  return llama.LoRAParam if model_config.lora_rank > 0 else nnx.Param


def _hyperparameters(config) -> tuple[dict, tuple]:
  """Traced (float) and static (EAFT's k) hyperparameters, checked against the method."""
  if config.method not in targets.CONSTRUCTORS:
    raise ConfigError(f'unknown method {config.method!r}; known methods: '
                      f'{", ".join(sorted(targets.CONSTRUCTORS))}.')
  if config.method == 'weighted':
    raise ConfigError("method 'weighted' needs per-token weights from the data, which the "
                      'trainer does not provide.')
  given = dict(config.hparams)
  if config.method == 'eaft':
    if set(given) != {'k'}:
      raise ConfigError(f"method 'eaft' takes hyperparameters ['k']; the config gives "
                        f'{sorted(given)} (set --config.hparams.NAME=VALUE).')
    return {}, (('k', int(given['k'])),)
  try:
    targets.METHODS[config.method].check_hyperparameters(given, ())
  except TypeError as error:
    raise ConfigError(f'{error} Set --config.hparams.NAME=VALUE.') from error
  return {name: jnp.asarray(value, jnp.float32) for name, value in given.items()}, ()


def create_state(config, student, prior_model=None) -> TrainState:
  """The initial :class:`TrainState` (host arrays) of a student and an optional prior."""
  hyperparameters, static = _hyperparameters(config)
  if not targets.needs_prior(config.method):
    prior_mode = 'none'
  elif prior_model is None:
    prior_mode = 'lora_off'
  else:
    prior_mode = 'separate'
  graphdef, params, frozen = nnx.split(student, _trainable_filter(config.model), ...)
  prior_graphdef, prior_state = (nnx.split(prior_model) if prior_mode == 'separate'
                                 else (None, nnx.State({})))
  tx, schedule = make_optimizer(config)
  if config.batch_size % config.accum_steps:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by accum_steps '
                      f'{config.accum_steps}.')
  if config.loss not in ('dense', 'fused'):
    raise ConfigError(f"loss must be 'dense' or 'fused', got {config.loss!r}.")
  if config.loss == 'fused':
    from qtarget import fused  # pylint: disable=g-import-not-at-top
    if config.method not in fused.SUPPORTED_METHODS:
      raise ConfigError(f'the fused loss does not support method {config.method!r}; use '
                        f"loss='dense' or one of {', '.join(fused.SUPPORTED_METHODS)}.")
    if prior_model is not None and prior_model.config.vocab_size < student.config.vocab_size:
      raise ConfigError('the fused loss needs a prior vocabulary at least as large as the '
                        "student's; use loss='dense'.")
  spec = StepSpec(method=config.method, prior=prior_mode, accum_steps=config.accum_steps,
                  vocab_size=student.config.vocab_size, loss=config.loss, tx=tx,
                  schedule=schedule, static_hyperparameters=static,
                  chunk_size=config.loss_chunk_size)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                    prior=prior_state, opt_state=tx.init(params),
                    hyperparameters=hyperparameters, graphdef=graphdef,
                    prior_graphdef=prior_graphdef, spec=spec)


def place(tree, shardings):
  """Host arrays onto the mesh (on every process, each keeps its addressable shards)."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
      tree, shardings)


def student_model(state: TrainState) -> llama.Llama:
  return nnx.merge(state.graphdef, state.params, state.frozen)


# The loop.

def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f'[qtarget] {message}', flush=True)


def maybe_initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` for multi-host runs (a TPU pod or a GPU cluster)."""
  dist = config.distributed
  if not dist.enabled:
    return
  if dist.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', dist.cpu_collectives)
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(coordinator_address=dist.coordinator_address,
                  num_processes=dist.num_processes, process_id=dist.process_id)
  jax.distributed.initialize(**kwargs)  # without arguments: detected from the cluster


def _builder(config):
  """The tfds builder of ``config.data`` (prepared) and the name of its held-out split or None."""
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  data = config.data
  if data.kind == 'reasoning_gym':
    builder_config = builders.ReasoningGymConfig(
        task=data.task, train_size=data.train_size, eval_size=data.eval_size, seed=data.seed,
        difficulty=dict(data.difficulty), rationale=dict(data.get('rationale', {})))
    eval_split = 'test'
  elif data.kind == 'files':
    builder_config = builders.LocalFilesConfig(
        train_path=data.train_path, eval_path=data.eval_path or None, task=data.task,
        prompt_field=data.prompt_field or None, response_field=data.response_field or None)
    eval_split = 'test' if data.eval_path else None
  else:
    raise ConfigError(f"data.kind must be 'reasoning_gym' or 'files', got {data.kind!r}.")
  return builders.prepare(builder_config, data.data_dir or None), eval_split


def held_out_records(config) -> list[dict]:
  """The held-out problems a run with ``config`` evaluates on (the training split is not read)."""
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  builder, eval_split = _builder(config)
  return builders.load_split(builder, eval_split) if eval_split else []


def _data(config, tokenizer, vocab_size):
  from qtarget.data import builders, pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  builder, eval_split = _builder(config)
  train_records = builders.load_split(builder, 'train')
  report = pipeline.scan(train_records, tokenizer, max_length=data.seq_len,
                         truncate=data.truncate, vocab_size=vocab_size, name='train')
  eval_records = builders.load_split(builder, eval_split) if eval_split else []
  dataset = pipeline.train_dataset(
      builder, tokenizer, seq_len=data.seq_len, batch_size=config.batch_size,
      seed=data.seed * 1_000_003 + config.seed,  # the run seed varies the order, not the data
      num_epochs=None, pack=data.pack, truncate=data.truncate,
      process_index=jax.process_index(), process_count=jax.process_count())
  return dataset, report, eval_records


class _MetricsLog:
  """metrics.jsonl (rewound to the restored step on resume) and TensorBoard events."""

  def __init__(self, workdir: pathlib.Path, start_step: int):
    self.path = workdir / 'metrics.jsonl'
    self.active = jax.process_index() == 0
    if not self.active:
      return
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line and json.loads(line).get('step', 0) <= start_step]
      self.path.write_text(''.join(line + '\n' for line in kept))
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(str(workdir / 'tensorboard'), purge_step=start_step + 1)
    except ImportError:
      self.writer = None

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    with self.path.open('a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    if self.writer is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)):
          self.writer.add_scalar(name, value, step)

  def close(self):
    if self.active and self.writer is not None:
      self.writer.close()


def _evaluate(label, state, tokenizer, eval_records, config, workdir, step):
  """Held-out Average@k and pass@k; predictions to ``workdir/predictions_{label}.jsonl``."""
  from qtarget import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  records = eval_records[:config.eval.num_problems]
  if not records:
    return None
  if jax.process_count() > 1:
    _log(f'skipping the {label} evaluation: generation runs in single-process runs only; '
         'evaluate the exported model instead.')
    return None
  _log(f'evaluating {label} on {len(records)} held-out problems...')
  k = config.eval.num_samples
  result = evaluate_lib.evaluate(student_model(state), tokenizer, records,
                                 max_new_tokens=config.eval.max_new_tokens,
                                 batch_size=config.eval.batch_size, num_samples=k,
                                 temperature=config.eval.temperature, top_p=config.eval.top_p,
                                 seed=config.eval.seed)
  _log(f'{label}: accuracy {result.accuracy:.3f}' + (
      f' (Average@{k}; pass@{k} {result.pass_at_k:.3f})' if k > 1 else '') +
       f' ({len(records)} problems, {result.seconds:.0f} s)')
  if jax.process_index() == 0:
    out = workdir / f'predictions_{label}.jsonl'
    out.write_text(''.join(
        json.dumps({**p, 'method': config.method, 'seed': config.seed, 'step': step}) + '\n'
        for p in result.predictions))
  return {'accuracy': result.accuracy, f'pass_at_{k}': result.pass_at_k, 'k': k,
          'problems': len(records), 'step': step, 'seconds': round(result.seconds, 1)}


def run(config) -> dict:
  """Trains as configured; returns the summary (also written to ``workdir/summary.json``)."""
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
  tfds.disable_progress_bar()
  maybe_initialize_distributed(config)
  started = time.time()
  workdir = pathlib.Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _hyperparameters(config)  # a bad method or hyperparameter stops here, before any loading

  student, tokenizer = load_model(config.model, seed=config.seed)
  prior_model = None
  if targets.needs_prior(config.method) and (config.prior.source != 'initial'
                                             or config.model.lora_rank == 0):
    if config.prior.source == 'initial':
      prior_model, prior_tokenizer = load_model(config.model, seed=config.seed, with_lora=False)
    else:
      prior_model, prior_tokenizer = load_model(config.prior, seed=config.seed + 1,
                                                with_lora=False)
    _check_same_vocabulary(tokenizer, prior_tokenizer)
  dataset, report, eval_records = _data(config, tokenizer, student.config.vocab_size)
  _log(f'train data: {report}')

  mesh = build_mesh(config.mesh)
  rules = dict(config.sharding_rules)
  batch_shards = mesh.shape['data'] * mesh.shape['fsdp']
  if (config.batch_size // config.accum_steps) % batch_shards:
    raise ConfigError(
        f'the micro-batch of {config.batch_size // config.accum_steps} rows (batch_size / '
        f'accum_steps) does not split over data x fsdp = {batch_shards} devices; change '
        'batch_size or the mesh.')
  host_state = create_state(config, student, prior_model)
  del student, prior_model
  step_fn, shardings = jit_train_step(jax.eval_shape(lambda: host_state), mesh, rules)
  state = place(host_state, shardings)
  del host_state
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  _log(f'mesh {dict(mesh.shape)}; method {config.method} {dict(config.hparams)}; prior: '
       f'{state.spec.prior}; trainable parameters {trainable:,}')

  manager = ocp.CheckpointManager(
      (workdir / 'checkpoints').resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep,
                                           enable_async_checkpointing=False))
  iterator = iter(dataset)
  saved_tree = lambda s: {'step': s.step, 'params': s.params, 'opt_state': s.opt_state}
  start_step = 0
  if manager.latest_step() is not None:
    latest = manager.latest_step()
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved_tree(state),
        saved_tree(shardings))
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(iterator)))['state']
    state = state.replace(step=restored['step'], params=restored['params'],
                          opt_state=restored['opt_state'])
    start_step = int(latest)
    _log(f'resumed from the checkpoint at step {start_step}')

  summary_path = workdir / 'summary.json'
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  if config.eval.before and 'accuracy_before' not in summary:
    summary['eval_before'] = _evaluate('before', state, tokenizer, eval_records, config,
                                       workdir, 0)
    summary['accuracy_before'] = (summary['eval_before'] or {}).get('accuracy')
    if jax.process_index() == 0:
      summary_path.write_text(json.dumps(summary, indent=2))

  log = _MetricsLog(workdir, start_step)
  progress = None
  if jax.process_index() == 0 and config.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm(total=config.steps, initial=start_step, desc='train', unit='step',
                    dynamic_ncols=True, file=sys.stdout)
  sharding = batch_sharding(mesh)

  def save(step):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(saved_tree(state)),
        data=grain.checkpoint.CheckpointSave(iterator)), force=True)

  def interval_eval(step):
    every = config.eval.get('every', 0)
    if not every or step <= 0 or step % every or step >= config.steps:
      return
    if (workdir / f'predictions_step{step}.jsonl').exists():
      return  # done before an interruption (its metrics line survived the rewind)
    result = _evaluate(f'step{step}', state, tokenizer, eval_records, config, workdir, step)
    if result is not None:
      log.write(step, {'eval_accuracy': result['accuracy']})

  interval_eval(start_step)  # killed during an evaluation right after its checkpoint
  train_seconds, tokens_seen, last = 0.0, 0, {}
  for step in range(start_step, config.steps):
    local = next(iterator)
    batch = {key: jax.make_array_from_process_local_data(sharding, np.asarray(local[key]))
             for key in BATCH_KEYS}
    tick = time.time()
    state, metrics = step_fn(state, batch)
    metrics = {name: float(value) for name, value in metrics.items()}
    seconds = time.time() - tick
    real_tokens = int(np.sum(local['segment_ids'] > 0)) * jax.process_count()
    metrics['tokens_per_second'] = real_tokens / seconds
    metrics['step_seconds'] = seconds
    if step > start_step:  # the first step of a process includes compilation
      train_seconds += seconds
      tokens_seen += real_tokens
    last = metrics
    if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
      log.write(step + 1, metrics)
    if progress is not None:
      progress.update(1)
      progress.set_postfix(loss=f"{metrics['loss']:.3f}", nll=f"{metrics['nll']:.3f}",
                           acc=f"{metrics['accuracy']:.2f}")
    if (step + 1) % config.checkpoint.every == 0 or step + 1 == config.steps:
      save(step + 1)
    interval_eval(step + 1)
  if progress is not None:
    progress.close()
  if manager.latest_step() != config.steps:
    save(config.steps)  # resumed at the end: make sure the final state is on disk
  manager.wait_until_finished()
  log.close()

  if config.eval.after:
    summary['eval_after'] = _evaluate('after', state, tokenizer, eval_records, config, workdir,
                                      config.steps)
    summary['accuracy_after'] = (summary['eval_after'] or {}).get('accuracy')
  if config.export_hf:
    from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    model = student_model(state)
    if jax.process_count() > 1:  # a collective: every process takes part
      nnx.update(model, multihost_utils.process_allgather(nnx.state(model), tiled=True))
    if jax.process_index() == 0:
      checkpoints.export_hf(model, workdir / 'hf', tokenizer)
    summary['exported_to'] = str(workdir / 'hf')
  summary.update(
      method=config.method, hyperparameters=dict(config.hparams), steps=config.steps,
      final_metrics=last, train_data=str(report), wall_seconds=round(time.time() - started, 1),
      mean_step_seconds=round(train_seconds / max(config.steps - start_step - 1, 1), 3),
      tokens_per_second=round(tokens_seen / train_seconds, 1) if train_seconds else None)
  if jax.process_index() == 0:
    summary_path.write_text(json.dumps(summary, indent=2))
    _log('summary: ' + json.dumps(summary))
    if summary.get('accuracy_before') is not None and summary.get('accuracy_after') is not None:
      _log(f"held-out accuracy ({min(config.eval.num_problems, len(eval_records))} problems of "
           f"{config.data.task}): before {summary['accuracy_before']:.3f} -> after "
           f"{summary['accuracy_after']:.3f}; wall time {summary['wall_seconds']:.0f} s")
  return summary


def main(argv) -> None:
  del argv
  run(_CONFIG.value)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file',
                                            lock_config=True)
  app.run(main)
