"""The train state: the optimizer, hyperparameters as arrays, and initialisation into shards."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qtarget import targets
from qtarget.models import llama
from qtarget.train import checks
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
  """Traced (float) and static (shape-setting ints) hyperparameters, checked against the
  method."""
  method = checks.resolve_method(config)
  given = dict(config.hparams)
  try:
    method.check_hyperparameters(given, ())
  except (TypeError, ValueError) as error:
    names = sorted(set(method.hyperparameters) | set(method.static_hyperparameters))
    fix = (' '.join(f'--config.hparams.{name}=VALUE' for name in names) if names
           else "--config.hparams='{}'")
    raise ConfigError(f'{error} On the command line: --config.method={method.name} {fix} '
                      f'(or all at once, --config.hparams="{{...}}").') from error
  traced, static = method.split_hyperparameters(given)
  return ({name: jnp.asarray(value, jnp.float32) for name, value in traced.items()},
          tuple(sorted(static.items())))


FROZEN_WEIGHTS = checks.FROZEN_WEIGHTS


def _frozen_in(state: nnx.State, dtype: str, mesh) -> nnx.State:
  """Floating arrays of frozen weights cast to ``dtype``, on their own shardings."""
  dtype = jnp.dtype(dtype)
  # Only ever narrowing: bfloat16 weights under a float32 compute dtype stay bfloat16.
  cast = lambda x: (x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                    and dtype.itemsize < x.dtype.itemsize else x)
  if mesh is None or not jax.tree.leaves(state):
    return jax.tree.map(cast, state)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(lambda s: jax.tree.map(cast, s), out_shardings=shardings)(state)


def create_state(config, student, prior_model=None, mesh=None, rules=None) -> TrainState:
  """The initial :class:`TrainState` of a student and an optional prior.

  Frozen weights (a LoRA student's base weights, a separate prior) are held in their model's
  compute dtype when ``config.frozen_weights`` is 'compute_dtype' (the default): they are only
  ever read in that dtype, so float32 copies would cost memory and a cast at every use (only
  narrowing casts are made). 'param_dtype' keeps them as loaded. A LoRA student's exported
  weights (adapters merged) then carry base weights rounded to the compute dtype.

  With a ``mesh`` (and the parameter ``rules``), the optimizer state is initialised under
  ``jit`` straight into the parameters' shardings and the small leaves are replicated; the
  models' arrays are expected on their shardings already (see
  :func:`qtarget.train.loading.load_model`). Without one, arrays stay where they are.
  """
  hyper, static = hyperparameters(config)
  if not targets.needs_prior(config.method):
    prior_mode = 'none'
  elif (config.get('prior') or {}).get('source') == 'cached':  # rows come with the batches
    if prior_model is not None:
      raise ConfigError("prior.source='cached' reads the prior from its cache: pass no "
                        'prior_model.')
    prior_mode = 'cached'
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
  frozen_weights = config.get('frozen_weights', 'compute_dtype')
  if frozen_weights not in FROZEN_WEIGHTS:
    raise ConfigError(f'frozen_weights must be one of {FROZEN_WEIGHTS}, got {frozen_weights!r}.')
  if frozen_weights == 'compute_dtype':
    frozen = _frozen_in(frozen, student.config.compute_dtype, mesh)
    if prior_mode == 'separate':
      prior_state = _frozen_in(prior_state, prior_model.config.compute_dtype, mesh)
  tx, schedule = make_optimizer(config)
  sharding_lib.check_batch(config.batch_size, config.accum_steps)
  if config.loss not in checks.LOSSES:
    raise ConfigError(f"loss must be 'dense' or 'fused', got {config.loss!r}.")
  head_grad_accumulation = config.get('loss_head_grad_accumulation', 'float32')
  if head_grad_accumulation not in checks.HEAD_GRAD_ACCUMULATIONS:
    raise ConfigError("loss_head_grad_accumulation must be 'float32' or 'head_dtype', got "
                      f'{head_grad_accumulation!r}.')
  if config.loss == 'fused':
    if prior_model is not None and prior_model.config.vocab_size < student.config.vocab_size:
      raise ConfigError('the fused loss needs a prior vocabulary at least as large as the '
                        "student's; use loss='dense'.")
  spec = StepSpec(method=config.method, prior=prior_mode, accum_steps=config.accum_steps,
                  vocab_size=student.config.vocab_size, loss=config.loss, tx=tx,
                  schedule=schedule, static_hyperparameters=static,
                  chunk_size=config.loss_chunk_size,
                  head_grad_accumulation=head_grad_accumulation,
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
