"""The train state: the optimizer, hyperparameters as arrays, and initialisation into shards."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qtarget import targets
from qtarget.models import llama
from qtarget.train import sharding as sharding_lib
from qtarget.train.errors import ConfigError
from qtarget.train.step import StepSpec, TrainState


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then cosine decay, after global-norm clipping.

  The warmup starts at peak / (warmup_steps + 1), so the first step already learns.
  """
  opt = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=opt.learning_rate / (opt.warmup_steps + 1), peak_value=opt.learning_rate,
      warmup_steps=opt.warmup_steps, decay_steps=max(config.steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.end_learning_rate_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                  mask=decay_mask))
  return tx, schedule


def trainable_filter(model_config):
  return llama.LoRAParam if model_config.lora_rank > 0 else nnx.Param


def hyperparameters(config) -> tuple[dict, tuple]:
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


def create_state(config, student, prior_model=None, mesh=None, rules=None) -> TrainState:
  """The initial :class:`TrainState` of a student and an optional prior.

  With a ``mesh`` (and the parameter ``rules``), the optimizer state is initialised under
  ``jit`` straight into the parameters' shardings and the small leaves are replicated; the
  models' arrays are expected on their shardings already (see
  :func:`qtarget.train.loading.load_model`). Without one, arrays stay where they are.
  """
  hyper, static = hyperparameters(config)
  if not targets.needs_prior(config.method):
    prior_mode = 'none'
  elif prior_model is None:
    if not student.config.lora_rank:
      raise ConfigError(
          f'method {config.method!r} needs a prior and none was given: pass prior_model (a '
          'frozen copy of the initial student, or a teacher), or give the student LoRA '
          'adapters (model.lora_rank > 0) so that the prior is the student with its adapters '
          'off. Without either the prior would be the live student itself, and the target '
          "would follow the model it trains (Target-SFT would become DFT).")
    prior_mode = 'lora_off'
  else:
    prior_mode = 'separate'
  graphdef, params, frozen = nnx.split(student, trainable_filter(config.model), ...)
  prior_graphdef, prior_state = (nnx.split(prior_model) if prior_mode == 'separate'
                                 else (None, nnx.State({})))
  tx, schedule = make_optimizer(config)
  sharding_lib.check_batch(config.batch_size, config.accum_steps)
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
                  chunk_size=config.loss_chunk_size,
                  skip_nonfinite=config.get('on_nonfinite', 'stop') == 'skip')
  step = jnp.zeros((), jnp.int32)
  if mesh is None:
    opt_state = tx.init(params)
  else:
    rules = dict(rules or {})
    opt_shardings = sharding_lib.state_shardings(jax.eval_shape(tx.init, params), mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    step, hyper = jax.device_put((step, hyper), replicated)
  return TrainState(step=step, params=params, frozen=frozen, prior=prior_state,
                    opt_state=opt_state, hyperparameters=hyper, graphdef=graphdef,
                    prior_graphdef=prior_graphdef, spec=spec)


def place(tree, shardings):
  """Arrays onto their shardings; host arrays on every process keep their addressable shards.

  An array already on its sharding is returned as it is (no copy): a step that donates its
  state then consumes it.
  """
  def put(x, s):
    if isinstance(x, jax.Array) and (x.sharding == s or not x.is_fully_addressable):
      return x if x.sharding == s else jax.device_put(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)
