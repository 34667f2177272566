"""What each device computes and holds under each mesh, from the compiled train step.

    python benchmarks/sharding.py [--shapes tiny,smollm2] [--accum-steps 1] [--loss dense]
        [--meshes 8x1x1,1x8x1,2x4x1,2x2x2] [--json OUT.json]

Compiles the real train step (Target-SFT with a separate prior; dense loss and accum_steps 1 unless
told otherwise) for 8 fake CPU devices under the meshes (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,4,1), (2,2,2), and
for one device, and prints per device: FLOPs (compiled cost analysis) as a ratio to one device's
/ 8, temporaries, and collectives (count and result bytes) read from the HLO text. Nothing is
timed. Only APIs that predate the sharding rewrite are used, so the same script measures an
older checkout (copy ``qtarget/hlo.py`` into it first).
"""

import argparse
import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from qtarget import config_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from qtarget import hlo  # pylint: disable=g-import-not-at-top,wrong-import-position
from qtarget import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from qtarget.models import llama  # pylint: disable=g-import-not-at-top,wrong-import-position

SHAPES = {
    # The tests' tiny model widened (as in the issue): H=512, V=8192, batch 16 x 256.
    'tiny': (dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_layers=2,
                  num_heads=4, num_kv_heads=2, tie_word_embeddings=True), 16, 256),
    # SmolLM2-135M's shape, batch 16 x 256.
    'smollm2': (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                     tie_word_embeddings=True), 16, 256),
    # tests/test_sharding.py's shape: H=128, V=1024, batch 16 x 24.
    'test': (dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                  num_heads=4, num_kv_heads=2, tie_word_embeddings=True), 16, 24),
}
MESHES = ((8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2))


def _config(arch, rows, length, mesh, accum_steps=1, loss='dense'):
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'tiny.py')
  config = config_files.load_module(root).get_config()
  config.model.architecture = ml_collections.ConfigDict(arch)
  config.batch_size, config.data.seq_len = rows, length
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  config.accum_steps, config.loss, config.loss_chunk_size = accum_steps, loss, 4096
  return config


def measure(arch, rows, length, mesh, accum_steps=1, loss='dense') -> dict:
  """FLOPs (one loop trip: one micro-batch, one loss chunk), temporaries and collectives."""
  config = _config(arch, rows, length, mesh, accum_steps, loss)
  model_config = llama.LlamaConfig(**arch)
  if model_config.num_heads % mesh[2] or model_config.num_kv_heads % mesh[2]:
    return {'skipped': f'tensor={mesh[2]} does not divide {model_config.num_heads} heads / '
                       f'{model_config.num_kv_heads} KV heads'}

  def make_state():
    return train.create_state(config, llama.Llama(model_config, rngs=nnx.Rngs(0)),
                              llama.Llama(model_config, rngs=nnx.Rngs(1)))

  abstract = jax.eval_shape(make_state)
  devices = jax.devices()[:mesh[0] * mesh[1] * mesh[2]]
  built = train.build_mesh(config.mesh, devices)
  rules = train.config_rules(config)
  step, shardings = train.jit_train_step(abstract, built, rules)
  batch_sharding = train.batch_sharding(built)
  batch = {key: jax.ShapeDtypeStruct((rows, length), jnp.bool_ if key == 'loss_mask'
                                     else jnp.int32, sharding=batch_sharding)
           for key in ('tokens', 'targets', 'loss_mask', 'segment_ids', 'positions')}
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, shardings)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  return {'flops': cost['flops'], 'temporaries': memory.temp_size_in_bytes,
          'arguments': memory.argument_size_in_bytes,
          'collectives': hlo.collective_summary(compiled.as_text())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='tiny,smollm2')
  parser.add_argument('--accum-steps', type=int, default=1)
  parser.add_argument('--loss', default='dense', choices=('dense', 'fused'))
  parser.add_argument('--meshes', default=','.join('x'.join(map(str, m)) for m in MESHES))
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  results = {}
  for name in args.shapes.split(','):
    if name not in SHAPES:
      sys.exit(f'unknown shape {name!r}; choose from {", ".join(SHAPES)}')
    arch, rows, length = SHAPES[name]
    one = measure(arch, rows, length, (1, 1, 1), 1, args.loss)
    results[name] = {'1x1x1': one}
    print(f'## {name}: batch {rows} x {length}, accum_steps {args.accum_steps}, {args.loss} loss; '
          f'one device (accum_steps 1): {one["flops"]:.3e} FLOPs, '
          f'temporaries {one["temporaries"] / 2 ** 20:.1f} MiB', flush=True)
    print('| mesh (data, fsdp, tensor) | FLOPs / (one device / 8) | temporaries MiB | '
          'collectives: count x result MiB |')
    print('|---|---|---|---|')
    for mesh in [tuple(int(n) for n in m.split('x')) for m in args.meshes.split(',')]:
      entry = measure(arch, rows, length, mesh, args.accum_steps, args.loss)
      results[name]['x'.join(map(str, mesh))] = entry
      if 'skipped' in entry:
        print(f'| {mesh} | {entry["skipped"]} | | |', flush=True)
        continue
      collectives = ', '.join(f"{kind} {c['count']} x {c['bytes'] / 2 ** 20:.1f}"
                              for kind, c in entry['collectives'].items())
      print(f'| {mesh} | {entry["flops"] / (one["flops"] / 8):.2f} | '
            f'{entry["temporaries"] / 2 ** 20:.1f} | {collectives} |', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
