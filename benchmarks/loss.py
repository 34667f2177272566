"""Loss-head benchmark: time and compiled memory of fwd+bwd, as ratios within one process.

    python benchmarks/loss.py            # CPU: scaled-down shapes
    python benchmarks/loss.py --gpu      # three model-sized shapes (on a GPU)

Compared, each as loss and gradients with respect to the hidden states and the head:
  optax_ce     optax's hard-label cross-entropy on dense logits (hidden @ head)
  dense_q      Target-SFT's target + q_cross_entropy on dense student and prior logits
  fused_q      qtarget.fused.q_cross_entropy_fused (token chunks, no N x V array), with its
               head gradient accumulated in float32 and in the head's dtype ('head_dtype')
  pallas_q     the same with implementation='pallas' (GPU kernels; default on GPU, --pallas)
  floor        3 student-head matmuls + 1 prior-head matmul (the matmuls any exact method needs)
Prints a markdown table and writes JSON next to this file (results/loss_<device>.json).
"""

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from qtarget import fused
from qtarget import losses
from qtarget import targets

GPU_SHAPES = [(16384, 576, 576, 49152), (8192, 1536, 3584, 151936), (8192, 4096, 4096, 128256)]
CPU_SHAPES = [(2048, 256, 256, 8192), (2048, 384, 512, 16384)]
ETA = 0.5


def _inputs(n, h, p, v, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  return dict(
      hidden=(jax.random.normal(keys[0], (n, h)) / 4).astype(dtype),
      head=(jax.random.normal(keys[1], (h, v)) / h ** 0.5 * 4).astype(dtype),
      prior_hidden=(jax.random.normal(keys[2], (n, p)) / 4).astype(dtype),
      prior_head=(jax.random.normal(keys[3], (p, v)) / p ** 0.5 * 4).astype(dtype),
      labels=jax.random.randint(keys[4], (n,), 0, v),
      weights=jnp.full((n,), 1.0 / n, jnp.float32))


def optax_ce(hidden, head, prior_hidden, prior_head, labels, weights):
  del prior_hidden, prior_head
  logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights)


def dense_q(hidden, head, prior_hidden, prior_head, labels, weights):
  logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
  prior_logits = jnp.dot(prior_hidden, prior_head, preferred_element_type=jnp.float32)
  target = targets.target_sft(logits, labels, prior_logits=prior_logits, eta=ETA)
  return jnp.sum(losses.q_cross_entropy(logits, labels, target) * weights)


def make_fused_q(chunk_size, implementation='xla', head_grad_accumulation='float32'):
  def fused_q(hidden, head, prior_hidden, prior_head, labels, weights):
    loss, _ = fused.q_cross_entropy_fused(hidden, head, labels, 'target_sft',
                                          prior_hidden_NxP=prior_hidden,
                                          prior_head_PxV=prior_head, weights_N=weights,
                                          chunk_size=chunk_size, implementation=implementation,
                                          head_grad_accumulation=head_grad_accumulation,
                                          eta=ETA)
    return loss
  return fused_q


def _value_and_grads(loss_fn):
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))


def _matmul(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _compile(loss_fn, args):
  """One compiled executable, used for the timings and the memory analysis alike."""
  start = time.perf_counter()
  compiled = _value_and_grads(loss_fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _time(fn, args, repeats, slow_s=None):
  """Median seconds of ``fn(*args)`` after one warm-up call.

  With ``slow_s``, a warm-up slower than that is the only measurement (a slow kernel at a large
  shape would otherwise take minutes of GPU time).
  """
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  if slow_s is not None and first > slow_s:
    return first
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _memory(compiled):
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return {'temp': analysis.temp_size_in_bytes, 'argument': analysis.argument_size_in_bytes,
          'output': analysis.output_size_in_bytes}


def _errors(compiled, args, dense_value, dense_grads):
  value, grads = compiled(*args)
  return {'max_rel_value_error': float(abs(value - dense_value) / abs(dense_value)),
          'max_abs_grad_error': max(float(jnp.max(jnp.abs(a.astype(jnp.float32) -
                                                           b.astype(jnp.float32))))
                                    for a, b in zip(grads, dense_grads))}


def bench(shape, dtype, repeats, chunk_sizes, pallas=None):
  n, h, p, v = shape
  x = _inputs(n, h, p, v, dtype)
  args = (x['hidden'], x['head'], x['prior_hidden'], x['prior_head'], x['labels'], x['weights'])
  chunk_size = chunk_sizes[0]
  row = {'shape': shape, 'dtype': jnp.dtype(dtype).name, 'chunk_size': chunk_size,
         'compile_s': {}}
  executables = {}
  for name, fn in (('optax_ce', optax_ce), ('dense_q', dense_q),
                   ('fused_q', make_fused_q(chunk_size)),
                   ('fused_q_head_dtype', make_fused_q(chunk_size,
                                                       head_grad_accumulation='head_dtype'))):
    executables[name], row['compile_s'][name] = _compile(fn, args)
    row[f'{name}_s'] = _time(executables[name], args, repeats)
    row[f'{name}_memory'] = _memory(executables[name])
  matmul = jax.jit(_matmul)
  student = _time(matmul, (x['hidden'], x['head']), repeats)
  prior = _time(matmul, (x['prior_hidden'], x['prior_head']), repeats)
  row['floor_s'] = 3 * student + prior
  # Equality check while we are here, with the executables just timed: the fused loss is the
  # dense one.
  dense_value, dense_grads = executables['dense_q'](*args)
  row.update(_errors(executables['fused_q'], args, dense_value, dense_grads))
  row['head_dtype_errors'] = _errors(executables['fused_q_head_dtype'], args, dense_value,
                                     dense_grads)
  row['other_chunk_sizes'] = {}
  for other in chunk_sizes[1:]:
    compiled, _ = _compile(make_fused_q(other), args)
    narrow, _ = _compile(make_fused_q(other, head_grad_accumulation='head_dtype'), args)
    row['other_chunk_sizes'][other] = {
        'fused_q_s': _time(compiled, args, repeats), 'fused_q_memory': _memory(compiled),
        'fused_q_head_dtype_s': _time(narrow, args, repeats),
        'fused_q_head_dtype_memory': _memory(narrow)}
  if pallas:  # the GPU kernels; a failure to compile is recorded, not fatal to the run
    import qtarget.experimental.fused_pallas  # pylint: disable=g-import-not-at-top,unused-import  # registers 'pallas'
    try:
      compiled, row['compile_s']['pallas_q'] = _compile(make_fused_q(chunk_size, pallas), args)
      row['pallas_q_s'] = _time(compiled, args, repeats, slow_s=max(1.0, 20 * row['floor_s']))
      row['pallas_q_memory'] = _memory(compiled)
      row['pallas'] = _errors(compiled, args, dense_value, dense_grads)
    except Exception as error:  # pylint: disable=broad-except
      row['pallas_error'] = f'{type(error).__name__}: {str(error)[:2000]}'
      print(f'pallas kernel failed at {shape}: {row["pallas_error"][:500]}', flush=True)
  return row


def _gib(x):
  return f'{x / 2**30:.2f}' if x is not None else 'n/a'


def report(rows, device):
  lines = [f'device: {device}', '',
           '| N, H, P, V | chunk | optax CE ms | dense Q ms | fused Q ms | floor ms | '
           'fused/floor | fused/optax | fused/dense | dense temp GiB | fused temp GiB | '
           'head_dtype: fused Q ms, /optax, temp GiB, max grad error |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  temp = lambda memory: memory and memory['temp']
  for r in rows:
    lines.append(
        f"| {', '.join(map(str, r['shape']))} | {r['chunk_size']} | "
        f"{1e3 * r['optax_ce_s']:.1f} | {1e3 * r['dense_q_s']:.1f} | "
        f"{1e3 * r['fused_q_s']:.1f} | {1e3 * r['floor_s']:.1f} | "
        f"{r['fused_q_s'] / r['floor_s']:.2f} | {r['fused_q_s'] / r['optax_ce_s']:.2f} | "
        f"{r['fused_q_s'] / r['dense_q_s']:.2f} | {_gib(temp(r['dense_q_memory']))} | "
        f"{_gib(temp(r['fused_q_memory']))} | {1e3 * r['fused_q_head_dtype_s']:.1f}, "
        f"{r['fused_q_head_dtype_s'] / r['optax_ce_s']:.2f}, "
        f"{_gib(temp(r['fused_q_head_dtype_memory']))}, "
        f"{r['head_dtype_errors']['max_abs_grad_error']:.1e} |")
    for chunk, other in r.get('other_chunk_sizes', {}).items():
      lines.append(
          f"| {', '.join(map(str, r['shape']))} | {chunk} | | | "
          f"{1e3 * other['fused_q_s']:.1f} | | {other['fused_q_s'] / r['floor_s']:.2f} | "
          f"{other['fused_q_s'] / r['optax_ce_s']:.2f} | | | "
          f"{_gib(temp(other['fused_q_memory']))} | "
          f"{1e3 * other['fused_q_head_dtype_s']:.1f}, "
          f"{other['fused_q_head_dtype_s'] / r['optax_ce_s']:.2f}, "
          f"{_gib(temp(other['fused_q_head_dtype_memory']))}, |")
  kernel_rows = [r for r in rows if 'pallas_q_s' in r or 'pallas_error' in r]
  if kernel_rows:
    lines += ['', '| N, H, P, V | Pallas Q ms | Pallas/floor | Pallas temp GiB | '
              'max rel value error | max abs grad error |', '|---|---|---|---|---|---|']
    for r in kernel_rows:
      if 'pallas_error' in r:
        lines.append(f"| {', '.join(map(str, r['shape']))} | failed: "
                     f"{r['pallas_error'][:200]} | | | | |")
        continue
      temp = r['pallas_q_memory'] and r['pallas_q_memory']['temp']
      lines.append(f"| {', '.join(map(str, r['shape']))} | {1e3 * r['pallas_q_s']:.1f} | "
                   f"{r['pallas_q_s'] / r['floor_s']:.2f} | {_gib(temp)} | "
                   f"{r['pallas']['max_rel_value_error']:.1e} | "
                   f"{r['pallas']['max_abs_grad_error']:.1e} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gpu', action='store_true', help='the three model-sized GPU shapes')
  parser.add_argument('--dtype', default=None, help='float32 or bfloat16 (default: bf16 on GPU)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--chunk-sizes', '--chunk-size', default=None,
                      help='comma-separated token chunks of the fused loss; the first is the '
                      'main one (default: 1024 on GPU, 128 on CPU)')
  parser.add_argument('--pallas', action=argparse.BooleanOptionalAction, default=None,
                      help='also time the Pallas kernels (default: on GPU only)')
  parser.add_argument('--pallas-implementation', default='pallas',
                      help="'pallas' (compiled) or 'pallas_interpret' (to check this script on CPU)")
  parser.add_argument('--out', default=None, help='JSON file (default: results/loss_<backend>.json)')
  parser.add_argument('--shapes', default=None,
                      help="'N,H,P,V;N,H,P,V' instead of the GPU or CPU defaults")
  args = parser.parse_args()
  shapes = GPU_SHAPES if args.gpu else CPU_SHAPES
  if args.shapes:
    try:
      shapes = [tuple(int(d) for d in shape.split(',')) for shape in args.shapes.split(';')]
    except ValueError:
      parser.error(f'--shapes {args.shapes!r}: expected integers like 2048,256,256,8192;...')
    if any(len(shape) != 4 or min(shape) < 1 for shape in shapes):
      parser.error(f'--shapes {args.shapes!r}: each shape is four positive N,H,P,V')
  dtype = jnp.dtype(args.dtype or ('bfloat16' if args.gpu else 'float32'))
  chunk_sizes = [int(c) for c in (args.chunk_sizes or ('1024' if args.gpu else '128')).split(',')]
  pallas = args.pallas if args.pallas is not None else jax.default_backend() == 'gpu'
  pallas = args.pallas_implementation if pallas else None
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}'
  out = pathlib.Path(args.out or pathlib.Path(__file__).parent / 'results'
                     / f"loss_{jax.default_backend()}.json")
  out.parent.mkdir(exist_ok=True)
  rows = []
  for shape in shapes:
    print(f'benchmarking N, H, P, V = {shape} ...', flush=True)
    rows.append(bench(shape, dtype, args.repeats, chunk_sizes, pallas=pallas))
    last = rows[-1]
    if pallas and ('pallas_error' in last or last['pallas_q_s'] > 10 * last['floor_s']):
      print('Pallas kernels failed or ran over 10x the floor: not timed at the larger shapes',
            flush=True)
      pallas = None
    # Written after every shape: a run cut short still leaves what it measured.
    out.write_text(json.dumps({'device': device, 'rows': rows}, indent=2))
  print(report(rows, device))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
