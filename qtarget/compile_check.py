r"""Compile the real train step ahead of time for a TPU pod slice or for fake CPU devices.

    python -m qtarget.compile_check --config configs/NAME.py --topology v5e:4x4 [--config.k=v]
    python -m qtarget.compile_check --config configs/NAME.py --cpu-devices 8 [--config.k=v]
        [--json report.json] [--hlo step.hlo.txt]

Builds the config's mesh over the named topology's devices (libtpu describes them; nothing runs)
or over N fake CPU devices, lowers and compiles :func:`qtarget.train.train_step` (student,
prior, optimizer, the configured loss) from ``ShapeDtypeStruct`` inputs with the real shardings,
and reports per-device memory (against the chip's HBM on a TPU), the step's FLOPs, the
collectives the partitioned program runs (count and bytes of their results), and whether it
fits, with what to change when it does not. ``--json`` writes the report, ``--hlo`` the compiled
program's text. TPU topologies need the ``tpu`` extra (``pip install -e .[tpu]``).

Model shapes come from the checkpoint's config.json (a GGUF source: the file's metadata) when
the path exists, else from ``model.architecture`` / ``prior.architecture`` in the config, so a
plan can be checked before the weights are downloaded.
"""

import dataclasses
import json
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
from flax import nnx

from qtarget import hlo
from qtarget import targets
from qtarget import train
from qtarget.models import llama

GIB = 2 ** 30
# HBM per chip by the device_kind libtpu reports.
HBM_BYTES = {'TPU v4': 32 * GIB, 'TPU v5 lite': 16 * GIB, 'TPU v5e': 16 * GIB,
             'TPU v5': 95 * GIB, 'TPU v5p': 95 * GIB, 'TPU v6 lite': 32 * GIB,
             'TPU v6e': 32 * GIB}


@dataclasses.dataclass
class Report:
  """Per-device memory of the compiled step (bytes) and what it means."""
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  generated_code: int
  hbm: int | None
  flops: float | None
  suggestions: list
  compiler_message: str = ''  # the TPU compiler's own words when it refused the plan
  model_flops: float | None = None  # analytic matmul FLOPs per step per device
  collectives: dict = dataclasses.field(default_factory=dict)  # kind -> count, result bytes
  hlo_text: str = dataclasses.field(default='', repr=False)  # the compiled program

  def to_json(self) -> dict:
    """The report as JSON data (without the program text)."""
    data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != 'hlo_text'}
    data.update(total=self.total, fits=self.fits)
    return data

  @property
  def total(self) -> int:
    """Peak per-device bytes: arguments + outputs + temporaries + generated code, less donated
    (aliased) outputs."""
    return self.arguments + self.outputs + self.temporaries + self.generated_code - self.aliased

  @property
  def fits(self) -> bool | None:
    return None if self.hbm is None else self.total <= self.hbm

  def table(self) -> str:
    gib = lambda b: f'{b / GIB:.2f}'
    lines = [
        f'topology {self.topology}: {self.num_devices} x {self.device_kind}, HBM '
        f'{gib(self.hbm) if self.hbm else "unknown"} GiB per device; mesh {self.mesh}',
        '| per device | GiB |', '|---|---|',
        f'| arguments (parameters, optimizer state, prior, batch) | {gib(self.arguments)} |',
        f'| outputs | {gib(self.outputs)} |',
        f'| donated (outputs aliasing arguments) | -{gib(self.aliased)} |',
        f'| temporaries | {gib(self.temporaries)} |',
        f'| generated code | {gib(self.generated_code)} |',
        f'| **total** | **{gib(self.total)}** |',
        'collectives per device (each written instruction once; results in MiB): ' + (
            ', '.join(f"{kind} {c['count']} x ({c['bytes'] / 2 ** 20:.2f})"
                      for kind, c in self.collectives.items()) or 'none'),
        f'FLOPs per step per device: {self.model_flops:.3e} from the parameter count (6 N T for '
        'the student, 2 N T more with remat, 2 N T for the prior; attention not counted)',
        f'FLOPs per step per device, compiled cost analysis: {self.flops:.3e} (counts each loop '
        'body once: one micro-batch, one fused-loss chunk)' if self.flops else
        'FLOPs per step per device, compiled cost analysis: not reported']
    if self.compiler_message:
      lines.append(f'the TPU compiler refused the plan: {self.compiler_message}')
    if self.fits is True:
      lines.append(f'fits: yes, {gib(self.hbm - self.total)} GiB of {gib(self.hbm)} GiB left')
    elif self.fits is False:
      lines.append(f'fits: NO, over by {gib(self.total - self.hbm)} GiB '
                   f'({self.total / self.hbm:.2f}x the HBM). Try: ' + '; '.join(self.suggestions))
    return '\n'.join(lines)


_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def _compiler_bytes(message: str, what: str) -> int | None:
  """Bytes the XLA TPU compiler names in an out-of-memory message, e.g. 'temporaries (28.27G)'."""
  match = re.search(what + r'[^(]*\(([\d.]+)([KMGT]?)\)', message)
  return None if match is None else int(float(match.group(1)) * _UNITS[match.group(2)])


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _architecture(model_config, overrides: dict) -> llama.LlamaConfig:
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(model_config.path) if model_config.path else None
  if model_config.source == 'hf' and path is not None and (path / 'config.json').exists():
    return checkpoints.config_from_hf(json.loads((path / 'config.json').read_text()),
                                      **overrides)
  if model_config.source == 'gguf':
    return checkpoints.config_from_gguf(checkpoints.gguf_reader(path), **overrides)
  if len(model_config.architecture):
    return llama.LlamaConfig(**dict(model_config.architecture), **overrides)
  raise train.ConfigError(
      f'no shapes for the model at {model_config.path!r}: the path has no config.json; set '
      '--config.model.architecture (or prior.architecture) to the LlamaConfig fields.')


def student_vocab_size(config) -> int:
  """The student's embedding rows, from its config file or fields (no weights are read)."""
  return _architecture(config.model, {}).vocab_size


def model_configs(config) -> tuple[llama.LlamaConfig, llama.LlamaConfig | None]:
  """The student's and (if the step runs a separate one) the prior's architecture."""
  student = _architecture(config.model, train.model_overrides(config.model))
  if not targets.needs_prior(config.method) or config.prior.source == 'cached':
    return student, None  # a cached prior's rows come with the batch
  if config.prior.source == 'initial':
    if config.model.lora_rank > 0:
      return student, None  # the student with adapters off
    return student, dataclasses.replace(student, lora_rank=0)
  return student, _architecture(config.prior, {**train.model_overrides(config.prior),
                                               'lora_rank': 0})


def _suggestions(config, report_mesh: dict, num_devices: int) -> list:
  tips = []
  if report_mesh['fsdp'] < num_devices:
    tips.append(f"a larger fsdp axis (--config.mesh.fsdp=-1 shards parameters and optimizer state "
                f"over all {num_devices} chips)")
  if llama.remat_name(config.model.remat) == 'none':
    tips.append('rematerialization (--config.model.remat=full)')
  if config.loss == 'dense':
    tips.append("the fused loss (--config.loss=fused: no tokens x vocabulary logits)")
  tips.append('a smaller per-device batch (lower batch_size, or raise accum_steps)')
  if config.model.lora_rank == 0:
    tips.append('LoRA (--config.model.lora_rank=16: no optimizer state for the base weights, and '
                'the prior can be the student without adapters)')
  return tips


def _devices(topology_name: str | None, cpu_devices: int | None):
  if (topology_name is None) == (cpu_devices is None):
    raise train.ConfigError('name exactly one of a TPU topology (--topology) or a number of '
                            'fake CPU devices (--cpu-devices).')
  if cpu_devices is not None:
    available = jax.devices('cpu')
    if cpu_devices < 1 or len(available) < cpu_devices:
      raise train.ConfigError(
          f'--cpu-devices {cpu_devices}: this process has {len(available)} CPU device(s); set '
          f'XLA_FLAGS=--xla_force_host_platform_device_count={cpu_devices} before JAX starts '
          '(python -m qtarget.compile_check does it for you).')
    return available[:cpu_devices]
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(platform='tpu', topology_name=topology_name)
  except Exception as error:  # libtpu raises its own types
    raise train.ConfigError(f'cannot describe TPU topology {topology_name!r}: {error} (is the '
                            'tpu extra installed: pip install -e ".[tpu]"?)') from error
  return topology.devices


def abstract_inputs(config, devices, architectures=None):
  """``(jitted step, state, batch, mesh)``: the configured step over ``devices`` and its
  inputs as ShapeDtypeStructs with their shardings. ``architectures``: the result of
  :func:`model_configs`, when the caller has it already."""
  mesh = train.build_mesh(config.mesh, devices)
  student_config, prior_config = architectures or model_configs(config)
  train.check_layout(mesh, batch_size=config.batch_size, accum_steps=config.accum_steps,
                     model_configs=(student_config, prior_config))

  def make_state():
    student = llama.Llama(student_config, rngs=nnx.Rngs(0))
    prior = None if prior_config is None else llama.Llama(prior_config, rngs=nnx.Rngs(1))
    return train.create_state(config, student, prior)

  abstract = jax.eval_shape(make_state)
  rules = train.config_rules(config)
  step, shardings = train.jit_train_step(abstract, mesh, rules)
  state_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  batch_sharding = train.batch_sharding(mesh, rules)
  dtypes = {'tokens': jnp.int32, 'targets': jnp.int32, 'loss_mask': jnp.bool_,
            'segment_ids': jnp.int32, 'positions': jnp.int32}
  shape = (config.batch_size, config.data.seq_len)
  shapes = dict.fromkeys(dtypes, shape)
  if abstract.spec.prior == 'cached':
    k = config.prior.cache.k
    dtypes.update(prior_token_ids=jnp.int32, prior_log_probs=jnp.float32,
                  prior_tail_log_mass=jnp.float32)
    shapes.update(prior_token_ids=shape + (k,), prior_log_probs=shape + (k,),
                  prior_tail_log_mass=shape)
  batch = {key: jax.ShapeDtypeStruct(shapes[key], dtype, sharding=batch_sharding)
           for key, dtype in dtypes.items()}
  return step, state_in, batch, mesh


def check(config, topology_name: str | None = None, *, cpu_devices: int | None = None) -> Report:
  """Compiles the configured step for ``topology_name`` (e.g. 'v5e:4x4') or for
  ``cpu_devices`` fake CPU devices, and measures it."""
  devices = _devices(topology_name, cpu_devices)
  train.checks.resolve_method(config)  # a design object in the config is registered by name
  student_config, prior_config = model_configs(config)
  step, state_in, batch, mesh = abstract_inputs(config, devices,
                                                (student_config, prior_config))
  rows, length = config.batch_size, config.data.seq_len
  kind = devices[0].device_kind
  cores_per_chip = max(getattr(d, 'core_on_chip', 0) for d in devices) + 1
  hbm = HBM_BYTES.get(kind)
  tokens = rows * length
  student_factor = 6 if student_config.remat == 'none' else 8
  model_flops = student_factor * student_config.num_parameters() * tokens
  if prior_config is not None:
    model_flops += 2 * prior_config.num_parameters() * tokens
  elif targets.needs_prior(config.method) and config.prior.source != 'cached':
    model_flops += 2 * student_config.num_parameters() * tokens  # the student without adapters
  common = dict(topology=topology_name or f'{len(devices)} fake CPU devices', device_kind=kind,
                num_devices=len(devices), mesh=dict(mesh.shape),
                model_flops=model_flops / len(devices),
                hbm=None if hbm is None else hbm // cores_per_chip,  # v4: 2 devices a chip
                suggestions=_suggestions(config, dict(mesh.shape), len(devices)))
  lowered = step.lower(state_in, batch)
  try:
    compiled = lowered.compile()
  except Exception as error:  # pylint: disable=broad-except
    message = str(error)
    if 'RESOURCE_EXHAUSTED' not in message:
      raise
    # The compiler refuses plans that cannot fit: report what it said, with our own count of the
    # arguments (the state is donated, so its outputs reuse the same memory).
    state_bytes = _per_device_bytes(state_in)
    temporaries = _compiler_bytes(message, 'temporaries') or 0
    first_line = message.split('\n')[0].split('RESOURCE_EXHAUSTED: ')[-1]
    return Report(arguments=state_bytes + _per_device_bytes(batch), outputs=state_bytes,
                  aliased=state_bytes, temporaries=temporaries, generated_code=0, flops=None,
                  compiler_message=first_line[:400], **common)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  text = compiled.as_text()
  return Report(arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                temporaries=memory.temp_size_in_bytes, aliased=memory.alias_size_in_bytes,
                generated_code=memory.generated_code_size_in_bytes,
                flops=(cost or {}).get('flops'), collectives=hlo.collective_summary(text),
                hlo_text=text, **common)


def main(argv) -> None:
  del argv
  # Run on the CPU: a TPU is only described, never opened (no TPU is needed).
  if _CPU_DEVICES.value:
    flag = f'--xla_force_host_platform_device_count={_CPU_DEVICES.value}'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
  jax.config.update('jax_platforms', 'cpu')
  config = _CONFIG.value
  student, prior = model_configs(config)
  prior_text = ('cached top-k rows in the batch' if config.prior.source == 'cached' else
                'the student without adapters' if prior is None else
                f'{prior.num_parameters():,} parameters')
  print(f'[qtarget] student: {student.num_parameters():,} parameters; prior: {prior_text}'
        f'; batch {config.batch_size} x {config.data.seq_len}; loss {config.loss}', flush=True)
  topology = _TOPOLOGY.value
  if topology is None and not _CPU_DEVICES.value:
    topology = 'v5e:2x2'
  try:
    report = check(config, topology, cpu_devices=_CPU_DEVICES.value)
  except train.ConfigError as error:
    raise SystemExit(f'[qtarget] compile_check: {error}') from None
  print(report.table(), flush=True)
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(report.to_json(), indent=2) + '\n')
    print(f'[qtarget] report written to {_JSON.value}')
  if _HLO.value:
    pathlib.Path(_HLO.value).write_text(report.hlo_text)
    print(f'[qtarget] compiled program written to {_HLO.value}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file',
                                            lock_config=True)
  _TOPOLOGY = flags.DEFINE_string('topology', None, 'a TPU topology name libtpu knows, e.g. '
                                  'v4:2x2x1, v5e:4x4, v5p:2x2x2 (default v5e:2x2 unless '
                                  '--cpu-devices is given)')
  _CPU_DEVICES = flags.DEFINE_integer('cpu-devices', None, 'compile for this many fake CPU '
                                      'devices instead of a TPU topology')
  _JSON = flags.DEFINE_string('json', None, 'write the report as JSON to this path')
  _HLO = flags.DEFINE_string('hlo', None, 'write the compiled program (HLO text) to this path')
  app.run(main)
