"""Logical axis names -> mesh axes, for parameters and activations alike.

Parameters carry logical axis names as ``logical_axes`` metadata (``embed``, ``mlp``, ``heads``,
``kv``, ``vocab``, ``lora``); activations are constrained inside the model with
:func:`constrain` under names such as ``activation_batch``. Rules map a name to a mesh axis, a
tuple of mesh axes, or None (replicated), and are data (kept in the config).

Flax's own ``out_sharding`` metadata shards a variable when it is created and refuses to create
one without a mesh in context, which would make every model built for evaluation, export or a
test need a mesh; the names stay our metadata and this module resolves them. The mesh itself
comes from ``jax.make_mesh``.

Outside :func:`activation_layout` (evaluation, a single device) :func:`constrain` does nothing.
"""

import contextlib
import math
import threading

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The default rules, the one place they are written (configs/smollm2_demo.py sets its fields to
# them; a config changes only the axes it names, :func:`merged_rules` fills in the rest).
# Parameters: one large dimension over fsdp (gathered per layer when used: ZeRO-3), the
# vocabulary, heads and MLP columns over tensor, LoRA adapters replicated.
DEFAULT_PARAMETER_RULES = (
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', 'tensor'),
    ('lora', None),
)
# Activations: the batch over every data-parallel axis, heads and MLP columns over tensor.
DEFAULT_ACTIVATION_RULES = (
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
)

_ACTIVE = threading.local()


def merged_rules(parameter_rules=(), activation_rules=()) -> dict:
  """One dict of rules: the defaults above, with ``parameter_rules`` and then
  ``activation_rules`` (pairs or dicts of logical axis -> mesh axes) over them."""
  return {**dict(DEFAULT_PARAMETER_RULES), **dict(DEFAULT_ACTIVATION_RULES),
          **dict(parameter_rules), **dict(activation_rules)}


def mesh_axes(target) -> tuple:
  """A rule's target as a tuple of mesh axis names: None -> (), 'fsdp' -> ('fsdp',)."""
  if target is None:
    return ()
  return tuple(target) if isinstance(target, (tuple, list)) else (target,)


def logical_to_spec(axes, rules: dict) -> PartitionSpec:
  """PartitionSpec of logical axis names under ``rules`` (name -> mesh axis, tuple or None).

  A mesh axis shards at most one dimension of an array: a later dimension asking for a mesh
  axis already used stays replicated.
  """
  if axes is None:
    return PartitionSpec()
  spec, used = [], set()
  for name in axes:
    wanted = tuple(a for a in mesh_axes(rules.get(name)) if a not in used)
    used.update(wanted)
    spec.append(None if not wanted else wanted[0] if len(wanted) == 1 else wanted)
  return PartitionSpec(*spec)


def fit_spec(shape, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Replicates a dimension that its mesh axes do not divide (small tensors, odd vocabularies);
  mesh axes the mesh lacks are dropped (a mesh without ``tensor`` still takes the rules)."""
  fixed = []
  for dim, target in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = tuple(a for a in mesh_axes(target) if a in mesh.shape)
    size = math.prod(mesh.shape[a] for a in axes)
    fixed.append(None if not axes or dim % size else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*fixed)


def sharding_for(shape, axes, rules: dict, mesh: Mesh) -> NamedSharding:
  """The NamedSharding of an array of ``shape`` with logical ``axes``."""
  return NamedSharding(mesh, fit_spec(shape, logical_to_spec(axes, rules), mesh))


def variable_sharding(variable, rules: dict, mesh: Mesh) -> NamedSharding:
  """The NamedSharding of an ``nnx.Variable`` (concrete or abstract) by its logical axes."""
  return sharding_for(variable.get_value().shape, variable.get_metadata().get('logical_axes'),
                      rules, mesh)


@contextlib.contextmanager
def activation_layout(mesh: Mesh | None, rules: dict):
  """Within this context (while tracing a step), :func:`constrain` shards activations."""
  previous = getattr(_ACTIVE, 'layout', None)
  _ACTIVE.layout = None if mesh is None else (mesh, dict(rules))
  try:
    yield
  finally:
    _ACTIVE.layout = previous


def active_mesh() -> Mesh | None:
  layout = getattr(_ACTIVE, 'layout', None)
  return None if layout is None else layout[0]


def active_rules() -> dict:
  layout = getattr(_ACTIVE, 'layout', None)
  return {} if layout is None else layout[1]


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
  """``x`` constrained to the sharding of its logical ``axes`` under the active layout."""
  layout = getattr(_ACTIVE, 'layout', None)
  if layout is None:
    return x
  mesh, rules = layout
  return jax.lax.with_sharding_constraint(x, sharding_for(x.shape, axes, rules, mesh))
