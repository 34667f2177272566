"""Attention kernels side by side: forward + backward time, temporaries and error vs reference.

    python benchmarks/attention.py          # CPU: a small shape, float32
    python benchmarks/attention.py --gpu    # Qwen2.5-1.5B's attention, batch 4 x 2048, bfloat16

Rows are packed with segments of 100-700 tokens; one row is left-padded and one right-padded,
as the trainer's batches can be. Each implementation is `qtarget.models.attention.attention`
(plus, on a GPU, points of comparison that are not options: cuDNN given the mask and its own
causal flag, and cuDNN plain causal, which ignores the segments and so bounds what packing
costs). Errors are relative to the reference's largest value, over real (non-padding) queries.
One layer's attention; the train step runs it 28 times (56 with a prior).
"""

import argparse
import json
import pathlib
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from qtarget.models import attention

GPU_SHAPE = dict(batch=4, length=2048, heads=12, kv_heads=2, head_dim=128, dtype='bfloat16')
CPU_SHAPE = dict(batch=4, length=256, heads=4, kv_heads=2, head_dim=32, dtype='float32')


def packed_segment_ids(batch, length, seed=0):
  rng = np.random.default_rng(seed)
  rows = np.zeros((batch, length), np.int32)
  for r in range(batch):
    position, segment = 0, 1
    start = length // 8 if r == 1 else 0  # row 1: left padding
    end = length - length // 8 if r == batch - 1 else length  # last row: right padding
    position = start
    while position < end:
      size = min(int(rng.integers(length // 20, length // 3)), end - position)
      rows[r, position:position + size] = segment
      position, segment = position + size, segment + 1
  return rows


def _comparisons(shape):
  def cudnn_causal(q, k, v, segment_ids):
    del segment_ids
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
  def cudnn_mask_causal(q, k, v, segment_ids):  # the mask plus cuDNN's own causal skip
    mask = attention.causal_segment_mask(segment_ids)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation='cudnn')
  return {'cudnn_mask_causal': cudnn_mask_causal, 'cudnn_causal_unpacked': cudnn_causal}


def _tokamax_kinds(names):
  """tokamax's dot_product_attention by implementation, packed segments as its mask (the
  candidate kernel library of issue 16: measured before it is adopted)."""
  import tokamax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; ours are argparse's, not its
    flags.FLAGS(sys.argv[:1])
  def kind(implementation):
    def run(q, k, v, segment_ids):
      mask = attention.causal_segment_mask(segment_ids)[:, None]
      return tokamax.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                           implementation=implementation)
    return run
  return {f'tokamax_{name}': kind(name) for name in names}


def _measure(fn, q, k, v, segment_ids, cotangent, repeats):
  def forward_backward(q, k, v):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
    return (out,) + pullback(cotangent)
  start = time.perf_counter()
  compiled = jax.jit(forward_backward).lower(q, k, v).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  outputs = jax.block_until_ready(compiled(q, k, v))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.perf_counter() - start)
  return outputs, {'ms': 1e3 * statistics.median(times), 'compile_s': compile_s,
                   'temp_bytes': None if analysis is None else analysis.temp_size_in_bytes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gpu', action='store_true')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--out', default=None)
  parser.add_argument('--tokamax', action='store_true',
                      help="also tokamax's kernels (mosaic, triton, cudnn, xla_chunked; xla on CPU)")
  args = parser.parse_args()
  shape = GPU_SHAPE if args.gpu else CPU_SHAPE
  b, t, n, kv, d = (shape[k] for k in ('batch', 'length', 'heads', 'kv_heads', 'head_dim'))
  dtype = jnp.dtype(shape['dtype'])
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, d), dtype)
  k = jax.random.normal(keys[1], (b, t, kv, d), dtype)
  v = jax.random.normal(keys[2], (b, t, kv, d), dtype)
  cotangent = jax.random.normal(keys[3], (b, t, n, d), dtype)
  segment_ids = jnp.asarray(packed_segment_ids(b, t))
  real = np.asarray(segment_ids > 0)
  kinds = {name: (lambda name: lambda q, k, v, s: attention.attention(
               q, k, v, attention.causal_segment_mask(s), name))(name)
           for name in ('reference', 'xla')}
  if jax.default_backend() == 'gpu':
    kinds['cudnn'] = lambda q, k, v, s: attention.attention(
        q, k, v, attention.causal_segment_mask(s), 'cudnn')
    kinds.update(_comparisons(shape))
  if args.tokamax:
    kinds.update(_tokamax_kinds(('mosaic', 'triton', 'cudnn', 'xla_chunked')
                                if jax.default_backend() == 'gpu' else ('xla',)))
  out = pathlib.Path(args.out or pathlib.Path(__file__).parent / 'results'
                     / f'attention_{jax.default_backend()}.json')
  out.parent.mkdir(exist_ok=True)
  result = {'device': f'{jax.devices()[0].device_kind}, jax {jax.__version__}', 'shape': shape,
            'rows': {}}
  reference = None
  for name, fn in kinds.items():
    try:
      outputs, row = _measure(fn, q, k, v, segment_ids, cotangent, args.repeats)
    except Exception as error:  # pylint: disable=broad-except
      result['rows'][name] = {'error': f'{type(error).__name__}: {error}'[:2000]}
      print(f'{name}: failed: {type(error).__name__}: {str(error)[:500]}', flush=True)
      traceback.print_exc()
      out.write_text(json.dumps(result, indent=2))
      continue
    if reference is None:
      reference = [np.asarray(x, np.float32) for x in outputs]
    errors = []
    for label, got, want in zip(('out', 'dq', 'dk', 'dv'), outputs, reference):
      got = np.asarray(got, np.float32)[real]
      want = want[real]
      errors.append((label, float(np.abs(got - want).max() / np.abs(want).max())))
    row['relative_error'] = dict(errors)
    result['rows'][name] = row
    temp = row['temp_bytes']
    print(f"{name}: {row['ms']:.2f} ms fwd+bwd, temp "
          f"{'?' if temp is None else f'{temp / 2**20:.1f} MiB'}, compiled in "
          f"{row['compile_s']:.1f} s, error " + ', '.join(f'{k} {e:.1e}' for k, e in errors),
          flush=True)
    out.write_text(json.dumps(result, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
