"""The sharded step divides the work: proven from the compiled program on 8 fake CPU devices.

Per-device shapes, FLOPs, collectives and temporaries are read from the partitioned HLO and
``memory_analysis()``; equality with one device is checked separately (numbers agreeing on a
mesh prove correctness, not that the work is divided).
"""

import functools
import gc
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import test_train_step
import xla_flags
from qtarget import checkpoints
from qtarget import compile_check
from qtarget import hlo
from qtarget import train
from qtarget.models import llama

ROWS, LENGTH = 16, 24  # the global batch; 24 and 16 x 24 = 384 are no parameter dimension
WIDE = {'model.architecture.hidden_size': 128, 'model.architecture.intermediate_size': 256,
        'model.architecture.vocab_size': 1024, 'loss_chunk_size': 4096}


def _config(mesh, accum_steps=1, loss='dense', lora_rank=0):
  data, fsdp, tensor = mesh
  return test_train_step.tiny_config(**{
      **WIDE, 'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor,
      'accum_steps': accum_steps, 'loss': loss, 'model.lora_rank': lora_rank,
      'batch_size': ROWS, 'data.seq_len': LENGTH})


@functools.lru_cache(maxsize=None)
def _compiled(mesh, accum_steps=1, loss='dense', lora_rank=0):
  """``(compiled step, abstract state)`` for a mesh over the first prod(mesh) devices."""
  config = _config(mesh, accum_steps, loss, lora_rank)
  step, state, batch, _ = compile_check.abstract_inputs(config,
                                                        jax.devices()[:int(np.prod(mesh))])
  return step.lower(state, batch).compile(), state


def _flops(compiled):
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']


def _carries_the_global_batch(dims, rows):
  """Whether an array's dimensions hold ``rows`` whole rows of the batch: [rows, T, ...] or the
  flattened [rows * T, ...] token axis."""
  pairs = any(dims[i:i + 2] == (rows, LENGTH) for i in range(len(dims) - 1))
  return pairs or rows * LENGTH in dims


def _parameter_shapes(abstract):
  """Shapes of every parameter, where a stacked (scanned) parameter counts one layer only: a
  whole [layers, ...] stack gathered at once (hoisted out of the scan) is not ZeRO-3."""
  trees = (abstract.params, abstract.frozen, abstract.prior)
  shapes = set()
  for tree in trees:
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      stacked = 'layers' in jax.tree_util.keystr(path)
      shapes.add(tuple(x.shape[1:] if stacked else x.shape))
  return shapes


# (mesh, accum_steps, loss, lora_rank). The default run: both losses under fsdp=8 (where the
# ZeRO-3 checks apply) and on data x fsdp x tensor, accumulation and the LoRA-off prior under
# fsdp=8. The rest of the product is marked slow (python -m pytest -m slow
# tests/test_sharding.py).
_DEFAULT = ([(mesh, 1, 'dense', 0) for mesh in ((1, 8, 1), (2, 2, 2))]
            + [((1, 8, 1), 1, 'fused', 0), ((2, 2, 2), 1, 'fused', 0)]
            + [((1, 8, 1), 2, 'dense', 0), ((1, 8, 1), 1, 'dense', 4)])
_ALL = [(mesh, accum, loss, lora) for mesh in ((8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2))
        for accum in (1, 2) for loss in ('dense', 'fused') for lora in (0, 4)]
CASES = [pytest.param(*case, marks=() if case in _DEFAULT else pytest.mark.slow,
                      id=f'{case[0][0]}x{case[0][1]}x{case[0][2]}-accum{case[1]}-{case[2]}-'
                         f'{"lora_off" if case[3] else "separate"}')
         for case in _ALL]


@pytest.mark.parametrize('mesh, accum_steps, loss, lora_rank', CASES)
def test_compiled_step_divides_the_work(mesh, accum_steps, loss, lora_rank):
  compiled, abstract = _compiled(mesh, accum_steps, loss, lora_rank)
  text = compiled.as_text()
  # No per-device array holds the whole batch, or the whole micro-batch.
  micro_rows = ROWS // accum_steps
  whole = sorted(dims for dims in hlo.array_dims(text)
                 if _carries_the_global_batch(dims, ROWS)
                 or _carries_the_global_batch(dims, micro_rows))
  assert not whole, f'per-device arrays carry the global (micro-)batch: {whole[:5]}'
  # ... while the device's own rows do appear (the reader sees the program's arrays).
  local_rows = micro_rows // (mesh[0] * mesh[1])
  assert any(dims[:2] == (local_rows, LENGTH) for dims in hlo.array_dims(text)), local_rows
  if accum_steps == 1:
    one_device, _ = _compiled((1, 1, 1), 1, loss, lora_rank)
    ratio = _flops(compiled) / (_flops(one_device) / 8)
    assert ratio < 1.15, f'per-device FLOPs are {ratio:.2f}x one device / 8'
  if mesh == (1, 8, 1):
    # ZeRO-3: parameters are gathered, activations never.
    parameters = _parameter_shapes(abstract)
    gathered = [i.results for i in hlo.collectives(text) if hlo.collective_kind(i) == 'all-gather']
    assert gathered, 'fsdp=8 must gather parameters'
    activations = [s for shapes in gathered for _, s in [shapes[0]] if s not in parameters]
    assert not activations, f'all-gathers of non-parameters: {activations[:5]}'
    data_parallel, _ = _compiled((8, 1, 1), accum_steps, loss, lora_rank)
    sharded, replicated = compiled.memory_analysis(), data_parallel.memory_analysis()
    if lora_rank == 0:
      ratio = sharded.temp_size_in_bytes / replicated.temp_size_in_bytes
      assert ratio < 1.25, f'temporaries under fsdp=8 are {ratio:.2f}x those under data=8'
    else:
      # LoRA: the base weights are a third of these temporaries (at this width they outweigh
      # the activations), and fsdp holds them gathered as temporaries where data=8 holds them
      # as arguments; measured 1.76x the temporaries for the same total. Compare the totals.
      total = lambda m: m.temp_size_in_bytes + m.argument_size_in_bytes
      ratio = total(sharded) / total(replicated)
      assert ratio < 1.25, f'arguments + temporaries under fsdp=8 are {ratio:.2f}x data=8'


def test_strided_micro_batches_spread_over_every_device():
  batch = {'tokens': jnp.arange(16 * 3).reshape(16, 3)}
  micro = train.strided_micro_batches(batch, 4)['tokens']
  assert micro.shape == (4, 4, 3)
  np.testing.assert_array_equal(micro[1, :, 0], [3, 15, 27, 39])  # rows 1, 5, 9, 13
  # Each of 4 contiguous device blocks (rows 0-3, 4-7, ...) gives one row to each micro-batch.
  for index in range(4):
    rows = np.asarray(micro[index, :, 0]) // 3
    assert sorted(rows // 4) == [0, 1, 2, 3]


@pytest.mark.parametrize('mesh, lora_rank', [
    # The default run: every axis at once with the LoRA-off prior; the rest are slow.
    pytest.param((1, 8, 1), 0, id='fsdp8-separate_prior', marks=pytest.mark.slow),
    pytest.param((2, 2, 2), 4, id='data2_fsdp2_tensor2-lora_off_prior'),
    pytest.param((2, 2, 2), 0, id='data2_fsdp2_tensor2-separate_prior', marks=pytest.mark.slow),
    pytest.param((1, 8, 1), 4, id='fsdp8-lora_off_prior', marks=pytest.mark.slow),
])
def test_sharded_fused_step_equals_single_device(mesh, lora_rank):
  config = test_train_step.tiny_config(**{
      'loss': 'fused', 'loss_chunk_size': 16, 'model.lora_rank': lora_rank, 'accum_steps': 2,
      'mesh.data': mesh[0], 'mesh.fsdp': mesh[1], 'mesh.tensor': mesh[2], 'batch_size': 16})
  student, prior = test_train_step._models(config)
  state = test_train_step._with_sgd(train.create_state(config, student, prior))
  if lora_rank:  # non-zero adapters, so student and prior differ
    state = state.replace(params=jax.tree.map(lambda x: x + 0.01, state.params))
  batch = {k: np.concatenate([v, v[::-1]]) for k, v in test_train_step.make_batch(9).items()}
  expected_state, expected = test_train_step._single_device_step(state, batch)

  built = train.build_mesh(config.mesh)
  rules = train.config_rules(config)
  step_fn, shardings = train.jit_train_step(jax.eval_shape(lambda: state), built, rules)
  sharded = train.place(state, shardings)
  new_state, metrics = step_fn(sharded, {k: jax.device_put(v, train.batch_sharding(built, rules))
                                         for k, v in batch.items()})
  for name in ('loss', 'nll', 'trust', 'accuracy', 'prior_entropy', 'grad_norm'):
    np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, err_msg=name)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # SGD: the gradients agree


def _bytes_per_device():
  held = {}
  for array in jax.live_arrays():
    for shard in array.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def test_loading_goes_straight_into_shards(tmp_path, monkeypatch):
  arch = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2)
  checkpoints.export_hf(llama.Llama(arch, rngs=nnx.Rngs(0)), tmp_path)
  config = test_train_step.tiny_config(**{'mesh.fsdp': 8})
  mesh = train.build_mesh(config.mesh)
  gc.collect()
  before = _bytes_per_device()
  peak = {}
  original = checkpoints._placer

  def measured_placer(mesh, rules):
    place = original(mesh, rules)

    def measured(*args):
      value = place(*args)
      for device, held in _bytes_per_device().items():
        peak[device] = max(peak.get(device, 0), held - before.get(device, 0))
      return value
    measured.sharding = place.sharding
    return measured

  monkeypatch.setattr(checkpoints, '_placer', measured_placer)
  model = checkpoints.load_hf(tmp_path, mesh=mesh, rules=dict(config.sharding_rules))
  values = jax.tree.leaves(nnx.state(model))
  model_bytes = sum(x.nbytes for x in values)
  largest = max(x.nbytes for x in values)
  assert len(peak) == 8
  assert max(peak.values()) <= model_bytes / 8 + largest, (peak, model_bytes, largest)
  for value in values:
    shard = value.addressable_shards[0].data
    if value.shape[-1] % 8 == 0 or value.shape[0] % 8 == 0:  # the embed axis is one of them
      assert shard.size * 8 == value.size, (value.shape, shard.shape)
  # The values are the checkpoint's.
  reference = checkpoints.load_hf(tmp_path)
  for got, want in zip(values, jax.tree.leaves(nnx.state(reference))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_random_initialisation_goes_straight_into_shards():
  arch = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1,
                           num_heads=4, num_kv_heads=2, lora_rank=4)
  config = test_train_step.tiny_config(**{'mesh.fsdp': 8})
  mesh = train.build_mesh(config.mesh)
  model = train.loading.random_model(arch, 3, mesh, dict(config.sharding_rules))
  kernel = model.layers.mlp.gate.kernel[...]  # [layers, embed, mlp]
  assert kernel.addressable_shards[0].data.shape == (1, 64 // 8, 128)
  # The same numbers as one device's init under jit, and as an eager init up to rounding (XLA
  # fuses the scale into the sampling under jit: 1 ulp).
  jitted = jax.jit(lambda: nnx.split(llama.Llama(arch, rngs=nnx.Rngs(3)))[1])()
  np.testing.assert_array_equal(np.asarray(kernel),
                                np.asarray(jitted['layers']['mlp']['gate']['kernel'][...]))
  eager = llama.Llama(arch, rngs=nnx.Rngs(3))
  np.testing.assert_allclose(np.asarray(kernel), np.asarray(eager.layers.mlp.gate.kernel[...]),
                             rtol=0, atol=1e-7)
  state = train.create_state(config, model, None, mesh=mesh, rules=dict(config.sharding_rules))
  mu = state.opt_state[1][0].mu['layers']['mlp']['gate']['lora_a'][...]
  assert mu.sharding.spec[1] == 'fsdp' and mu.addressable_shards[0].data.shape == (1, 8, 4)


@pytest.mark.parametrize('overrides, message', [
    ({'batch_size': 12, 'mesh.fsdp': 8},
     r'micro-batch of 12 rows .* does not split over data x fsdp = 1 x 8 = 8 devices'),
    ({'batch_size': 16, 'accum_steps': 4, 'mesh.fsdp': 8},
     r'micro-batch of 4 rows \(batch_size 16 / accum_steps 4\)'),
    ({'mesh.fsdp': 1, 'mesh.tensor': 8}, r'tensor axis of 8 devices does not divide the '
     r"model's 4 attention heads"),
    ({'mesh.fsdp': 2, 'mesh.tensor': 4}, r"tensor axis of 4 devices does not divide the "
     r"model's 2 KV heads"),
    ({'mesh.data': 3, 'mesh.fsdp': 1}, r'mesh \[3, 1, 1\] needs 3 devices; there are 8'),
])
def test_layout_errors_name_the_numbers(overrides, message):
  config = test_train_step.tiny_config(**overrides)
  arch = llama.LlamaConfig(**dict(config.model.architecture))
  with pytest.raises(train.ConfigError, match=message):
    mesh = train.build_mesh(config.mesh)
    train.check_layout(mesh, batch_size=config.batch_size, accum_steps=config.accum_steps,
                       model_configs=(arch,))


@pytest.mark.slow  # the CLI around compile_check.check, which the sharding tests call directly
def test_compile_check_on_fake_cpu_devices_writes_json_and_hlo(tmp_path):
  report, program = tmp_path / 'report.json', tmp_path / 'step.hlo.txt'
  result = subprocess.run(
      [sys.executable, '-m', 'qtarget.compile_check', '--config', 'configs/tiny.py',
       '--cpu-devices', '8', '--config.batch_size=8', '--config.mesh.fsdp=8',
       '--json', str(report), '--hlo', str(program)],
      capture_output=True, text=True, cwd=test_train_step.CONFIGS.parent, timeout=300,
      env={**__import__('os').environ, 'XLA_FLAGS': xla_flags.with_devices()})
  assert result.returncode == 0, result.stderr[-2000:]
  data = json.loads(report.read_text())
  assert data['num_devices'] == 8 and data['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert data['temporaries'] > 0 and data['flops'] > 0
  assert data['collectives']['all-gather']['count'] > 0
  assert 'all-gather' in program.read_text() and 'collectives per device' in result.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'qtarget.compile_check', '--config', 'configs/tiny.py',
       '--cpu-devices', '8'], capture_output=True, text=True, timeout=300,
      cwd=test_train_step.CONFIGS.parent,
      env={**__import__('os').environ, 'XLA_FLAGS': xla_flags.with_devices()})
  assert bad.returncode != 0 and 'multiple of 8' in bad.stderr and 'Traceback' not in bad.stderr
