"""The mesh, the rules that place parameters and activations on it, and the jitted step.

Mesh axes ``data``, ``fsdp``, ``tensor`` (``jax.make_mesh``: the device order follows the
topology). Parameters: one large dimension over ``fsdp`` (gathered per layer when used: ZeRO-3),
heads and MLP columns over ``tensor``; optimizer state like the parameters. Activations: the
batch over ``(data, fsdp)``, never gathered across the batch (see
:mod:`qtarget.models.layout`). Rules (logical axis -> mesh axis) are data: their defaults are
written once in :mod:`qtarget.models.layout`, a config changes the axes it names, and
:func:`config_rules` merges the two for every user.
"""

import dataclasses
import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qtarget.models import layout
from qtarget.train import step as step_lib
from qtarget.train.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
logical_to_spec = layout.logical_to_spec


def build_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all); one axis may be -1 (the rest)."""
  shape = [int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor)]
  devices = jax.devices() if devices is None else list(devices)
  if shape.count(-1) > 1:
    raise ConfigError(f'mesh {shape}: at most one axis may be -1.')
  if any(size == 0 or size < -1 for size in shape):
    raise ConfigError(f'mesh {shape}: each axis is a positive size or -1 (the rest).')
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ConfigError(f'mesh {shape} does not divide the {len(devices)} devices; set the '
                        'mesh axes (--config.mesh.data/fsdp/tensor) to a factorization of '
                        f'{len(devices)}.')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ConfigError(f'mesh {shape} needs {math.prod(shape)} devices; there are '
                      f'{len(devices)}. Set --config.mesh.data/fsdp/tensor so that their product '
                      f'is {len(devices)} (one of them may be -1).')
  try:
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
  except (ValueError, NotImplementedError):  # an unusual topology: keep the given order
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def config_rules(config) -> dict:
  """The rules a run of ``config`` places parameters and activations by: the defaults of
  :mod:`qtarget.models.layout` with the config's ``sharding_rules`` (parameters) and
  ``activation_rules`` over them. The trainer, ``compile_check``, ``cache_prior`` and the
  benchmarks all take their rules from here."""
  return layout.merged_rules(config.get('sharding_rules', ()), config.get('activation_rules', ()))


def batch_devices(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def check_batch(batch_size: int, accum_steps: int) -> None:
  """Raises :class:`ConfigError` unless ``accum_steps`` micro-batches split the batch."""
  if accum_steps < 1:
    raise ConfigError(f'accum_steps must be >= 1, got {accum_steps}.')
  if batch_size % accum_steps:
    raise ConfigError(f'batch_size {batch_size} is not divisible by accum_steps {accum_steps}.')


def check_layout(mesh: Mesh, *, batch_size: int, accum_steps: int, model_configs=()) -> None:
  """Raises :class:`ConfigError` naming the numbers when the mesh cannot divide the work."""
  shards = batch_devices(mesh)
  check_batch(batch_size, accum_steps)
  micro = batch_size // accum_steps
  if micro % shards:
    raise ConfigError(
        f'the micro-batch of {micro} rows (batch_size {batch_size} / accum_steps {accum_steps}) '
        f'does not split over data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]} = '
        f'{shards} devices; make batch_size / accum_steps a multiple of {shards} (for example '
        f'--config.batch_size={shards * accum_steps * max(1, -(-micro // shards))}).')
  tensor = mesh.shape['tensor']
  for config in model_configs:
    if config is None:
      continue
    for what, count in (('attention heads', config.num_heads),
                        ('KV heads', config.num_kv_heads)):
      if count % tensor:
        raise ConfigError(
            f'the tensor axis of {tensor} devices does not divide the model\'s {count} {what}; '
            f'choose --config.mesh.tensor among the divisors of {config.num_kv_heads} '
            '(and move the other devices to fsdp or data).')


@dataclasses.dataclass(frozen=True)
class Layout:
  """The mesh and the rules of one compiled step (parameters' and activations' together)."""
  mesh: Mesh
  rules: tuple

  @classmethod
  def create(cls, mesh: Mesh, rules: dict) -> 'Layout':
    merged = {**dict(layout.DEFAULT_ACTIVATION_RULES), **dict(rules)}
    return cls(mesh, tuple(sorted(merged.items(), key=lambda kv: kv[0])))

  @property
  def rules_dict(self) -> dict:
    return dict(self.rules)


def state_shardings(abstract_state, mesh: Mesh, rules: dict):
  """Shardings for a state pytree: Variables by their logical axes, the rest replicated."""
  is_variable = lambda x: isinstance(x, nnx.Variable)

  def sharding(leaf):
    if is_variable(leaf):
      return leaf.replace(layout.variable_sharding(leaf, rules, mesh))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(sharding, abstract_state, is_leaf=is_variable)


def batch_sharding(mesh: Mesh, rules: dict | None = None) -> NamedSharding:
  """Rows of a batch over the activation batch axes (``(data, fsdp)`` by default)."""
  rules = {**dict(layout.DEFAULT_ACTIVATION_RULES), **dict(rules or {})}
  return NamedSharding(mesh, layout.logical_to_spec(('activation_batch', None), rules))


def jit_train_step(abstract_state, mesh: Mesh, rules: dict):
  """``train_step`` jitted with in/out shardings, activations laid out by ``rules``, the state
  donated. Returns ``(step_fn, state_shardings)``."""
  the_layout = Layout.create(mesh, rules)
  shardings = state_shardings(abstract_state, mesh, the_layout.rules_dict)
  batch = {key: batch_sharding(mesh, the_layout.rules_dict)
           for key in step_lib.batch_keys(abstract_state.spec)}
  replicated = NamedSharding(mesh, PartitionSpec())
  step = functools.partial(step_lib.train_step, layout=the_layout)
  return jax.jit(step, in_shardings=(shardings, batch), out_shardings=(shardings, replicated),
                 donate_argnums=0), shardings
